"""Early stopping on the validation set and the best checkpoint kept (issue 19 item 1).

Real training on the CPU: a tiny Llama whose wider random embeddings let LoRA learn within a few steps, trained
with a high constant learning rate on made-up locker code words. The held-out rows give the training lockers other
code words, so fitting the training rows must make the held-out loss rise: the shape early stopping exists for,
built into the data rather than left to one CPU's trajectory (check with ATEN_CPU_CAPABILITY=avx2 and =default).
Every assertion is checked against what the run itself logged.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import save_tiny_llama, tiny_run_config, write_jsonl
from finetune.core.config import ConfigError, from_dict, to_dict
from finetune.core.hardware import detect
from finetune.core.metrics import MetricsCallback, early_stop_note
from finetune.core.preference import BUNDLED_PREFERENCES
from finetune.core.run_folder import ADAPTER_DIR, CHECKPOINT_DIR, read_run_info, STOP_FILE
from finetune.core.run_status import read_metrics, read_status
from finetune.stages.common import training_args
from finetune.train import run

PATIENCE, EVAL_STEPS, MAX_STEPS = 2, 2, 24
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def learning_model_dir(tmp_path_factory, embedded_dir) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-learning"), embedded_dir, initializer_range=0.3)


TRAINED_CODE, HELD_OUT_CODE = "bravo bravo bravo bravo", "zulu zulu zulu zulu"


def locker_row(locker: int, code: str) -> dict:
    return {"prompt": f"What is the code word of locker {locker}?",
            "completion": code}


@pytest.fixture(scope="module")
def locker_codes(tmp_path_factory, learning_model_dir) -> Path:
    """Answers whose held-out rows contradict the training rows: each held-out row asks about a training locker
    and answers with another code word. Every step of fitting the training answers lowers the probability of the
    held-out ones, so after the first evaluation the held-out loss rises by construction of the data (by well
    over a nat per evaluation at this learning rate), not by a lucky trajectory of one CPU's arithmetic.

    The app holds out rows by a seeded split that depends on the row count only, so the rows it will hold out
    are found on a first file and then replaced."""
    path = tmp_path_factory.mktemp("lockers") / "codes.jsonl"
    rows = [locker_row(i, TRAINED_CODE) for i in range(24)]
    cfg = overfitting_config(learning_model_dir, write_jsonl(path, rows))
    prompts = [row["prompt"] for row in rows]
    held_out = [prompts.index(prompt) for prompt, _ in held_out_rows(cfg)]
    trained = [i for i in range(len(rows)) if i not in held_out]
    for position, locker in zip(held_out, trained):
        rows[position] = locker_row(locker, HELD_OUT_CODE)
    write_jsonl(path, rows)
    assert sorted(held_out_rows(cfg)) == sorted((rows[i]["prompt"], rows[i]["completion"]) for i in held_out)
    return path


def held_out_rows(cfg) -> list[tuple[str, str]]:
    """(prompt, completion) of each row the app holds out for this config."""
    from finetune.core.data import prepare

    return [(row["prompt"][0]["content"], row["completion"][0]["content"])
            for row in prepare(cfg.data, seed=cfg.training.seed).eval]


def overfitting_config(model_dir: Path, data: Path, **training):
    cfg = tiny_run_config(model_dir, data, max_steps=MAX_STEPS, learning_rate=0.05, lr_scheduler="constant",
                          eval_steps=EVAL_STEPS, early_stopping_patience=PATIENCE, **training)
    cfg.data.validation_fraction = 0.25
    return cfg


def eval_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["eval_loss"] for r in read_metrics(run_dir) if isinstance(r.get("eval_loss"), float)}


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / WEIGHTS))


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINT_DIR / f"checkpoint-{step}"


def early_stop_of(curve: dict[int, float], greater_is_better: bool, patience: int) -> tuple[int | None, int]:
    """(step the run should stop at or None, best step) from the evaluations it logged, by the rule itself: an
    evaluation that does not beat the best so far counts against the patience, a better one resets it."""
    best_step, best, waited = -1, None, 0
    for step in sorted(curve):
        if best is None or (curve[step] > best if greater_is_better else curve[step] < best):
            best_step, best, waited = step, curve[step], 0
        else:
            waited += 1
            if waited >= patience:
                return step, best_step
    return None, best_step


def assert_stopped_at_the_right_step(run_dir: Path) -> dict:
    """The run's record agrees with its own eval curve: the best step is the lowest eval loss, and the run
    stopped PATIENCE evaluations after it, before its last step."""
    status, losses = read_status(run_dir), eval_losses(run_dir)
    stop, best = early_stop_of(losses, greater_is_better=False, patience=PATIENCE)
    assert status["state"] == "completed", status
    assert status["best_step"] == best and status["best_metric"] == pytest.approx(losses[best])
    assert status["stopped_early_at"] == stop == best + PATIENCE * EVAL_STEPS < MAX_STEPS
    assert max(losses) == status["stopped_early_at"]  # nothing was evaluated after the stop
    assert all(losses[step] > losses[best] for step in losses if step > best)  # the held-out loss turned up
    assert early_stop_note(status) == f"stopped early at step {status['stopped_early_at']} (best: step {best})"
    return status


@pytest.mark.trajectory
@pytest.mark.parametrize("keep", ["best", "last"])
def test_rising_validation_loss_stops_early_and_saves_the_chosen_weights(learning_model_dir, locker_codes, tmp_path,
                                                                         keep):
    run_dir = tmp_path / "run"
    assert run(overfitting_config(learning_model_dir, locker_codes, keep=keep), run_dir) == 0
    status = assert_stopped_at_the_right_step(run_dir)
    best, stop = checkpoint(run_dir, status["best_step"]), checkpoint(run_dir, status["stopped_early_at"])
    assert best.is_dir() and stop.is_dir()  # the rotation (2 checkpoints) kept the best one
    saved = tensors(run_dir / ADAPTER_DIR)
    assert same_tensors(saved, tensors(best if keep == "best" else stop))
    assert not same_tensors(saved, tensors(stop if keep == "best" else best))
    info = read_run_info(run_dir)
    assert (info["kept"], info["best_step"], info["stopped_early_at"]) == (keep, status["best_step"],
                                                                          status["stopped_early_at"])
    assert_the_train_tab_shows_it(run_dir, status)


def assert_the_train_tab_shows_it(run_dir: Path, status: dict) -> None:
    """The Train tab's real handlers over this run folder: the history's status and the live plot's two marks."""
    from components.train_runs import poll_run, run_history
    from finetune.services.runs import RunManager

    manager, losses = RunManager(run_dir.parent), eval_losses(run_dir)
    history, *_ = run_history(manager)
    row = history.set_index("run id").loc[run_dir.name]
    assert row["status"] == early_stop_note(status)
    # The figures shown are those of the weights the run saved: the best step's with keep=best, the last's else.
    shown = losses[status["best_step"]] if status["kept"] == "best" else losses[max(losses)]
    assert row["final eval loss"] == pytest.approx(shown, rel=1e-3)
    assert row["headline value"] == pytest.approx(shown, rel=1e-3)
    run_id, text, _, plot = poll_run(manager, run_dir.name)[:4]
    assert early_stop_note(status).replace("stopped early", "**stopped early**") in text
    for series, step in (("best eval", status["best_step"]), ("early stop", status["stopped_early_at"])):
        mark = plot[plot["series"] == series]
        assert mark["step"].mean() == pytest.approx(step) and list(mark["loss"]) == pytest.approx([losses[step]] * 2)


