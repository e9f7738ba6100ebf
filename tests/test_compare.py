"""The technique comparison: real runs in child processes through the RunManager, on a small random Llama.

The model is wider than conftest's tiny one (hidden 128) so bitsandbytes really quantizes its layers; the
memory ordering is asserted on the bytes of those quantized layers, which the bit width decides (the process's
peak RSS of a model this small is dominated by the Python runtime, see the README's measured table for the
embedded model).
"""

from __future__ import annotations

import json
import math

import pytest

from finetune.core.config import ConfigError
from finetune.services.compare import (CompareError, CompareQueue, CompareRequest, TECHNIQUES, loss_points, progress,
                                       results, validate_request)
from finetune.services.runs import RunManager

from helpers import wait_until


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory, embedded_dir):
    # Hidden 128: wide enough that bitsandbytes really quantizes every block Linear at 8 and 4 bits.
    from helpers import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("wide-llama"), embedded_dir, hidden=128, intermediate=256)


@pytest.fixture
def qa_rows_file(tmp_path):
    from helpers import write_jsonl

    rows = [{"prompt": f"What does knob {i} do?", "completion": f"Lab note: knob {i} scales the adapter."}
            for i in range(30)]
    return write_jsonl(tmp_path / "qa.jsonl", rows)


def test_bad_requests_are_refused_with_every_problem_named():
    with pytest.raises(ConfigError) as error:
        validate_request(CompareRequest(techniques=["lora16", "magic"], sample_prompt=" ", max_steps=6))
    assert "magic" in error.value.problems["techniques"]
    assert "sample_prompt" in error.value.problems
    with pytest.raises(ConfigError) as error:
        validate_request(CompareRequest(techniques=["lora16"], max_steps=0))
    assert "training.max_steps" in error.value.problems
    with pytest.raises(ConfigError) as error:
        validate_request(CompareRequest(techniques=[]))
    assert "at least one" in error.value.problems["techniques"]


def test_a_missing_model_is_refused_before_anything_is_queued(tmp_path):
    queue = CompareQueue(RunManager(tmp_path / "runs"))
    with pytest.raises(CompareError, match="offline"):  # the Hub is unreachable here (HF_HUB_OFFLINE=1)
        queue.start(CompareRequest(techniques=["lora16"], model_source="nobody/no-such-model"))
    with pytest.raises(CompareError, match="neither"):
        queue.start(CompareRequest(techniques=["lora16"], model_source=str(tmp_path / "missing")))
    assert queue.list_ids() == [] and queue.manager.list_ids() == []


def test_each_technique_gets_the_same_data_seed_and_steps(wide_model_dir, qa_rows_file):
    configs = validate_request(CompareRequest(techniques=list(TECHNIQUES), model_source=str(wide_model_dir),
                                              data_source=str(qa_rows_file), max_steps=3, seed=7))
    assert [c.lora.method for c in configs] == [t.method for t in TECHNIQUES.values()]
    assert [c.model.bits for c in configs] == [t.bits for t in TECHNIQUES.values()]
    assert [c.lora.init for c in configs] == [t.init for t in TECHNIQUES.values()]
    assert {(c.data.source, c.training.seed, c.training.max_steps, c.model.source) for c in configs} == {
        (str(qa_rows_file), 7, 3, str(wide_model_dir))}


