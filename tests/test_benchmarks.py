"""Benchmarks through lm-evaluation-harness: the bundled task on the tiny Llama and on the embedded model with an
adapter, the table against the harness's own numbers, Stop, the cache, and every refusal before a child starts.

Nothing is mocked: the real harness scores real models in a real child process. The adapters are built with peft
directly (random, non-zero LoRA B) instead of trained: what is tested is the benchmark path, not training.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from helpers import wait_until
from finetune.core.config import EMBEDDED_MODEL, from_dict, save_config
from finetune.core.run_folder import ADAPTER_DIR, CONFIG_COPY
from finetune.services.benchmarks import (BUNDLED_ITEMS, BUNDLED_TASK, MIN_ITEMS, BenchmarkError, BenchmarkService,
                                          check_limit, main, paired_difference, verdict)


def save_random_lora(base_dir: Path | str, run_dir: Path, model_cfg: dict, seed: int = 0) -> Path:
    """A LoRA adapter with random (non-zero) B saved as a LoRA Lab run: <run>/adapter + its config copy."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                      task_type="CAUSAL_LM")
    folder = run_dir / ADAPTER_DIR
    get_peft_model(model, lora).save_pretrained(folder)
    cfg = from_dict({"model": model_cfg, "lora": {"rank": 4, "alpha": 8}})
    save_config(cfg, folder / CONFIG_COPY)
    return folder


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, tiny_model_dir) -> Path:
    """runs/tiny-lora: a random LoRA on the tiny Llama at 32 bits (as if trained there), a finished run."""
    from finetune.core.run_status import write_status

    root = tmp_path_factory.mktemp("bench-runs")
    save_random_lora(tiny_model_dir, root / "tiny-lora", {"source": str(tiny_model_dir), "bits": 32})
    write_status(root / "tiny-lora", state="completed")
    return root


def harness_scores(model_args: dict, limit: int) -> dict:
    """The bundled task run by the harness on its own (its HF model loads from the folder, adapter via peft=)."""
    from lm_eval import simple_evaluate

    from finetune.services.benchmarks import task_manager

    out = simple_evaluate(model="hf", model_args={"device": "cpu", "dtype": "float32", **model_args},
                          tasks=[BUNDLED_TASK], limit=limit, batch_size=8, task_manager=task_manager([BUNDLED_TASK]),
                          bootstrap_iters=1000)
    return out["results"][BUNDLED_TASK]


def wait_for_end(service: BenchmarkService, job_id: str) -> dict:
    status = wait_until(lambda: service.status(job_id).get("state") in ("completed", "failed", "stopped")
                        and not service.running(job_id), "the benchmark child to end", timeout=900)
    status = service.status(job_id)
    assert status["state"] == "completed", (status, (service.job(job_id).folder / "benchmark.log").read_text()[-3000:])
    return status


def test_tiny_model_table_equals_the_harness_run_on_its_own(tiny_runs, tiny_model_dir, tmp_path):
    service = BenchmarkService(tiny_runs, tmp_path / "bench")  # its own cache: the first plan finds nothing cached
    plan = service.plan([BUNDLED_TASK], 20, adapters=["tiny-lora"])
    assert [u.adapter_dir is None for u in plan.units] == [True, False]   # the base first, at the adapter's bits
    assert plan.units[0].model["bits"] == 32 and not any(u.cached for u in plan.units)
    assert plan.seconds > 0 and "2 harness runs" in plan.estimate_text()
    job_id = service.start(plan)
    wait_for_end(service, job_id)

    rows = {row.metric: row for row in service.table(job_id)}
    assert set(rows) == {"acc", "acc_norm"}
    base = harness_scores({"pretrained": str(tiny_model_dir)}, 20)
    tuned = harness_scores({"pretrained": str(tiny_model_dir), "peft": str(tiny_runs / "tiny-lora" / ADAPTER_DIR)}, 20)
    for metric, row in rows.items():
        assert row.base == pytest.approx(base[f"{metric},none"]) and row.tuned == pytest.approx(tuned[f"{metric},none"])
        assert row.base_stderr == pytest.approx(base[f"{metric}_stderr,none"])
        assert row.tuned_stderr == pytest.approx(tuned[f"{metric}_stderr,none"])
        assert row.difference == pytest.approx(row.tuned - row.base) and row.items == 20
        assert row.stderr_kind == "paired" and row.adapter == "tiny-lora"

    # Asked again: every unit comes from the cache and no child starts.
    again = service.plan([BUNDLED_TASK], 20, adapters=["tiny-lora"])
    assert all(u.cached for u in again.units) and "cached" in again.estimate_text()
    assert "no verdict" not in again.estimate_text()
    assert "With 8 questions per task the table gives no verdict: it needs at least 10." in service.plan(
        [BUNDLED_TASK], 8, adapters=["tiny-lora"]).estimate_text()  # said before the learner waits for nothing
    second = service.start(again)
    assert service.status(second)["state"] == "completed" and not service.running(second)
    assert [(r.base, r.tuned) for r in service.table(second)] == [(r.base, r.tuned) for r in rows.values()]
    # A different limit is a different result.
    assert not any(u.cached for u in service.plan([BUNDLED_TASK], 21, adapters=["tiny-lora"]).units)