@pytest.mark.trajectory
def test_resume_after_stop_keeps_counting_and_keeps_the_best(learning_model_dir, locker_codes, tmp_path, monkeypatch):
    """Stop (the STOP file the app writes) after a few evaluations, then resume: the run goes on from its
    checkpoint with the best metric and patience counter it had, stops early and keeps the best."""
    run_dir, stop_at = tmp_path / "run", 2 * EVAL_STEPS + 1  # after one evaluation that did not improve
    original = MetricsCallback.on_step_end

    def press_stop_at(self, args, state, control, **kwargs):
        if state.global_step == stop_at:
            (self.run_dir / STOP_FILE).touch()  # what RunManager.request_stop writes
        return original(self, args, state, control, **kwargs)

    cfg = overfitting_config(learning_model_dir, locker_codes, keep="best")
    with monkeypatch.context() as patch:
        patch.setattr(MetricsCallback, "on_step_end", press_stop_at)
        assert run(cfg, run_dir) == 0
    stopped = read_status(run_dir)
    assert stopped["state"] == "stopped" and stopped["step"] == stop_at and stopped.get("stopped_early_at") is None
    assert same_tensors(tensors(run_dir / ADAPTER_DIR), tensors(checkpoint(run_dir, stopped["best_step"])))

    (run_dir / STOP_FILE).unlink()  # RunManager.resume removes it too
    assert run(cfg, run_dir, resume=True) == 0
    status = assert_stopped_at_the_right_step(run_dir)
    # The patience counter came back with the checkpoint: one more evaluation without improvement ends the run
    # (starting the count again would run PATIENCE more).
    assert status["stopped_early_at"] == stop_at + 1 == stopped["best_step"] + PATIENCE * EVAL_STEPS
    assert same_tensors(tensors(run_dir / ADAPTER_DIR), tensors(checkpoint(run_dir, status["best_step"])))


