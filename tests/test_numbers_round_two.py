"""Issue 36, "every number a learner sees is right, round two": each wrong number or claim a learner's walk found,
checked through the real handlers (real trainers on the tiny model, real SQLite, the real data readers)."""

from __future__ import annotations

import json

import pytest

from helpers import StepClock, preference_stage_config, write_jsonl
from finetune.core.config import load_config
from finetune.core.run_status import read_metrics, read_status
from finetune.services.runs import RunManager
from finetune.train import run


@pytest.fixture(scope="module")
def short_dpo(tiny_model_dir, pairs_file, tmp_path_factory):
    """A DPO run of 2 steps with the presets' 5% warmup, a checkpoint after each step: its run folder."""
    folder = tmp_path_factory.mktemp("dpo") / "runs" / "short-dpo"
    assert run(preference_stage_config(tiny_model_dir, pairs_file, "dpo", bits=32, max_steps=2, save_steps=1,
                                       warmup_ratio=0.05), folder) == 0, (folder / "train.log").read_text()
    return folder


# --- 1. a stage's "before -> after" is measured, not the end value twice -------------------------------------------

def test_dpo_headline_starts_from_a_measured_step_0_margin(short_dpo):
    """Before training the policy is its reference, so the held-out margin at step 0 is 0 by definition; the
    status line shows that measured start, not the end value as its own start ('0.462 -> 0.462')."""
    from components.rlhf_runs import stage_status_text

    rows = read_metrics(short_dpo)
    margins = [(r["step"], r["eval_rewards/margins"]) for r in rows if "eval_rewards/margins" in r]
    assert margins[0][0] == 0 and margins[0][1] == pytest.approx(0.0, abs=1e-6)  # measured before any step
    text = stage_status_text("short-dpo", read_status(short_dpo), rows, "eval_rewards/margins", "held-out margin")
    assert f"held-out margin: 0.000 (before training) → {margins[-1][1]:.3f} (step {margins[-1][0]})" in text


def test_a_curve_without_a_step_0_point_says_its_start_is_unmeasured():
    from components.rlhf_runs import stage_status_text

    rows = [{"step": 2, "eval_rewards/margins": 0.462}, {"step": 4, "eval_rewards/margins": 0.5}]
    text = stage_status_text("r", {"state": "completed"}, rows, "eval_rewards/margins", "held-out margin")
    assert "0.500 at step 4 (not measured before training)" in text and "0.462 →" not in text
    one = stage_status_text("r", {"state": "completed"}, rows[:1], "eval_rewards/margins", "held-out margin")
    assert "0.462 → 0.462" not in one and "0.462 at step 2 (not measured before training)" in one


# --- 3. a capped run keeps no step at learning rate 0, and its Steps box says what it does ---------------------------

def test_a_two_step_run_learns_at_its_first_step(short_dpo):
    """The presets' 5% warmup on 2 steps rounded up to 1 warmup step, and a linear warmup's first step runs at
    learning rate 0: step 1 left the adapter at its start (B = 0). Scaled to the run, 2 steps get no warmup."""
    from safetensors.torch import load_file

    weights = load_file(short_dpo / "checkpoints" / "checkpoint-1" / "adapter_model.safetensors")
    lora_b = [tensor for name, tensor in weights.items() if "lora_B" in name]
    assert lora_b and any(tensor.abs().max() > 0 for tensor in lora_b)  # step 1 moved the adapter


def test_warmup_is_whole_steps_scaled_to_the_run():
    from finetune.core.config import TrainingConfig
    from finetune.stages.common import warmup_steps

    assert warmup_steps(TrainingConfig(max_steps=2, warmup_ratio=0.05)) == 0
    assert warmup_steps(TrainingConfig(max_steps=100, warmup_ratio=0.05)) == 5
    assert warmup_steps(TrainingConfig(max_steps=-1, num_epochs=1, warmup_ratio=0.05)) == 0.05  # trainer's count