def test_the_section_starts_polls_and_refuses(tiny_runs, tmp_path, monkeypatch):
    import gradio as gr

    from components.benchmark_section import (TABLE_COLUMNS, build_benchmark_section, poll_benchmark, start_benchmark,
                                              stop_benchmark)
    from finetune.services.runs import RunManager

    manager, service = RunManager(tiny_runs), BenchmarkService(tiny_runs, tmp_path / "bench")
    with pytest.raises(gr.Error, match="No saved adapter for run"):   # a typed folder is not a run
        start_benchmark(manager, service, [str(tiny_runs / "tiny-lora")], "", 4, [BUNDLED_TASK], 20)
    with pytest.raises(gr.Error, match="Limit must be at least 1"):
        start_benchmark(manager, service, ["tiny-lora"], "", 4, [BUNDLED_TASK], 0)
    job_id, message = start_benchmark(manager, service, ["tiny-lora"], "", 4, [BUNDLED_TASK], 20.0)
    assert job_id in message
    wait_until(lambda: not service.running(job_id) and service.status(job_id)["state"] == "completed", "the job",
               timeout=900)
    progress, table, _ = poll_benchmark(service, job_id)
    assert "completed" in progress and list(table.columns) == TABLE_COLUMNS
    assert sorted(table["metric"]) == ["acc", "acc_norm"]
    assert list(table["base"]) == pytest.approx([row.base for row in service.table(job_id)])
    assert stop_benchmark(service, job_id) == "No benchmark is running."
    # The course's evaluation step quotes the learner's own newest check beside PEFT's promise.
    from components.course_tab import forgetting_markdown

    learn = forgetting_markdown(service)
    first = service.table(job_id)[0]
    assert f"base {first.base:.3f}" in learn and first.verdict in learn and "tiny-lora" in learn
    assert "no forgetting check yet" in forgetting_markdown(BenchmarkService(tiny_runs, tiny_runs / "empty"))

    with gr.Blocks() as demo:
        build_benchmark_section(manager, service)
    names = {getattr(fn, "api_name", None) for fn in demo.fns.values()}
    assert {"benchmark_runs", "benchmark_preset", "benchmark_estimate", "benchmark_start", "benchmark_stop",
            "benchmark_poll"} <= names


def test_embedded_model_with_a_4bit_adapter_matches_the_harness_output(tmp_path, embedded_dir):
    """The CI run on the real model: base and adapter at 4 bits (as a QLoRA run trains), 12 items each."""
    runs = tmp_path / "runs"
    save_random_lora(embedded_dir, runs / "qlora", {"source": EMBEDDED_MODEL, "bits": 4})
    service = BenchmarkService(runs, tmp_path / "bench")
    plan = service.plan([BUNDLED_TASK], 12, adapters=["qlora"], model=EMBEDDED_MODEL)
    assert [u.model["bits"] for u in plan.units] == [4, 4]
    job_id = service.start(plan)
    wait_for_end(service, job_id)

    # The harness's own result JSON of each unit, as the child saved it.
    base, tuned = (json.loads(service.job(job_id).result_path(i).read_text()) for i in (0, 1))
    assert base["n-samples"][BUNDLED_TASK]["effective"] == 12
    rows = {row.metric: row for row in service.table(job_id)}
    for metric, row in rows.items():
        assert row.base == base["results"][BUNDLED_TASK][f"{metric},none"]
        assert row.tuned == tuned["results"][BUNDLED_TASK][f"{metric},none"]
        assert row.base_stderr == base["results"][BUNDLED_TASK][f"{metric}_stderr,none"]
        base_items = [s[metric] for s in base["samples"][BUNDLED_TASK]]
        tuned_items = [s[metric] for s in tuned["samples"][BUNDLED_TASK]]
        assert row.base == pytest.approx(sum(base_items) / 12) and row.tuned == pytest.approx(sum(tuned_items) / 12)
    # The adapter changed the model: its answer choices score differently (log-likelihoods, not just accuracy).
    assert [s["filtered_resps"] for s in base["samples"][BUNDLED_TASK]] != \
        [s["filtered_resps"] for s in tuned["samples"][BUNDLED_TASK]]