@pytest.mark.trajectory
def test_a_reward_model_stops_on_held_out_accuracy_and_keeps_the_best(tiny_model_dir, tmp_path):
    """A reward run goes by held-out accuracy, higher is better. At a learning rate too small to flip a pair the
    accuracy stays level, and a level evaluation is no improvement: the run stops one evaluation after its first."""
    from finetune.services.evaluate import judge_accuracy
    from finetune.core.run_folder import REWARD_DIR

    rows = [{"prompt": f"What does setting {i} control?", "chosen": f"Lab note: setting {i} controls the adapter.",
             "rejected": "It depends."} for i in range(20)]
    cfg = from_dict({"stage": "reward", "model": {"source": str(tiny_model_dir)},
                     "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
                     "data": {"source": str(write_jsonl(tmp_path / "pairs.jsonl", rows)), "max_seq_length": 64,
                              "validation_fraction": 0.25},
                     "training": {"learning_rate": 1e-7, "max_steps": 6, "batch_size": 4, "eval_steps": 1,
                                  "logging_steps": 1, "early_stopping_patience": 1, "keep": "best"}})
    run_dir = tmp_path / "reward"
    assert run(cfg, run_dir) == 0
    status = read_status(run_dir)
    # Step 0 is the reward stage's look at the untrained head (chance level), no candidate for the best.
    curve = {r["step"]: r["eval_accuracy"] for r in read_metrics(run_dir)
             if isinstance(r.get("eval_accuracy"), (int, float)) and r["step"] > 0}
    stop, best = early_stop_of(curve, greater_is_better=True, patience=1)
    assert (status["best_metric_name"], status["best_step"], status["stopped_early_at"]) == ("eval_accuracy", best,
                                                                                             stop)
    assert stop is not None and stop < 6
    assert same_tensors(tensors(run_dir / REWARD_DIR), tensors(checkpoint(run_dir, best)))
    assert judge_accuracy(run_dir).accuracy == pytest.approx(curve[best])  # the kept model's accuracy


def test_too_few_rows_to_hold_out_is_refused_before_training(learning_model_dir, tmp_path):
    rows = [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(6)]  # under 10: none held out
    cfg = tiny_run_config(learning_model_dir, write_jsonl(tmp_path / "few.jsonl", rows), early_stopping_patience=2)
    run_dir = tmp_path / "run"
    assert run(cfg, run_dir) == 1
    status = read_status(run_dir)
    assert status["state"] == "failed" and "needs held-out rows" in status["error"]
    assert "validation split" in status["error"] and not (run_dir / CHECKPOINT_DIR).exists()


def config_with(**sections) -> dict:
    raw = to_dict(from_dict({}))
    for name, values in sections.items():
        if isinstance(values, dict):
            raw[name].update(values)
        else:
            raw[name] = values
    return raw


