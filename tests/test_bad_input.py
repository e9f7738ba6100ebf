"""The bad-input catalogue: every user input, fed careless and hostile values, gets a specific message.

Driven through the real app with gradio_client (uploads, form fields, chat, feedback, export names) and through
the real CLI (`python -m finetune.train`, in-process via ``cli()`` plus one true subprocess). Each case checks the
message names the problem, that nothing started, and that the app still answers afterwards (no state lost).
docs/reliability.md lists the same cases with the messages.

Mocked, because this machine has no Hub: the "online 404" cases raise the error huggingface_hub/datasets raise
for a missing repository, with the Hub declared reachable.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from gradio_client import handle_file
from gradio_client.exceptions import AppError

from helpers import ROOT, app_client, served_app, tiny_run_config, write_jsonl

# name -> (file content, words the message must contain)
BAD_FILES: dict[str, tuple[bytes, str]] = {
    "empty.jsonl": (b"", "is empty"),
    "binary.jsonl": (bytes(range(256)) * 8, "binary file"),
    # Latin-1 and other encodings are read (tests/test_data_files.py); bytes no text encoding fits are not.
    "undecodable.csv": (b"prompt,completion\n" + bytes(range(128, 256)) * 4, "not UTF-8"),
    "cut.jsonl": (b'{"prompt": "a", "completion": "b"}\n{"prompt": "c", "compl', "line 2 is not valid JSON"),
    "cut.json": (b'[{"prompt": "a", "completion": "b"}, {"prompt": "c"', "file may be cut off"),
    "scalars.json": (b"[1, 2, 3]", "list of objects"),
    "string.json": (b'"hello"', "one JSON object per line"),
    "onecol.csv": (b"prompt\nhello\nworld\n", "No usable columns. Found: prompt"),
}


@pytest.fixture(scope="module")
def app(tmp_path_factory):

    root = tmp_path_factory.mktemp("runs")
    with served_app(root) as url:
        yield app_client(url), root


def _still_serving(client) -> None:
    """A cheap call that must keep working after each bad input."""
    assert client.predict(None, api_name="/list_adapters")["__type__"] == "update"


def _no_runs(root: Path) -> list[str]:
    return [p.name for p in root.iterdir() if (p / "status.json").is_file()]


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_upload_is_explained_by_preview_and_start(app, tmp_path, name):
    client, root = app
    content, expected = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(content)
    info, _ = client.predict(data_kind="Uploaded file", data_file=handle_file(str(path)), api_name="/preview_data")
    # A file with some readable rows is previewed, with the refusal Start will give (the user may skip the line).
    partly_readable = name == "cut.jsonl"
    assert expected in info and ("**Start will refuse this file:**" if partly_readable else "Cannot preview") in info
    if name != "onecol.csv":  # columns are only known once the file is parsed, which the child does
        run_id, message = client.predict(data_kind="Uploaded file", data_file=handle_file(str(path)),
                                         api_name="/start_run")
        assert "data.source" in message and expected in message
        assert not _no_runs(root)
    _still_serving(client)


def test_upload_of_a_disallowed_type_is_refused(app, tmp_path):
    client, _ = app
    path = tmp_path / "tool.exe"
    path.write_bytes(b"MZ\x90\x00")
    with pytest.raises(AppError, match="Invalid file type"):
        client.predict(data_kind="Uploaded file", data_file=handle_file(str(path)), api_name="/preview_data")


def test_huge_file_is_refused_before_parsing(tmp_path, monkeypatch):
    """A sparse 3 GB file: the size check answers without reading it."""
    from finetune.core.data import DataError, check_file

    path = tmp_path / "huge.jsonl"
    with path.open("wb") as handle:
        handle.write(b'{"prompt": "a", "completion": "b"}\n')
        handle.truncate(3 * 2**30)
    with pytest.raises(DataError, match=r"3,072 MB; the limit is 1,024 MB"):
        check_file(path)
    monkeypatch.setenv("LORA_LAB_MAX_DATA_MB", "0.00001")
    small = write_jsonl(tmp_path / "small.jsonl", [{"prompt": "a" * 50, "completion": "b"}])
    with pytest.raises(DataError, match="LORA_LAB_MAX_DATA_MB"):
        check_file(small)


# --- form fields -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, problem", [
    ({"lora_rank": 0}, "lora.rank`: LoRA rank must be between 1 and 4096, got 0"),
    ({"lora_rank": 100000}, "LoRA rank must be between 1 and 4096, got 100000"),
    ({"training_learning_rate": -0.001}, "Learning rate must be > 0 and < 1"),
    ({"training_learning_rate": 0}, "Learning rate must be > 0 and < 1"),
    ({"lora_dropout": 1.0}, "LoRA dropout must be >= 0 and < 1, got 1"),
    ({"data_max_seq_length": 0}, "Max sequence length must be between 16 and 131072, got 0"),
    ({"training_batch_size": -1}, "Batch size must be between 1 and 4096"),
    ({"training_max_steps": 0}, "Max steps must be -1 (use epochs) or a positive number"),
    ({"column_mapping_json": "[1]"}, "Column mapping must be a JSON object"),
    ({"column_mapping_json": "{oops"}, "Column mapping is not valid JSON"),
    ({"model_source": ""}, "Model source must not be empty"),
    ({"model_source": "/etc"}, "has no config.json, so it is not a saved model"),
    ({"model_source": "not a model!"}, "neither the embedded model"),
    ({"model_kind": "Hub id", "model_source": "nobody/no-such-model"}, "Cannot reach the Hugging Face Hub"),
    ({"data_kind": "Hub dataset", "data_hub_name": "nobody/no-such-data"}, "Cannot reach the Hugging Face Hub"),
    ({"data_kind": "Hub dataset", "data_hub_name": ""}, "Dataset source must not be empty"),
    ({"model_trust_remote_code": True}, "Remote code is disabled on this server"),
])
def test_bad_form_values_are_named_and_nothing_starts(app, fields, problem):
    client, root = app
    run_id, message = client.predict(data_file=None, **fields, api_name="/start_run")
    assert "Please fix the form" in message and problem in message, message
    assert not _no_runs(root)


def test_values_the_widgets_cannot_hold_are_refused_by_gradio(app):
    """A 3-bit radio choice or text in a number field never reaches the handler (gradio checks them)."""
    client, root = app
    with pytest.raises(AppError, match=r"3 .*not in the list of choices: \[4, 8, 16, 32\]"):
        client.predict(data_file=None, model_bits=3, api_name="/start_run")
    with pytest.raises(AppError):
        client.predict(data_file=None, lora_rank="abc", api_name="/start_run")
    assert not _no_runs(root)
    _still_serving(client)


def test_nan_and_text_in_numbers_are_config_errors():
    """NaN cannot travel in JSON, but YAML and the library accept it: the config refuses it by name."""
    from components.train_form import config_from_form, form_from_config
    from finetune.core.config import ConfigError, RunConfig

    form = {**form_from_config(RunConfig()), "training_learning_rate": float("nan"), "lora_alpha": float("inf"),
            "model_bits": 3, "lora_rank": "8"}
    with pytest.raises(ConfigError) as error:
        config_from_form(form)
    assert set(error.value.problems) == {"training.learning_rate", "lora.alpha", "model.bits", "lora.rank"}
    assert "got nan" in error.value.problems["training.learning_rate"]


def test_bad_column_mapping_names_the_missing_columns(app, tmp_path):
    client, _ = app
    path = write_jsonl(tmp_path / "qa.jsonl", [{"q": "hi", "a": "yo"}] * 3)
    info, _ = client.predict(data_kind="Uploaded file", data_file=handle_file(str(path)),
                             column_mapping_json='{"query": "prompt"}', api_name="/preview_data")
    assert "Column mapping names columns that do not exist: query. Columns found: q, a" in info


# --- chat, generation settings, feedback, export names ----------------------------------------------------------

@pytest.mark.parametrize("prompt, run, expected", [
    ("", None, "Type a prompt first"),
    ("   \n ", "x", "Type a prompt first"),
    ("x" * 1_000_000, "x", "1,000,000 characters long; keep it under 20,000"),
    ("hello", None, "Pick a finished run's adapter first"),
    ("hello", "no-such-run", "Run 'no-such-run' has no saved adapter"),
    ("hello", "../../etc", "has no saved adapter"),
])
def test_bad_chat_requests(app, prompt, run, expected):
    client, _ = app
    with pytest.raises(AppError, match=expected.replace("(", r"\(")):
        client.predict(prompt, run, [], [], 16, 0.7, 0.9, 0, api_name="/chat")


@pytest.mark.parametrize("settings, expected", [
    ((100000, 0.7, 0.9, 0), "greater than maximum value 512"),
    ((0, 0.7, 0.9, 0), "less than minimum value 1"),
    ((16, -1, 0.9, 0), "less than minimum value 0"),
    ((16, 9, 0.9, 0), "greater than maximum value 2"),
    ((16, 0.7, 0, 0), "less than minimum value 0.05"),
    ((16, 0.7, 0.9, -5), "less than minimum value 0"),
])
def test_bad_generation_settings_through_the_api(app, settings, expected):
    client, _ = app
    with pytest.raises(AppError, match=expected):
        client.predict("hello", "no-such-run", [], [], *settings, api_name="/chat")


def test_generation_limits_hold_in_the_library_too():
    """The server-side limits, for callers that skip the UI's sliders (finetune/services/chat.py)."""
    from finetune.services.chat import MAX_NEW_TOKENS, SamplingSettings, check_prompt

    for bad, field in [((MAX_NEW_TOKENS + 1, 0.7, 0.9, 0), "max new tokens"), (("a", 0.7, 0.9, 0), "max new tokens"),
                       ((16, float("nan"), 0.9, 0), "temperature"), ((16, 0.7, None, 0), "top-p"),
                       ((16, 0.7, 0.9, 1.5), "seed")]:
        with pytest.raises(ValueError, match=f"Invalid sampling settings: {field}"):
            SamplingSettings(*bad)
    with pytest.raises(ValueError, match="keep it under"):
        check_prompt("x" * 1_000_000)
    with pytest.raises(ValueError, match="empty"):
        check_prompt(None)