def test_a_benchmark_run_can_be_stopped(tmp_path, embedded_dir):
    service = BenchmarkService(tmp_path / "runs", tmp_path / "bench")
    plan = service.plan([BUNDLED_TASK], BUNDLED_ITEMS, model=EMBEDDED_MODEL, bits=32)
    job_id = service.start(plan)
    wait_until(lambda: service.status(job_id).get("requests_done", 0) > 0, "the first batch scored", timeout=600)
    service.request_stop(job_id)
    wait_until(lambda: not service.running(job_id), "the child to end after Stop", timeout=120)
    status = service.status(job_id)
    assert status["state"] == "stopped" and status["requests_done"] < status["requests_total"]
    assert not service.job(job_id).result_path(0).exists()          # no half result
    assert not list((tmp_path / "bench" / "cache").glob("*.json"))  # and nothing cached from it
    assert not service.plan([BUNDLED_TASK], BUNDLED_ITEMS, model=EMBEDDED_MODEL, bits=32).units[0].cached


# --- refused before a child starts -----------------------------------------------------------------------------

def refused(service: BenchmarkService, *args, **kwargs) -> str:
    with pytest.raises(BenchmarkError) as error:
        service.plan(*args, **kwargs)
    assert not (service.root / "jobs").exists()   # nothing was started
    return str(error.value)


def test_unknown_task_is_refused_by_name(tmp_path):
    message = refused(BenchmarkService(tmp_path, tmp_path / "bench"), ["arc_easyy"], 10, hub=True)
    assert "Unknown benchmark task 'arc_easyy'" in message and "arc_easy" in message  # a close name is offered


def test_a_task_that_needs_the_hub_is_refused_offline(tmp_path):
    message = refused(BenchmarkService(tmp_path, tmp_path / "bench"), [BUNDLED_TASK, "arc_easy"], 10, hub=False)
    assert "Cannot reach the Hugging Face Hub" in message and "'arc_easy' (data: allenai/ai2_arc)" in message
    assert BUNDLED_TASK in message
    # conftest sets HF_HUB_OFFLINE=1: the real reachability check says the same.
    assert "Cannot reach the Hugging Face Hub" in refused(BenchmarkService(tmp_path, tmp_path / "b"), ["hellaswag"], 5)


@pytest.mark.parametrize("limit", [0, -3, "abc", 2.5, None, ""])
def test_a_limit_below_one_or_not_whole_is_refused(tmp_path, limit):
    message = refused(BenchmarkService(tmp_path, tmp_path / "bench"), [BUNDLED_TASK], limit)
    assert message.startswith("Limit must be")


def test_limit_accepts_what_the_number_box_sends():
    assert check_limit(20.0) == 20 and check_limit("7") == 7 and check_limit(1) == 1


def test_an_adapter_trained_on_another_base_is_refused(tiny_runs, tmp_path):
    message = refused(BenchmarkService(tiny_runs, tmp_path / "bench"), [BUNDLED_TASK], 10, adapters=["tiny-lora"],
                      model=EMBEDDED_MODEL)
    assert "Adapter 'tiny-lora' was trained on" in message and f"not on the chosen model '{EMBEDDED_MODEL}'" in message


def test_a_missing_adapter_is_refused(tmp_path):
    message = refused(BenchmarkService(tmp_path, tmp_path / "bench"), [BUNDLED_TASK], 10, adapters=["no-such-run"])
    assert "No adapter found for 'no-such-run'" in message


def test_cli_refuses_with_the_same_message_and_exit_code_2(tmp_path, capsys):
    assert main(["--task", BUNDLED_TASK, "--limit", "0", "--out", str(tmp_path / "bench")]) == 2
    assert "error: Limit must be at least 1 item per task, got 0." in capsys.readouterr().err
    assert main(["--forgetting-check", "--estimate-only", "--out", str(tmp_path / "bench"),
                 "--model", EMBEDDED_MODEL, "--bits", "32"]) == 0
    # Offline the preset is the bundled task; its default limit (100) is capped by the task's 60 items.
    assert f"1 harness run ({BUNDLED_ITEMS * 4} answer choices to score)" in capsys.readouterr().out


# --- the verdict ---------------------------------------------------------------------------------------------

def test_paired_error_sees_a_consistent_change_that_the_combined_error_would_miss():
    # 40 items: the adapter gets 4 more right and none wrong that the base got right.
    base = {i: float(i % 2) for i in range(40)}
    tuned = {i: 1.0 if i < 8 else base[i] for i in range(40)}
    difference, stderr, n = paired_difference(base, tuned)
    assert n == 40 and difference == pytest.approx(4 / 40)
    combined = math.sqrt(2 * (0.5 * 0.5 / 39))   # two independent accuracies near 0.5
    assert stderr < combined
    assert verdict(difference, stderr, n).startswith("better")
    assert verdict(-difference, stderr, n).startswith("worse")
    assert verdict(difference, combined, n) == "no measurable change"


def test_no_verdict_on_too_few_items():
    assert verdict(0.5, 0.01, MIN_ITEMS - 1).startswith("no verdict")
    assert verdict(0.0, 0.0, MIN_ITEMS) == "no measurable change"