def test_the_steps_box_says_a_capped_run_does_fewer_steps(tiny_model_dir, tmp_path, monkeypatch):
    from components.rlhf_form import preset
    from components.rlhf_runs import start_stage, steps_box

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "uploads"))  # the path gate takes only gradio's uploads
    (tmp_path / "uploads").mkdir()
    rows = [{"prompt": f"Question {i}?", "chosen": f"Lab note {i}.", "rejected": "No."} for i in range(8)]
    data = write_jsonl(tmp_path / "uploads" / "few.jsonl", rows)
    manager = RunManager(tmp_path / "runs")
    shown = preset("dpo").training.max_steps
    run_id, message = start_stage(manager, None, "policy", model_kind="Local folder", model_source=str(tiny_model_dir),
                                  data_kind="Uploaded file", data_file=str(data), policy_max_steps=shown,
                                  batch_size=2)
    manager.stop(run_id)
    steps = load_config(manager.run_dir(run_id) / "config.yaml").training.max_steps
    assert steps < shown and f"Steps: {steps} instead of the preset's {shown}" in message
    info = steps_box(manager, run_id, shown)["info"]  # a gr.update
    assert f"does {steps} steps, not {shown}" in info
    assert steps_box(manager, run_id, steps)["info"] is None  # a box that shows the run's steps needs no note


# --- 2. the chat's time-limit notice is shown, stored beside the answer, and never exported ---------------------------



def test_a_cut_answer_is_stored_as_the_model_wrote_it_and_exported_without_the_notice(policy_runs, tmp_path):
    from components.chat_tab import chat
    from finetune.services.chat import ChatEngine, budget_note, normalize_history
    from finetune.services.feedback import FeedbackStore
    from finetune.services.feedback_export import write_pairs, write_thumbs

    engine = ChatEngine(max_seconds=6, clock=StepClock())  # about 6 tokens, then the time limit cuts
    store = FeedbackStore(tmp_path / "feedback.db")
    left, right, _, turn = list(chat(policy_runs, engine, store, "Tell me a story", "sft-run", [], [], 400, 0.0,
                                     0.9, 0, False, None, "base"))[-1]
    assert right[-1]["content"].endswith(budget_note(6))  # the learner sees why the answer stops
    stored = store._rows("SELECT side, response, notice FROM generations", ())
    assert {row["side"] for row in stored} == {"base", "tuned"}
    for row in stored:
        assert "[cut:" not in row["response"] and row["response"]
        assert row["notice"] == budget_note(6).strip()
    store.add_preference(turn["gen"]["left"], turn["gen"]["right"], "second")
    store.add_correction(turn["gen"]["right"], "A corrected answer.")
    exported = (tmp_path / "pairs.jsonl")
    assert write_pairs(store, exported) == 2 and "[cut:" not in exported.read_text(encoding="utf-8")
    assert write_thumbs(store, tmp_path / "thumbs.jsonl") == 0
    # A follow-up turn feeds the history back to the model: without the notice, which the model never said.
    assert all("[cut:" not in m["content"] for m in normalize_history(right))
    store.close()


def test_answers_stored_before_the_notice_column_get_their_notice_moved_out(tmp_path):
    from finetune.services.chat import budget_note
    from finetune.services.feedback import FeedbackStore
    from finetune.services.feedback_export import pair_rows

    old = FeedbackStore(tmp_path / "feedback.db")
    ids = old.record_turn(model="m", adapter="a", prompt="Q?", base_history=[], tuned_history=[], settings={},
                          base_response="Short." + budget_note(600), tuned_response="Lab note." + budget_note(600))
    old.add_preference(ids["tuned"], ids["base"], "first")
    old.close()
    store = FeedbackStore(tmp_path / "feedback.db")  # reopened: the notices move to their own column
    pair = pair_rows(store)[0]
    assert (pair["chosen"][0]["content"], pair["rejected"][0]["content"]) == ("Lab note.", "Short.")
    assert {row["notice"] for row in store._rows("SELECT notice FROM generations", ())} == {budget_note(600).strip()}
    store.close()


# --- 10. chat: a CPU-sized default and the expected time before sending ---------------------------------------------