def test_bad_feedback(app):
    client, _ = app
    with pytest.raises(AppError, match="Send a prompt first"):
        client.predict("left", "", "", "both", api_name="/submit_feedback")
    with pytest.raises(AppError, match="not in the list of choices"):
        client.predict("evil", "", "", "both", api_name="/submit_feedback")
    with pytest.raises(AppError, match="not in the list of choices"):
        client.predict("left", "", "", "../../x", api_name="/submit_feedback")


def test_bad_feedback_in_the_store(tmp_path):
    from finetune.services.feedback import FeedbackError, FeedbackStore

    store = FeedbackStore(tmp_path / "fb.db")
    ids = store.record_turn(model="m", adapter="a", prompt="p", base_history=[], tuned_history=[], settings={},
                            base_response="b", tuned_response="t")
    with pytest.raises(FeedbackError):
        store.add_preference(ids["base"], "no-such-id", "first")
    with pytest.raises(FeedbackError):
        store.add_preference(ids["base"], ids["tuned"], "sideways")
    with pytest.raises(FeedbackError):
        store.add_thumbs("no-such-id", True)
    assert store.counts()["generations"] == 2  # the stored answers are untouched


@pytest.mark.parametrize("api, args, expected", [
    ("/export_zip", ("../../etc",), "Invalid run id '../../etc'"),
    ("/export_zip", (None,), "Pick a finished run first"),
    ("/model_card", ("../x",), "Invalid run id"),
    ("/merge_adapter", ("no-such-run",), "has no saved adapter"),
    ("/push_to_hub", ("no-such-run", "Adapter", "../../x", "", False), "has no saved adapter"),
])
def test_bad_export_requests(app, api, args, expected):
    client, _ = app
    with pytest.raises(AppError, match=expected):
        client.predict(*args, api_name=api)