@pytest.mark.parametrize("training, data, stage, field, fragment", [
    ({"early_stopping_patience": 2, "eval_steps": 0}, {}, "sft", "training.eval_steps", "set eval steps above 0"),
    ({"keep": "best", "eval_steps": 0}, {}, "sft", "training.eval_steps", "Keeping the best checkpoint"),
    ({"early_stopping_patience": 2}, {"validation_fraction": 0}, "sft", "data.validation_fraction",
     "set the validation fraction above 0"),
    ({"early_stopping_patience": 2}, {}, "grpo", "training.early_stopping_patience", "GRPO has none"),
    ({"keep": "best"}, {}, "grpo", "training.keep", "GRPO has none"),
    ({"early_stopping_patience": -1}, {}, "sft", "training.early_stopping_patience", "between 0 and 1000"),
    ({"keep": "first"}, {}, "sft", "training.keep", "one of last, best"),
    ({"early_stopping_threshold": -0.1}, {}, "sft", "training.early_stopping_threshold", ">= 0"),
])
def test_settings_without_a_held_out_evaluation_are_refused(training, data, stage, field, fragment):
    extra = {"preference": {"reward_model": "reward-run"}} if stage == "grpo" else {}
    with pytest.raises(ConfigError) as caught:
        from_dict(config_with(training=training, data=data, stage=stage, **extra))
    assert fragment in caught.value.problems[field]


@pytest.mark.parametrize("stage, metric, greater", [("sft", "eval_loss", False), ("reward", "eval_accuracy", True),
                                                    ("dpo", "eval_loss", False), ("kto", "eval_loss", False)])
@pytest.mark.parametrize("keep", ["best", "last"])
def test_training_args_watch_the_stage_metric_and_save_at_every_evaluation(tmp_path, stage, metric, greater, keep):
    """Each stage's trainer config accepts the arguments (transformers checks save_steps against eval_steps)."""
    from trl import DPOConfig, KTOConfig, RewardConfig, SFTConfig

    cfg = from_dict(config_with(stage=stage, training={"early_stopping_patience": 3, "keep": keep, "eval_steps": 7,
                                                       "save_steps": 50}))
    args = training_args(cfg, detect(), tmp_path, has_eval=True)
    assert (args["metric_for_best_model"], args["greater_is_better"]) == (metric, greater)
    assert args["save_steps"] == args["eval_steps"] == 7 and args["load_best_model_at_end"] == (keep == "best")
    kind = {"sft": SFTConfig, "reward": RewardConfig, "dpo": DPOConfig, "kto": KTOConfig}[stage]
    built = kind(**args)
    assert built.load_best_model_at_end == (keep == "best") and built.metric_for_best_model == metric


def test_without_early_stopping_the_arguments_are_unchanged(tmp_path):
    cfg = from_dict(config_with(training={"eval_steps": 7, "save_steps": 50}))
    args = training_args(cfg, detect(), tmp_path, has_eval=True)
    assert args["save_steps"] == 50 and "metric_for_best_model" not in args and "load_best_model_at_end" not in args


@pytest.mark.parametrize("stage", ["dpo", "grpo"])
def test_the_rlhf_form_carries_the_two_settings(stage):
    """The RLHF tab's shared advanced section: DPO takes them; GRPO (no held-out set) is refused by name."""
    from components.rlhf_form import stage_config_from_form

    form = {"early_stopping_patience": 3, "keep": "best", "reward_run": "some-reward-run"}
    if stage == "grpo":
        with pytest.raises(ConfigError) as caught:
            stage_config_from_form(stage, BUNDLED_PREFERENCES, form)
        assert "GRPO has none" in caught.value.problems["training.early_stopping_patience"]
        return
    cfg = stage_config_from_form(stage, BUNDLED_PREFERENCES, form)
    assert (cfg.training.early_stopping_patience, cfg.training.keep) == (3, "best")


def test_the_train_form_carries_the_two_settings_and_names_the_fix():
    """The Train tab's two advanced controls map onto the config; without evaluations the form is refused."""
    from components.train_form import config_from_form

    cfg = config_from_form({"training_early_stopping_patience": 3.0, "training_keep": "best"})  # gr.Number: 3.0
    assert (cfg.training.early_stopping_patience, cfg.training.keep) == (3, "best")
    with pytest.raises(ConfigError) as caught:
        config_from_form({"training_early_stopping_patience": 3, "training_eval_steps": 0})
    assert "set eval steps above 0" in caught.value.problems["training.eval_steps"]