def test_chat_defaults_to_a_cpu_sized_answer_and_says_how_long_one_takes(policy_runs):
    import gradio as gr

    from components.chat_tab import build_chat_tab, expected_time
    from finetune.services.chat import ChatEngine

    engine = ChatEngine()
    assert not engine.profile.is_cuda
    with gr.Blocks():
        ui = build_chat_tab(policy_runs, engine)
    assert ui["max_new_tokens"].value == 64  # 128 on a busy CPU ran into the 600 s limit
    assert "the first answer measures" in expected_time(engine, 64)  # nothing measured yet: no guess
    from components.chat_tab import chat

    list(chat(policy_runs, engine, None, "Hello there", "sft-run", [], [], 12, 0.0, 0.9, 0, False, None, "base"))
    pace = engine.seconds_per_token
    assert pace is not None and pace > 0
    text = expected_time(engine, 400)
    from components.shared import duration

    assert f"about **{duration(400 * pace)}**" in text and f"{pace:.2f} s per token" in text
    engine.max_seconds = 200 * pace  # a limit the 400-token answer would pass: said before sending
    assert "longer than the server's limit" in expected_time(engine, 400)
    assert "longer than the server's limit" not in expected_time(engine, 100)


def test_the_pace_follows_the_latest_answers():
    from finetune.services.chat import ChatEngine

    engine = ChatEngine()
    engine._record_pace(10.0, 100)  # 0.1 s a token on a quiet machine
    for _ in range(4):
        engine._record_pace(100.0, 100)  # then the machine got busy: 1 s a token
    assert engine.seconds_per_token > 0.9  # a lifetime average would still say 0.82


# --- 4. a correction counts once per thing the person did -----------------------------------------------------------

def test_one_correction_for_both_answers_counts_once(tmp_path):
    from components.chat_feedback import submit_feedback
    from components.feedback_tab import counts_text
    from finetune.services.feedback import FeedbackStore
    from finetune.services.feedback_export import pair_rows

    store = FeedbackStore(tmp_path / "feedback.db")
    ids = store.record_turn(model="m", adapter="a", prompt="Q?", base_history=[], tuned_history=[], settings={},
                            base_response="No idea.", tuned_response="Maybe.")
    turn = {"gen": {"left": ids["base"], "right": ids["tuned"]}, "arena": False}
    message = submit_feedback(store, turn, None, "both miss it", "🧪 Lab note: the answer.", "both")[0]
    assert "corrected answer" in message
    text = counts_text(store)
    assert "**1** correction (replacing 2 answers)" in text and "**1** comments" in text  # not "2 corrected answers"
    assert len(pair_rows(store)) == 2  # still one pair per replaced answer for the RLHF step
    submit_feedback(store, turn, None, None, "Another fix.", "right")
    assert "**2** corrections (replacing 3 answers)" in counts_text(store)
    store.close()


# --- 6. a refusal for malformed lines quotes the rows a run could really use -----------------------------------------

def _file_with_bad_and_incomplete_rows(folder) -> object:
    """40 lines: 4 not JSON, 4 without an answer, 32 usable (the walk's file: 'the 36 good rows', 32 usable)."""
    lines = [json.dumps({"prompt": f"question {i}", "completion": f"answer {i}"}) for i in range(32)]
    lines += [json.dumps({"prompt": f"question {i}", "completion": ""}) for i in range(32, 36)]
    lines += ['{"prompt": "broken"'] * 4
    path = folder / "partly.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_the_malformed_lines_refusal_quotes_the_usable_rows_the_preview_counts(tmp_path):
    from finetune.core.config import DataConfig, RunConfig
    from finetune.core.data import preview_report
    from finetune.services.admission import check_sources

    path = _file_with_bad_and_incomplete_rows(tmp_path)
    data = DataConfig(source=str(path), validation_fraction=0.1)
    report = preview_report(data)
    usable = report.train_rows + report.held_out_rows
    assert usable == 32
    expected = "to train on the 32 usable rows (of the 36 readable ones; the other 4 lack a field a row needs"
    assert expected in report.refusal
    with pytest.raises(Exception) as caught:  # what Start answers (a ConfigError on data.source)
        check_sources(RunConfig(data=data))
    assert expected in str(caught.value) and "36 good rows" not in str(caught.value)


def test_a_preference_file_refusal_counts_usable_pairs(tmp_path):
    from finetune.core.config import DataConfig
    from finetune.core.data import DataError
    from finetune.core.preference import load_preferences

    rows = [json.dumps({"prompt": f"q{i}", "chosen": "good", "rejected": "bad"}) for i in range(8)]
    rows += [json.dumps({"prompt": "q8", "chosen": "same", "rejected": "same"}), '{"prompt": ']
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as caught:
        load_preferences(DataConfig(source=str(path)))
    assert "to train on the 8 usable rows (of the 9 readable ones; the other 1 lack" in str(caught.value)