def test_push_with_a_bad_repo_name_is_refused(tmp_path):
    from finetune.services.export import ExportError, push_folder

    (tmp_path / "adapter_config.json").write_text("{}")
    for repo in ("../../x", "no slash", "a/b/c", "", "user/name; rm -rf /"):
        with pytest.raises(ExportError, match="Hub repo id must look like 'user/name'") as error:
            push_folder(tmp_path, repo, "hf_not_a_real_token")
        assert "hf_not_a_real_token" not in str(error.value)


# --- adapter of another base model ----------------------------------------------------------------------------

def _adapter_run(runs_root: Path, run_id: str, adapter_base: Path, config_base: Path, data_file: Path) -> Path:
    """A finished run folder whose adapter was trained on ``adapter_base`` but whose config names ``config_base``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune.core.config import save_config
    from finetune.core.run_status import write_status

    folder = runs_root / run_id
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(adapter_base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(folder / "adapter")
    save_config(tiny_run_config(config_base, data_file, bits=32), folder / "config.yaml")
    write_status(folder, state="completed", step=1, max_steps=1)
    return folder


def test_adapter_of_another_base_model_is_explained(tmp_path, tiny_model_dir, qa_file):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from finetune.services.chat import ChatEngine, SamplingSettings
    from finetune.core.config import load_config
    from finetune.core.hardware import detect

    other = tmp_path / "other-base"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)).save_pretrained(other)
    runs = tmp_path / "runs"
    bad = _adapter_run(runs, "wrong-base", other, tiny_model_dir, qa_file)
    good = _adapter_run(runs, "right-base", tiny_model_dir, tiny_model_dir, qa_file)
    engine, cfg = ChatEngine(detect()), load_config(bad / "config.yaml").model
    settings = SamplingSettings(max_new_tokens=3, temperature=0.0)
    with pytest.raises(ValueError, match=r"does not fit the base model .*trained on .*other-base"):
        engine.answer_pair("hello", [], [], cfg, "wrong-base", bad / "adapter", settings)
    # Nothing lost: the engine still serves a matching adapter afterwards.
    base, tuned = engine.answer_pair("hello", [], [], cfg, "right-base", good / "adapter", settings)
    assert isinstance(base, str) and isinstance(tuned, str)


# --- the CLI -------------------------------------------------------------------------------------------------

def _yaml(path: Path, cfg_dict: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg_dict), encoding="utf-8")
    return path


def _base_dict(model_dir: Path, data_file: Path) -> dict:
    from finetune.core.config import to_dict

    return to_dict(tiny_run_config(model_dir, data_file, bits=32, max_steps=1))


@pytest.mark.parametrize("section, field, value, expected", [
    ("training", "learning_rate", float("nan"), "training.learning_rate: Learning rate must be a finite number"),
    ("training", "learning_rate", -1.0, "training.learning_rate: Learning rate must be > 0"),
    ("lora", "rank", 0, "lora.rank: LoRA rank must be between 1 and 4096, got 0"),
    ("lora", "rank", 100000, "lora.rank: LoRA rank must be between 1 and 4096, got 100000"),
    ("lora", "dropout", 1.0, "lora.dropout: LoRA dropout must be >= 0 and < 1"),
    ("model", "bits", 3, "model.bits: Bit width must be 4, 8, 16 or 32, got 3"),
    ("data", "max_seq_length", 0, "data.max_seq_length: Max sequence length must be between 16"),
    ("training", "no_such_field", 1, "training.no_such_field: unknown field"),
])
def test_cli_names_each_bad_config_value(tmp_path, tiny_model_dir, qa_file, capsys, section, field, value, expected):
    from finetune.train import cli

    raw = _base_dict(tiny_model_dir, qa_file)
    raw[section][field] = value
    code = cli([str(_yaml(tmp_path / "bad.yaml", raw)), "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: invalid config") and expected in err, err
    assert "Traceback" not in err


def _mock_hub_404(monkeypatch) -> None:
    """Mocked: the Hub answers, but the repository does not exist (the errors the libraries raise then)."""
    import transformers
    from datasets.exceptions import DatasetNotFoundError

    import finetune.core.data_sources
    import finetune.core.models

    def missing_dataset(name, *args, **kwargs):
        raise DatasetNotFoundError(f"Dataset '{name}' doesn't exist on the Hub or cannot be accessed.")

    real_loader = transformers.AutoTokenizer.from_pretrained

    def missing_model(name, *args, **kwargs):
        if not str(name).startswith("nobody/"):  # the local tiny model still loads
            return real_loader(name, *args, **kwargs)
        raise OSError(f"{name} is not a local folder and is not a valid model identifier listed on "
                      "'https://huggingface.co/models'")

    monkeypatch.setattr(finetune.core.models, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(finetune.core.data_sources, "load_dataset", missing_dataset)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", missing_model)


@pytest.mark.parametrize("case, expected", [
    ("missing_fields", "None of the 2 rows has usable 'prompt_completion' content"),
    ("one_column_csv", "No usable columns. Found: prompt"),
    ("list_of_scalars", "must be a JSON list of objects"),
    ("offline_dataset", "Cannot reach the Hugging Face Hub to download the dataset 'nobody/no-such-data'"),
    ("offline_model", "Cannot reach the Hugging Face Hub to download the model 'nobody/no-such-model'"),
    ("404_dataset", "Could not load Hub dataset 'nobody/no-such-data': Dataset 'nobody/no-such-data' doesn't exist"),
    ("404_model", "Could not load 'nobody/no-such-model' from the Hub: nobody/no-such-model is not a local folder"),
    ("seq_len_too_short", "All 36 rows are longer than the max sequence length of 16 tokens"),
])
def test_cli_data_and_model_errors_are_one_line(tmp_path, tiny_model_dir, qa_file, capsys, monkeypatch, case,
                                                 expected):
    from finetune.core.run_status import read_status
    from finetune.train import cli

    raw = _base_dict(tiny_model_dir, qa_file)
    if case == "missing_fields":
        raw["data"]["source"] = str(write_jsonl(tmp_path / "m.jsonl", [{"prompt": "a"}, {"completion": "b"}]))
    elif case == "one_column_csv":
        (tmp_path / "one.csv").write_text("prompt\nhello\nworld\n")
        raw["data"]["source"] = str(tmp_path / "one.csv")
    elif case == "list_of_scalars":
        (tmp_path / "s.json").write_text("[1, 2, 3]")
        raw["data"]["source"] = str(tmp_path / "s.json")
    elif case.endswith("dataset"):
        raw["data"]["source"] = "nobody/no-such-data"
    elif case.endswith("model"):
        raw["model"]["source"] = "nobody/no-such-model"
    elif case == "seq_len_too_short":
        raw["data"]["max_seq_length"] = 16
    if case.startswith("404"):
        _mock_hub_404(monkeypatch)
    code = cli([str(_yaml(tmp_path / "c.yaml", raw)), "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1 and any(line.startswith("error: ") and expected in line for line in err.splitlines()), err
    assert "Traceback" not in err
    status = read_status(tmp_path / "run")
    assert status["state"] == "failed" and expected in status["error"]


def test_cli_subprocess_bad_yaml(tmp_path):
    """The real command line: a broken YAML gives an `error:` line and exit code 2, no traceback."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    done = subprocess.run([sys.executable, "-m", "finetune.train", str(broken), "--output-dir",
                           str(tmp_path / "run")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2, done.stderr
    # (bitsandbytes may print a warning about optional CPU kernels on import; the error line follows it)
    assert "\nerror: invalid config:\n" in "\n" + done.stderr and "Traceback" not in done.stderr
    assert "broken.yaml is not valid YAML" in done.stderr


