"""The app driven through its API with gradio_client: a short real training run, live metrics, side-by-side chat."""

from __future__ import annotations


import pytest
from gradio_client import handle_file

from helpers import app_client, served_app, wait_until


@pytest.fixture(scope="module")
def client(tmp_path_factory):

    with served_app(tmp_path_factory.mktemp("runs")) as url:
        yield app_client(url)


def _poll_until(client, run_id: str, done):
    last: list = []

    def reached():
        last[:] = [client.predict(run_id, api_name="/poll_run")]
        return last[0] if done(last[0]) else None

    try:
        return wait_until(reached, f"run {run_id} reaching the expected state", every=0.5)
    except AssertionError as error:
        raise AssertionError(f"{error}; last status: {last[0][1]}\n{last[0][5]}") from None


def _text(message: dict) -> str:
    content = message["content"]
    return content if isinstance(content, str) else content[0]["text"]


@pytest.mark.trajectory
def test_train_then_chat_side_by_side(client, style_model_dir, qa_file):
    """Train through the form, then chat greedily: the adapter must visibly carry the trained style."""
    form = {"data_file": None, "data_kind": "Uploaded file", "model_kind": "Local folder", "run_name": "api",
            "model_source": str(style_model_dir), "model_bits": 4, "lora_rank": 4, "lora_alpha": 8,
            "lora_dropout": 0.0, "training_learning_rate": 0.01, "training_max_steps": 20,
            "training_batch_size": 4, "training_eval_steps": 5, "training_save_steps": 10,
            "training_warmup_ratio": 0.0, "data_max_seq_length": 128}

    # Invalid fields come back as one message per field, and nothing starts.
    _, message = client.predict(**{**form, "data_file": handle_file(str(qa_file)), "lora_rank": 0,
                                   "training_learning_rate": -1}, api_name="/start_run")
    assert "lora.rank" in message and "training.learning_rate" in message

    run_id, message = client.predict(**{**form, "data_file": handle_file(str(qa_file))}, api_name="/start_run")
    assert run_id.startswith("api-") and "Started" in message

    # Only one job at a time: a second Start while this one trains waits in the queue; Stop takes it out again.
    second_id, queued = client.predict(**{**form, "data_file": handle_file(str(qa_file))}, api_name="/start_run")
    assert second_id != run_id and "Queued" in queued and "2nd in line" in queued, queued
    assert "cancelled" in client.predict(second_id, api_name="/stop_run")
    assert "Deleted run" in str(client.predict(second_id, api_name="/delete_run"))  # out of the history too

    result = _poll_until(client, run_id, lambda r: "completed" in r[1] or "failed" in r[1])
    assert "completed" in result[1], result[5]
    losses = [row for row in result[3]["data"] if row[1] is not None]
    series = {row[2] for row in losses}
    assert series == {"train loss", "eval loss"}
    train_losses = [row[1] for row in losses if row[2] == "train loss"]
    assert len(train_losses) == 20 and train_losses[-1] < train_losses[0]
    assert result[4]["data"], "learning-rate curve is empty"
    assert "step 20/20" in result[2]

    history, picker, *_ = client.predict([], api_name="/run_history")
    assert run_id in picker["value"]  # other tests of this module may have left runs of their own
    plot = client.predict([run_id], api_name="/compare_runs")  # an update: the chart's title names the stage
    assert plot["value"]["data"] and plot["title"] == "Training loss of sft runs"
    rows = [dict(zip(history["headers"], data)) for data in history["data"]]
    row = next(r for r in rows if r["run id"] == run_id)
    assert row["status"] == "completed" and row["stage"] == "sft"
    assert row["headline metric"] == "eval loss" and row["headline value"] is not None

    adapters = client.predict(None, api_name="/list_adapters")
    assert adapters["value"] == run_id  # a dropdown update: the newest finished run is preselected
    # Greedy decoding (temperature 0), on a question that is not in the training data.
    base_chat, tuned_chat, prompt_box = client.predict(
        "What is a LoRA adapter?", run_id, [], [], 16, 0, 0.9, 0, api_name="/chat")
    base_text, tuned_text = _text(base_chat[-1]), _text(tuned_chat[-1])
    # The trained style: every training answer opens with the course's "🧪 Lab note:"; the base never says it.
    assert tuned_text.startswith("🧪 Lab note:"), tuned_text
    assert "Lab note" not in base_text and base_text != tuned_text, base_text
    assert base_chat[0]["role"] == "user" and prompt_box == ""
    # Greedy means reproducible: the same question gives the same two answers again.
    again_base, again_tuned, _ = client.predict(
        "What is a LoRA adapter?", run_id, [], [], 16, 0, 0.9, 0, api_name="/chat")
    assert (_text(again_base[-1]), _text(again_tuned[-1])) == (base_text, tuned_text)


def test_chat_without_run_or_prompt_says_why(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="prompt"):
        client.predict("   ", None, [], [], 16, 0, 0.9, 0, api_name="/chat")
    with pytest.raises(AppError, match="run"):
        client.predict("hello", None, [], [], 16, 0, 0.9, 0, api_name="/chat")


def test_stop_from_the_ui_keeps_a_checkpoint(client, tiny_model_dir, qa_file):
    form = {"data_kind": "Uploaded file", "data_file": handle_file(str(qa_file)), "run_name": "stop-me",
            "model_source": str(tiny_model_dir), "training_max_steps": 200, "training_save_steps": 1000,
            "training_batch_size": 2, "data_max_seq_length": 128, "training_eval_steps": 0}
    run_id, message = client.predict(**form, api_name="/start_run")
    assert "Started" in message, message
    _poll_until(client, run_id, lambda r: r[3] is not None)  # the first loss point is on the plot
    assert "Stop requested" in client.predict(run_id, api_name="/stop_run")
    result = _poll_until(client, run_id, lambda r: "stopped" in r[1] or "completed" in r[1] or "failed" in r[1])
    assert "stopped" in result[1], result[5]
    # Resume from the UI: the run goes on from its checkpoint (then stop it again to keep the test short).
    assert "Not resumed" in client.predict(run_id + "-nope", api_name="/resume_run")[1]
    watched, message = client.predict(run_id, api_name="/resume_run")
    assert watched == run_id and "Resuming" in message, message
    _poll_until(client, run_id, lambda r: "running" in r[1] or "is **running**" in r[1])
    assert "Stop requested" in client.predict(run_id, api_name="/stop_run")
    result = _poll_until(client, run_id, lambda r: "stopped" in r[1] or "completed" in r[1] or "failed" in r[1])
    assert "stopped" in result[1], result[5]


@pytest.mark.parametrize("preset", ["cpu-quick", "t4-qlora", "llama2-7b-colab"])
def test_presets_round_trip_through_the_form(preset):
    from components.train_form import config_from_form, form_from_config
    from finetune.core.paths import CONFIGS_DIR
    from finetune.core.config import load_config, to_dict

    cfg = load_config(CONFIGS_DIR / f"{preset}.yaml")
    assert to_dict(config_from_form(form_from_config(cfg))) == to_dict(cfg)


def test_form_errors_name_every_bad_field():
    from components.train_form import config_from_form, form_from_config
    from finetune.core.config import ConfigError, RunConfig

    form = {**form_from_config(RunConfig()), "lora_rank": 0, "column_mapping_json": "{not json"}
    with pytest.raises(ConfigError) as error:
        config_from_form(form)
    assert {"data.column_mapping", "lora.rank"} <= set(error.value.problems)