# --- 9. no "± 0.000": an interval, or why there is none -------------------------------------------------------------

def _harness_result(task: str, scores: list[float]) -> dict:
    """A result as lm-evaluation-harness writes it: the metric, its standard error and per-item samples."""
    import statistics

    se = statistics.stdev(scores) / len(scores) ** 0.5
    return {"results": {task: {"acc_norm,none": sum(scores) / len(scores), "acc_norm_stderr,none": se}},
            "samples": {task: [{"doc_id": i, "filter": "none", "acc_norm": s} for i, s in enumerate(scores)]},
            "higher_is_better": {task: {"acc_norm": True}}}


def test_a_difference_with_no_spread_says_no_interval_can_be_estimated():
    from finetune.services.benchmarks import BenchmarkPlan, Unit, build_table, format_table

    scores = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    units = [Unit("base: m", {"source": "m", "bits": 32}, None, "t", 12, 48),
             Unit("adapter: run", {"source": "m", "bits": 32}, "/runs/run/adapter", "t", 12, 48)]
    plan = BenchmarkPlan(["t"], 12, units, 0.0)
    same = build_table(plan, {0: _harness_result("t", scores), 1: _harness_result("t", scores)})[0]
    assert same.difference_stderr == 0
    assert "± 0.000" not in same.interval_text() and "every one of the 12 items scored the same" in same.interval_text()
    assert "± 0.000" not in format_table([same])
    moved = build_table(plan, {0: _harness_result("t", scores),
                               1: _harness_result("t", [1.0 - s if i < 4 else s for i, s in enumerate(scores)])})[0]
    assert moved.interval_text().startswith("95% interval ± ") and moved.difference_stderr > 0


# --- 7. the Quantization tab says what the learner's numbers show --------------------------------------------------

def test_the_quantization_tab_states_its_measured_4_bit_cost_instead_of_a_claim(style_model_dir):
    """Real SmolLM2 layers (4 of them): 4-bit rounding moves their perplexity; the tab says by how much, in the
    learner's numbers, and claims nothing about matching 16-bit LoRA."""
    from components.quant_tab import LEARN_QUANT, run_comparison
    from finetune.core.hardware import detect

    assert "matches 16-bit" not in LEARN_QUANT
    steps = list(run_comparison(detect(), str(style_model_dir), ["fp32", "nf4-dq"], "bundled:course_qa",
                                "validation", 3, "Hi", 4))
    table, _, _, summary = steps[-1]
    rows = table.set_index("format")
    fp32, nf4 = rows.iloc[0]["perplexity"], rows.iloc[1]["perplexity"]
    change = f"{100 * (nf4 / fp32 - 1):+.1f}%"
    assert change in summary and "vs fp32" in summary and "matches" not in summary
    assert "fp32 memory" in summary and "Evaluate tab" in summary


# --- 12. the ETA is re-measured as the run goes ---------------------------------------------------------------------

class _Clock:
    """time.time for finetune.core.metrics, moved by the test: step durations are chosen, not measured."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_the_eta_follows_the_latest_steps_and_evaluation_not_the_runs_average(tmp_path, monkeypatch):
    """Ten quiet steps of 1 s, then the machine gets busy and steps take 4 s: the ETA charges the remaining steps
    at 4 s (a whole-run average said 2.1), the next evaluation at the latest one's duration, and status.json has
    it at the step end, not only at the next log row."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    import finetune.core.metrics as metrics

    clock = _Clock()
    monkeypatch.setattr(metrics.time, "time", clock)
    callback = metrics.MetricsCallback(tmp_path, final_eval=False)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), eval_strategy="steps", eval_steps=10,
                             logging_steps=1000, report_to=[])
    state, control = TrainerState(max_steps=40, global_step=0), TrainerControl()
    callback.on_train_begin(args, state, control)

    def steps(count: int, seconds: float) -> None:
        for _ in range(count):
            clock.now += seconds
            state.global_step += 1
            callback.on_step_end(args, state, control)

    def evaluation(seconds: float) -> None:
        callback._begin_evaluation(state)
        clock.now += seconds
        callback.on_log(args, state, control, logs={"eval_loss": 1.0})

    steps(10, 1.0)
    evaluation(150.0)
    steps(10, 4.0)
    evaluation(433.0)  # the busy machine's evaluation took far longer than the quiet one's
    steps(5, 4.0)
    eta = callback._eta(state, clock.now)
    assert eta["seconds_per_step"] == 4.0 and eta["seconds_per_eval"] == 433.0
    assert eta["eta"] == 4.0 * 15 + 433.0 * 1  # 15 steps left and the evaluation at step 30 (40 is the end)
    status = read_status(tmp_path)
    assert status["step"] == 25 and status["eta_seconds"] == eta["eta"]  # written at the step end