@pytest.mark.trajectory
def test_comparison_orders_parameters_and_memory(tmp_path, wide_model_dir, qa_rows_file):
    queue = CompareQueue(RunManager(tmp_path / "runs"), poll_seconds=0.3)
    techniques = ["full", "ia3", "lora16", "lora8", "qlora4", "qlora4_loftq"]
    comparison_id = queue.start(CompareRequest(
        techniques=techniques, model_source=str(wide_model_dir), data_source=str(qa_rows_file), max_steps=2,
        max_seq_length=64, batch_size=2, max_samples=20, learning_rate=0.01, sample_prompt="Say hi."))
    state = queue.wait(comparison_id, timeout=400)
    by_technique = {item["technique"]: row for item, row in zip(state["items"], results(queue.manager, state))}
    rows = {TECHNIQUES[key].method + str(TECHNIQUES[key].bits): row for key, row in by_technique.items()
            if key != "qlora4_loftq"}
    assert state["state"] == "completed", json.dumps(state["items"], indent=1)[:2000]
    assert all(row["state"] == "completed" for row in rows.values()), rows

    params = {key: row["trainable params"] for key, row in rows.items()}
    assert params["ia3" + "16"] < params["lora16"] < params["full32"], params
    assert rows["full32"]["trainable %"] == 100.0
    assert params["lora16"] == params["lora8"] == params["lora4"]  # the bit width does not change what trains
    linear = {key: row["block linears (MB)"] for key, row in rows.items()}
    assert linear["lora4"] < linear["lora8"] < linear["lora16"] < linear["full32"], linear

    for row in rows.values():
        assert row["peak memory (MB)"] > 0 and row["s/step"] > 0 and row["tokens/s"] > 0
        assert row["saved weights (MB)"] > 0 and row["sample answer"] is not None
        assert math.isclose(row["perplexity"], math.exp(row["val loss"]), rel_tol=1e-3)
    # A full fine-tune saves the whole model, an adapter a sliver of it.
    assert rows["full32"]["saved weights (MB)"] > 20 * rows["lora16"]["saved weights (MB)"]
    full_dir = queue.manager.run_dir(rows["full32"]["run id"])
    assert (full_dir / "model" / "model.safetensors").is_file() and not (full_dir / "adapter").exists()
    # Every technique is a normal run in the history, and every one of them is in the loss plot.
    assert {r["run id"] for r in rows.values()} <= set(queue.manager.list_ids())
    assert {label for _, _, label in loss_points(queue.manager, state)} == {TECHNIQUES[t].label for t in techniques}
    assert progress(state, queue.manager)[:2] == (6, 6)
    # Same data, seed and steps: LoftQ's adapter starts closer to the full-precision weights, and says what it cost.
    default, loftq = by_technique["qlora4"], by_technique["qlora4_loftq"]
    assert 0 < loftq["step-0 weight error (%)"] < default["step-0 weight error (%)"]
    assert loftq["init (s)"] is not None and default["init (s)"] is None


def test_stop_skips_the_techniques_still_waiting(tmp_path, wide_model_dir, qa_rows_file):
    queue = CompareQueue(RunManager(tmp_path / "runs"), poll_seconds=0.2)
    comparison_id = queue.start(CompareRequest(
        techniques=["lora16", "ia3"], model_source=str(wide_model_dir), data_source=str(qa_rows_file),
        max_steps=500, max_seq_length=64, max_samples=20))
    wait_until(lambda: queue.load(comparison_id)["items"][0]["run_id"], "the first comparison started its run")
    # A second comparison meanwhile: accepted, its first run waits in the job queue behind the one training.
    second = queue.start(CompareRequest(techniques=["ia3"], model_source=str(wide_model_dir),
                                        data_source=str(qa_rows_file), max_steps=1, max_seq_length=64))
    waiting = wait_until(lambda: queue.load(second)["items"][0]["run_id"], "the second comparison queued its run")
    assert queue.manager.status(waiting)["state"] == "waiting"
    queue.stop(second)  # its run never started: Stop takes it out of the queue
    assert queue.wait(second, timeout=60)["items"][0]["state"] == "cancelled"
    queue.stop(comparison_id)
    state = queue.wait(comparison_id, timeout=120)
    assert state["state"] == "stopped"
    assert [item["state"] for item in state["items"]] == ["stopped", "skipped"]
    assert state["items"][1]["run_id"] is None


def test_a_restarted_app_picks_the_queue_up_again(tmp_path, wide_model_dir, qa_rows_file):
    """The worker thread died with the app while a run was training: a new queue object (the restarted app's)
    waits for that run, keeps its result, and skips what was never started once Stop was asked for."""
    manager = RunManager(tmp_path / "runs")
    first = CompareQueue(manager, poll_seconds=0.2)
    first._spawn_worker = lambda comparison_id: None  # the app "dies" before its worker does anything
    comparison_id = first.start(CompareRequest(techniques=["ia3", "lora16"], model_source=str(wide_model_dir),
                                               data_source=str(qa_rows_file), max_steps=1, max_seq_length=64,
                                               max_samples=20))
    from finetune.core.config import from_dict

    state = first.load(comparison_id)
    run_id = manager.start(from_dict(state["items"][0]["config"]))  # the run it had started before dying
    first._update_item(comparison_id, 0, run_id=run_id, state="running")
    first.stop(comparison_id)
    manager.wait(run_id, timeout=120)

    restarted = CompareQueue(RunManager(tmp_path / "runs"), poll_seconds=0.2)
    restarted.ensure_worker(comparison_id)
    state = restarted.wait(comparison_id, timeout=60)
    assert [item["state"] for item in state["items"]] == ["stopped", "skipped"]
    assert state["state"] == "stopped" and state["items"][0]["run_id"] == run_id


# --- the Train tab's run history: each run by its stage and its own headline metric ------------------------------