def test_cli_missing_config_file(tmp_path, capsys):
    from finetune.train import cli

    assert cli([str(tmp_path / "nope.yaml")]) == 2
    assert "config: config file not found" in capsys.readouterr().err


def test_one_row_dataset_trains(tmp_path, tiny_model_dir):
    """A 1-row dataset is not an error: it trains, with a note that eval loss is off."""
    from finetune.core.run_status import read_status
    from finetune.train import cli

    raw = _base_dict(tiny_model_dir, write_jsonl(tmp_path / "one.jsonl", [{"prompt": "Hi?", "completion": "Hello."}]))
    raw["training"]["batch_size"] = 1
    assert cli([str(_yaml(tmp_path / "c.yaml", raw)), "--output-dir", str(tmp_path / "run")]) == 0
    assert read_status(tmp_path / "run")["state"] == "completed"
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["train_rows"] == 1 and any("eval loss is off" in note for note in info["data_notes"])


# --- the other tabs (RLHF, Compare, Evaluate, Quantization) -------------------------------------------------------

RLHF_FORM = {"data_file": None, "data_hub_name": None, "reward_run": None}


@pytest.mark.parametrize("api, fields, expected", [
    ("/rlhf_start_reward", {"lora_rank": 0}, "lora.rank`: LoRA rank must be between 1 and 4096, got 0"),
    ("/rlhf_start_reward", {"reward_learning_rate": -1}, "Learning rate must be > 0 and < 1, got -1"),
    ("/rlhf_start_reward", {"data_kind": "Hub dataset", "data_hub_name": "nobody/prefs"},
     "Cannot reach the Hugging Face Hub to download the dataset 'nobody/prefs'"),
    ("/rlhf_start_reward", {"model_kind": "Hub id", "model_source": "nobody/no-such-model"},
     "Cannot reach the Hugging Face Hub to download the model 'nobody/no-such-model'"),
    ("/rlhf_start_policy", {"beta": 0}, "preference.beta`: Beta must be > 0 and <= 100, got 0"),
    ("/rlhf_start_policy", {"max_seq_length": 0}, "Max sequence length must be between 16 and 131072, got 0"),
])
def test_bad_rlhf_form_values(app, api, fields, expected):
    client, root = app
    _, message = client.predict(**{**RLHF_FORM, **fields}, api_name=api)
    assert expected in message, message
    assert not _no_runs(root)


