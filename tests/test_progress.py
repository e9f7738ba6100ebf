"""Progress that tells the truth: the ETA charges evaluations at their measured duration, status.json says
"evaluating" while one runs, and the progress bar and plots show it (a real tiny run, read back from disk)."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from helpers import tiny_run_config
from finetune.core.run_status import read_metrics, read_status


class StatusProbe(TrainerCallback):
    """Reads status.json as the app would, at the moments that matter: during each evaluation batch and right
    after each training-loss log (it is added after MetricsCallback, so the file is already up to date)."""

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self.during_eval: list[dict[str, Any]] = []
        self.after_loss: dict[int, dict[str, Any]] = {}

    def on_prediction_step(self, args, state, control, **kwargs):
        self.during_eval.append(read_status(self.run_dir))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.after_loss[state.global_step] = read_status(self.run_dir)


def test_eta_counts_measured_evaluations_and_status_says_evaluating(tiny_model_dir, qa_file, tmp_path):
    from finetune.stages.sft import build

    # Evaluations at steps 2 and 4, then a final one at step 5 (the trainer's own, as the run ends off-interval).
    cfg = tiny_run_config(tiny_model_dir, qa_file, max_steps=5, eval_steps=2, save_steps=100)
    built = build(cfg, tmp_path)
    trainer, callback = built.trainer, built.callback
    probe = StatusProbe(tmp_path)
    trainer.add_callback(probe)
    trainer.train()
    if callback.last_eval_step != trainer.state.global_step:  # what train.main does after training
        trainer.evaluate()

    assert probe.during_eval and all(s["phase"] == "evaluating" for s in probe.during_eval)
    # The loss of an evaluation step is logged once the step end has announced the evaluation.
    assert {step: s["phase"] for step, s in probe.after_loss.items()} == {
        1: "training", 2: "evaluating", 3: "training", 4: "evaluating", 5: "evaluating"}
    rows = read_metrics(tmp_path)
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 5]
    # Measured: from the step end that announced it to its metrics, never shorter than the trainer's own timer.
    assert all(r["eval_seconds"] > 0 and r["eval_seconds"] >= r["eval_runtime"] for r in evals)

    before_any = probe.after_loss[1]
    assert before_any["evals_left"] == 3 and before_any["evals_untimed"] == 3  # said, not guessed at
    at_step_3 = probe.after_loss[3]
    # The schedule it predicted is the one that happened: the evaluations logged after step 3.
    assert at_step_3["evals_left"] == sum(r["step"] > 3 for r in evals) == 2
    assert at_step_3["evals_untimed"] == 0
    assert at_step_3["seconds_per_eval"] == round(evals[0]["eval_seconds"], 3)
    charged_for_steps = at_step_3["seconds_per_step"] * (5 - 3)
    assert abs(at_step_3["eta_seconds"] - (charged_for_steps + at_step_3["seconds_per_eval"] * 2)) < 0.1
    assert read_status(tmp_path)["phase"] == "training"


def test_progress_bar_says_evaluating_and_what_the_eta_leaves_out():
    from components.shared import progress_html

    evaluating = progress_html("bar", {"state": "running", "phase": "evaluating", "step": 4, "max_steps": 10,
                                       "eval_batch": 2, "eval_batches": 5, "eta_seconds": 30}, [])
    assert "evaluating" in evaluating and "batch 2/5" in evaluating and "data-phase='evaluating'" in evaluating
    untimed = progress_html("bar", {"state": "running", "phase": "training", "step": 1, "max_steps": 10,
                                    "eta_seconds": 12, "evals_untimed": 3}, [])
    assert "3 evaluations not yet timed" in untimed
    timed = progress_html("bar", {"state": "running", "phase": "training", "step": 3, "max_steps": 10,
                                  "eta_seconds": 75, "evals_left": 2, "seconds_per_eval": 10.0}, [])
    assert "1m 15s" in timed and "2 evaluations" in timed and "not yet timed" not in timed
    assert "ETA –" in progress_html("bar", {"state": "completed", "step": 10, "max_steps": 10,
                                            "eta_seconds": 5}, [])


def test_a_single_eval_point_is_drawn():
    from components.train_runs import loss_frame

    rows = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 2, "eval_loss": 1.7}]
    frame = loss_frame(rows)
    eval_points = frame[frame["series"] == "eval loss"].dropna()
    # A line needs two ends: the lone point becomes a short level dash around its step, at its value.
    assert list(eval_points["loss"]) == [1.7, 1.7]
    assert eval_points["step"].min() < 2 < eval_points["step"].max()
    assert eval_points["step"].max() - eval_points["step"].min() < 1  # it stays within its own step
    train = frame[frame["series"] == "train loss"]
    assert list(train["step"]) == [1, 2]  # series with several points are drawn as they are


def test_rlhf_stages_report_the_same_measured_eta(tiny_model_dir, tmp_path):
    """A reward model run (real TRL RewardTrainer) keeps the same progress fields as SFT, so the RLHF tab's bar
    shows an ETA and "evaluating": its step-0 evaluation is timed before the first step."""
    from components.shared import progress_html
    from helpers import write_jsonl
    from finetune.stages.reward import build as build_reward
    from helpers import preference_stage_config as stage_config

    rows = [{"prompt": f"What does setting {i} control in LoRA?", "chosen": f"🧪 Lab note: setting {i}.",
             "rejected": "It depends."} for i in range(16)]

    cfg = stage_config(tiny_model_dir, write_jsonl(tmp_path / "pairs.jsonl", rows), "reward", max_steps=4,
                       eval_steps=2)
    trainer = build_reward(cfg, tmp_path).trainer
    probe = StatusProbe(tmp_path)
    trainer.add_callback(probe)
    trainer.evaluate()  # what the runner does first for a reward run: the chance-level point at step 0
    trainer.train()

    assert probe.during_eval and all(s["phase"] == "evaluating" for s in probe.during_eval)
    first = probe.after_loss[1]
    assert first["stage"] == "reward" and first["eta_seconds"] is not None
    # The step-0 evaluation was measured, so the two to come (steps 2 and 4) are charged at its pace.
    assert first["evals_untimed"] == 0 and first["evals_left"] == 2 and first["seconds_per_eval"] > 0
    bar = progress_html("rlhf-reward-progress", first, read_metrics(tmp_path))
    assert "ETA " in bar and "ETA –" not in bar and "2 evaluations" in bar


def test_the_bar_says_what_a_long_adapter_start_waits_for():
    """LoftQ's start took 144 s on the embedded model before step 1: the bar names it instead of a silent 0%."""
    from components.shared import progress_html

    status = {"state": "running", "step": 0, "phase": "initialising",
              "phase_note": "LoftQ: fitting A and B to the 4-bit rounding error, layer by layer"}
    bar = progress_html("bar", status, [])
    assert "<b>LoftQ: fitting A and B to the 4-bit rounding error, layer by layer</b>" in bar
    assert "LoftQ" not in progress_html("bar", {**status, "phase": None}, [])