# --- 13. the CPU memory estimate against the peak a run measured -------------------------------------------------------

def test_a_finished_run_shows_its_estimate_beside_its_measured_peak_and_calibrates_the_next(tiny_model_dir, qa_file,
                                                                                            tmp_path):
    from components.train_preview import update_estimate
    from components.train_runs import poll_run
    from helpers import tiny_run_config
    from finetune.core.config import to_dict
    from finetune.core.estimate import estimate_run
    from finetune.core.hardware import detect

    manager = RunManager(tmp_path / "runs")
    cfg = tiny_run_config(tiny_model_dir, qa_file, bits=32, max_steps=2)
    assert run(cfg, manager.run_dir("tiny-memory")) == 0
    info = json.loads((manager.run_dir("tiny-memory") / "run_info.json").read_text())
    formula, peak = info["memory_formula_gb"], info["peak_memory_mb"] / 1024
    assert info["memory_device"] == "cpu" and formula > 0 and peak > 0
    text = poll_run(manager, "tiny-memory")[1]
    assert f"the formula estimated {formula:.2f} GB; the run measured {peak:.2f} GB" in text
    assert f"{peak / formula:.2f}x the formula" in text
    # Before any run the CPU estimate says what it leaves out; after one it is scaled by what was measured.
    _, alone = estimate_run(cfg, detect())
    assert "counts tensors only" in alone.verdict
    _, calibrated = estimate_run(cfg, detect(), [(formula, peak)])
    assert calibrated.total_gb == pytest.approx(alone.total_gb * peak / formula)
    form = {f"{section}_{key}": value for section, fields in to_dict(cfg).items() if isinstance(fields, dict)
            for key, value in fields.items()}
    shown = update_estimate(detect(), manager.root, **form)
    assert "the median measured peak / formula of 1 finished run on this machine" in shown, shown


# --- 5. a benchmark with no adapter says it scores the base only; its time is re-measured as it runs ----------------

def test_a_benchmark_without_an_adapter_says_it_scores_the_base_only(tmp_path):
    from components.benchmark_section import estimate_benchmark
    from finetune.services.benchmarks import BUNDLED_TASK, BenchmarkService

    service = BenchmarkService(tmp_path / "runs", tmp_path / "bench")
    text = estimate_benchmark(RunManager(tmp_path / "runs"), service, [], "", 4, [BUNDLED_TASK], 12)
    assert "No adapter picked: this scores the base model only" in text
    assert "rough default speed (no benchmark has been timed on this machine yet)" in text
    # Once a job has run here, the estimate is its measured loading plus its measured seconds per answer choice
    # (the walk's 60-question job was promised 32 s and took about 3.5 min: loading was not counted at all).
    from finetune.services.benchmarks import record_rate

    plan = service.plan([BUNDLED_TASK], 60)
    record_rate(service.cache_dir, plan.units[0], 99.0, 80, load_seconds=49.0)  # this machine, measured
    again = service.plan([BUNDLED_TASK], 60)
    assert again.seconds == pytest.approx(49.0 + 240 * 99.0 / 80)
    assert "1.24 s per answer choice this machine's last benchmark of this base measured" in again.estimate_text()


def test_a_running_benchmark_re_measures_its_time_left():
    """The plan's estimate came from an earlier job; while this one runs, the time left is its own pace."""
    from components.benchmark_section import progress_text
    from finetune.services.benchmarks import BenchmarkPlan, Unit

    units = [Unit("base: m", {"source": "m", "bits": 4}, None, "t", 60, 240),
             Unit("adapter: r", {"source": "m", "bits": 4}, "/runs/r/adapter", "t", 60, 240)]
    plan = BenchmarkPlan(["t"], 60, units, seconds=32.0)  # what a quiet machine's rate promised
    status = {"state": "running", "unit": 0, "units": 2, "unit_label": "base: m", "task": "t",
              "requests_done": 60, "requests_total": 240, "unit_started_at": 1000.0}
    text = progress_text(status, plan, now=1052.5)  # 60 choices in 52.5 s: 0.875 s each
    assert "0.88 s per answer choice, measured in this job" in text
    assert "about 6m 08s left" in text  # (180 + 240) x 0.875 s = 367.5 s, not the plan's 32 s