@pytest.mark.parametrize("name, expected", [("binary.jsonl", "looks like a binary file"),
                                            ("cut.jsonl", "line 2 is not valid JSON")])
def test_bad_rlhf_uploads(app, tmp_path, name, expected):
    client, root = app
    path = tmp_path / name
    path.write_bytes(BAD_FILES[name][0])
    upload = {**RLHF_FORM, "data_kind": "Uploaded file", "data_file": handle_file(str(path))}
    _, message = client.predict(**upload, api_name="/rlhf_start_reward")
    assert "Not started" in message and expected in message
    info, _ = client.predict(**upload, api_name="/rlhf_preview_data")
    assert expected in info
    assert not _no_runs(root)


@pytest.mark.parametrize("api, fields, expected", [
    ("/compare_start", {"data_source": "/etc/passwd"}, "data.source`: Unsupported file type '' for passwd"),
    ("/compare_start", {"model_source": "nobody/no-such-model"}, "Cannot reach the Hugging Face Hub"),
    ("/compare_start", {"techniques": []}, "choose at least one technique"),
    ("/compare_start", {"learning_rate": -1}, "Learning rate must be > 0 and < 1, got -1"),
])
def test_bad_comparison_requests_start_nothing(app, api, fields, expected):
    client, root = app
    result = client.predict(**fields, api_name=api)
    assert "Not started" in result[1] and expected in result[1], result[1]
    assert not _no_runs(root)


@pytest.mark.parametrize("api, fields, expected", [
    ("/quantize_compare", {"prompt": "x" * 1_000_000, "keys": ["fp32"]}, "keep it under 20,000"),
    ("/quantize_compare", {"keys": []}, "Pick at least one format"),
    ("/quantize_compare", {"max_new_tokens": 100000}, "greater than maximum value"),
    ("/quantize_compare", {"source": "nobody/x", "keys": ["fp32"]}, "Cannot reach the Hugging Face Hub"),
    ("/eval_loss", {"run_ids": ["../../etc"]}, r"No saved adapter for run\(s\): ../../etc"),
    ("/eval_loss", {"run_ids": []}, "Pick at least one finished run"),
    ("/checkpoint_answers", {"run_id": "../../etc"}, "Invalid run id '../../etc'"),
    ("/rlhf_score", {"reward_run": "../../etc", "prompt": "p", "answer_a": "a", "answer_b": ""},
     "Pick a finished reward model first"),
])
def test_bad_evaluation_and_quantization_requests(app, api, fields, expected):
    client, _ = app
    with pytest.raises(AppError, match=expected):
        client.predict(**fields, api_name=api)