def test_a_first_evaluation_running_now_is_paced_by_its_own_batches():
    """A walk saw "ETA 0s + 1 evaluation not yet timed" for the 170 s of a run's only evaluation (12 batches): the
    evaluation running now has a pace of its own, elapsed time per batch done."""
    import time

    from components.shared import eta_text, evaluation_left

    started = time.time() - 30.0  # 3 of 12 batches took 30 s: 9 more take about 90 s
    status = {"state": "running", "phase": "evaluating", "step": 2, "max_steps": 2, "eta_seconds": 0,
              "evals_untimed": 1, "evals_left": 1, "eval_batch": 3, "eval_batches": 12, "eval_started_at": started}
    assert evaluation_left(status, now=started + 30.0) == 90.0
    text = eta_text(status, now=started + 30.0)
    assert text.startswith("ETA 1m 30s (this evaluation paced by its batches)") and "not yet timed" not in text
    later = eta_text({**status, "evals_untimed": 3, "eta_seconds": 20}, now=started + 30.0)  # two more to come
    assert later.startswith("ETA 1m 50s") and later.endswith("+ 2 evaluations not yet timed")
    assert evaluation_left({**status, "eval_batch": 0}) is None  # before its first batch: no pace yet
    assert eta_text({**status, "eval_batch": 0}) == "ETA 0s + 1 evaluation not yet timed"