def _finished_run(root, run_id: str, stage: str, rows: list[dict]) -> None:
    """A run folder as a finished run leaves it: its config, its metrics as the callback writes them, status."""
    from finetune.core.config import RunConfig, save_config
    from finetune.core.run_status import write_status
    from finetune.core.run_folder import METRICS_FILE

    folder = root / run_id
    folder.mkdir(parents=True)
    save_config(RunConfig(stage=stage), folder / "config.yaml")
    (folder / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    write_status(folder, state="completed", step=rows[-1]["step"], max_steps=rows[-1]["step"], duration=1.0)


def test_history_shows_each_stage_with_its_headline_and_never_overlays_stages(tmp_path):
    from components.train_runs import compare_runs, run_history

    root = tmp_path / "runs"
    _finished_run(root, "sft-1", "sft", [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0},
                                         {"step": 2, "eval_loss": 2.2}])
    # transformers 5 puts train_runtime on every training log row; the summary row is the one with train_loss.
    _finished_run(root, "sft-2", "sft", [{"step": 1, "loss": 2.7, "train_runtime": 1.0},
                                         {"step": 2, "loss": 2.4, "train_runtime": 2.0},
                                         {"step": 2, "train_runtime": 2.1, "train_loss": 2.55}])
    _finished_run(root, "reward-1", "reward", [{"step": 1, "loss": 0.69, "accuracy": 0.5},
                                               {"step": 2, "eval_loss": 0.6, "eval_accuracy": 0.75},
                                               {"step": 2, "train_runtime": 3.0, "train_loss": 0.65}])
    _finished_run(root, "dpo-1", "dpo", [{"step": 1, "loss": 0.69, "rewards/margins": 0.0},
                                         {"step": 2, "loss": 2e-7, "rewards/margins": 26.5}])
    manager = RunManager(root)

    table, *_ = run_history(manager)
    by_id = {row["run id"]: row for row in table.to_dict("records")}
    assert {run_id: row["stage"] for run_id, row in by_id.items()} == {
        "sft-1": "sft", "sft-2": "sft", "reward-1": "reward", "dpo-1": "dpo"}
    assert (by_id["sft-1"]["headline metric"], by_id["sft-1"]["headline value"]) == ("eval loss", 2.2)
    assert (by_id["sft-2"]["headline metric"], by_id["sft-2"]["headline value"]) == ("train loss", 2.4)
    assert (by_id["reward-1"]["headline metric"], by_id["reward-1"]["headline value"]) == ("held-out accuracy", 0.75)
    assert by_id["dpo-1"]["headline metric"] == "train reward margin" and by_id["dpo-1"]["headline value"] == 26.5
    assert by_id["dpo-1"]["final loss"] == 2e-7  # not rounded away to 0

    *_, plot = compare_runs(manager, ["sft-1", "reward-1", "sft-2", "dpo-1"])
    assert _plotted_runs(plot.value) == {"sft-1", "sft-2"}
    assert "reward-1 (reward)" in plot.title and "dpo-1 (dpo)" in plot.title
    *_, plot = compare_runs(manager, ["dpo-1", "sft-1"])  # the first run picked decides the stage shown
    assert _plotted_runs(plot.value) == {"dpo-1"} and "sft-1 (sft)" in plot.title


def _plotted_runs(value) -> set[str]:
    import pandas as pd

    if isinstance(value, pd.DataFrame):
        return set(value["run"])
    column = value["columns"].index("run")  # a LinePlot's value: {"columns": [...], "data": [[...], ...]}
    return {row[column] for row in value["data"]}


def test_the_expected_time_shows_before_start(tmp_path, tiny_model_dir, qa_rows_file):
    """A walk found the tab silent about time until a comparison ran: the form's estimate shows on page load and
    follows the form (the same text Start gives)."""
    import gradio as gr

    from components.compare_tab import build_compare_tab, estimate_before_start, estimate_text
    from components.page_loads import answer_page_loads

    queue = CompareQueue(RunManager(tmp_path / "runs"))
    form = dict(techniques=["lora16", "ia3"], model_source=str(tiny_model_dir), data_source=str(qa_rows_file),
                max_steps=3, max_seq_length=64, batch_size=2, max_samples=20, learning_rate=0.01, seed=0,
                sample_prompt="Say hi.")
    shown = estimate_before_start(queue, **form)
    assert shown == estimate_text(queue, CompareRequest(**{**form, "max_samples": 20}))
    assert shown.startswith("No time estimate yet")  # nothing of this model has run here
    assert "Tick at least one technique" in estimate_before_start(queue, **{**form, "techniques": []})
    with gr.Blocks() as page:
        tab = build_compare_tab(queue)
        answer_page_loads(page)  # as the app does once its tabs are built
    estimate_id = tab["estimate"]._id
    triggers = {trigger[1] for dep in page.config["dependencies"] if estimate_id in dep["outputs"]
                for trigger in dep["targets"]}
    assert {"load", "change"} <= triggers
    page.close()