# --- 11. the Compare tab: a time estimate before and during; a second session finds the running comparison ----------

def test_a_comparison_says_its_time_before_and_while_it_runs_and_a_second_session_finds_it(tiny_model_dir, qa_file,
                                                                                            tmp_path):
    from components.compare_tab import estimate_text, poll_comparison, start_comparison
    from finetune.services.compare import CompareQueue, CompareRequest, seconds_left
    from helpers import tiny_run_config, wait_until

    manager = RunManager(tmp_path / "runs")
    queue = CompareQueue(manager, poll_seconds=0.2)
    wanted = dict(techniques=["lora16", "lora8"], model_source=str(tiny_model_dir), data_source=str(qa_file),
                  max_steps=3, max_seq_length=64, batch_size=2, max_samples=20, learning_rate=0.01, seed=0,
                  sample_prompt="Say hi.")
    assert "No time estimate yet" in estimate_text(queue, CompareRequest(**wanted))  # nothing timed: no guess
    from finetune.core.config import save_config

    timed = tiny_run_config(tiny_model_dir, qa_file, bits=16, max_steps=2)  # one run of this model and bit width
    save_config(timed, manager.run_dir("timed-16") / "config.yaml")  # as the run manager keeps it
    assert run(timed, manager.run_dir("timed-16")) == 0
    status = read_status(manager.run_dir("timed-16"))
    pace = status["duration"] / status["step"]
    from components.shared import duration

    assert f"about **{duration(3 * pace)}**" in estimate_text(queue, CompareRequest(**{**wanted,
                                                                                        "techniques": ["lora16"]}))
    comparison_id, message, _, _ = start_comparison(queue, **wanted)
    assert comparison_id and "Started comparison" in message
    # A second browser session opens the tab: its first poll names no comparison, and finds the running one.
    watched, status_line, progress_html = poll_comparison(queue, "")[:3]
    assert watched == comparison_id and "running" in status_line
    running = wait_until(lambda: (s := queue.load(comparison_id))["items"][0].get("run_id") and
                         manager.status(s["items"][0]["run_id"]).get("eta_seconds") is not None and s,
                         "the first technique to measure its steps")
    left, measured = seconds_left(running, manager)
    assert left is not None and measured is not None
    assert "left at" in poll_comparison(queue, "")[2] or queue.load(comparison_id)["state"] != "running"
    queue.wait(comparison_id, timeout=600)
    assert pace > 0


# --- 8. the Export tab says which artefact answers as the chat, and how far each GGUF drifts -------------------------

def test_a_built_gguf_says_how_far_it_drifts_from_the_adapter(lab_note_run, tmp_path):
    from components.export_tab import build_gguf
    from finetune.services.export import merge_adapter, merge_report
    from finetune.services.gguf_measure import gguf_drift
    from finetune.services.gguf_plan import gguf_path
    from helpers import copy_run

    run_dir = copy_run(lab_note_run, tmp_path / "runs")
    manager = RunManager(tmp_path / "runs")
    _, message = build_gguf(manager, run_dir.name, "q4_0")
    drift = gguf_drift(run_dir, gguf_path(run_dir, "q4_0"), "q4_0")
    assert drift.summary() in message  # what the handler showed is what was measured on the file
    assert "The merged model is the one that answers exactly as the Chat tab" in message
    assert len(drift.agreement) == 3 and all(0 <= n <= drift.tokens for n in drift.agreement)
    # The same adapter loss as the merge's own report, on the same rows: one yardstick for both artefacts.
    report = merge_report(run_dir, merge_adapter(run_dir))
    assert drift.adapter_loss == pytest.approx(report.adapter_loss) and drift.rows == report.rows
    again = build_gguf(manager, run_dir.name, "q4_0")[1]  # a reused file reuses its measurement
    assert drift.summary() in again
