"""The one runner every stage goes through: TensorBoard, early stopping, train (or resume), the STOP check, the
final evaluation point, save, and the measurements (and the best evaluation) written to run_info.json.

A stage is a module with two functions (see finetune/stages/sft.py):
    build(cfg, run_dir) -> Built     the trainer ready to train, its metrics callback, whether it has held-out data
    save(cfg, trainer, run_dir) -> Path   write what the stage produces (adapter/, model/ or reward_model/)
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import Any

from finetune.core.config import RunConfig
from finetune.core.metrics import any_rank
from finetune.core.run_folder import TENSORBOARD_DIR, TRACKER_DIRS, last_checkpoint, write_run_info, STOP_FILE
from finetune.core.run_status import write_status
from finetune.stages import grpo, policy, reward, sft
from finetune.stages.measure import record_measurements, reset_peak_memory

# Keyed by the config's stage names (finetune.core.config.STAGES; a test keeps the two equal).
STAGES: dict[str, ModuleType] = {"sft": sft, "reward": reward, "dpo": policy, "kto": policy, "grpo": grpo}


def run_stage(cfg: RunConfig, run_dir: Path, resume: bool = False) -> Path:
    """Train ``cfg.stage`` in ``run_dir``; returns the folder of what it saved."""
    run_dir.mkdir(parents=True, exist_ok=True)
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / TENSORBOARD_DIR)  # transformers 5 reads it from env
    point_tracker_at_runs_folder(cfg, run_dir)
    stage = STAGES[cfg.stage]
    built = stage.build(cfg, run_dir)
    trainer = built.trainer
    checkpoint = last_checkpoint(run_dir) if resume else None
    if built.evaluate_first and checkpoint is None:
        trainer.evaluate()
    add_early_stopping(cfg, trainer)  # after the step-0 evaluation, which is no candidate for the best
    if trainer.is_world_process_zero():
        write_status(run_dir, stopped_early_at=None)  # a resumed run has not stopped early (yet)
    reset_peak_memory()  # the recorded peak is the training's, not the model loading's
    trainer.train(resume_from_checkpoint=checkpoint)
    stopped = any_rank((run_dir / STOP_FILE).exists())  # all ranks skip (or run) the final evaluation together
    # The final eval point, whatever eval_steps was; not when the trainer has loaded the best checkpoint back:
    # that point would show the best weights' loss at the last step (and the trainer evaluated the last step).
    if built.has_eval and not stopped and built.callback.last_eval_step != trainer.state.global_step \
            and not trainer.args.load_best_model_at_end:
        trainer.evaluate()
    saved = stage.save(cfg, trainer, run_dir)
    if trainer.is_world_process_zero():
        outcome = best_outcome(cfg, trainer, stopped)
        write_status(run_dir, **outcome)
        write_run_info(run_dir, **outcome, **record_measurements(trainer, cfg, run_dir, saved))
    return saved


def point_tracker_at_runs_folder(cfg: RunConfig, run_dir: Path) -> None:
    """Trackio, MLflow and W&B keep their local stores beside the runs (``<runs root>/trackio`` ...), where they
    outlive the run and travel with the runs folder (a Space's persistent /data); an operator's own setting wins."""
    name = TRACKER_DIRS.get(cfg.training.report_to)
    if name is None:
        return
    store = run_dir.resolve().parent / name
    variable, value = {"trackio": ("TRACKIO_DIR", str(store)), "mlflow": ("MLFLOW_TRACKING_URI", store.as_uri()),
                       "wandb": ("WANDB_DIR", str(store))}[cfg.training.report_to]
    if cfg.training.report_to == "wandb":
        store.mkdir(parents=True, exist_ok=True)  # wandb writes into the folder, it does not make it
    os.environ.setdefault(variable, value)


def add_early_stopping(cfg: RunConfig, trainer: Any) -> None:
    """transformers' EarlyStoppingCallback, for every stage with early stopping on (the config refuses GRPO and
    runs without held-out rows; training_args set the metric it watches)."""
    t = cfg.training
    if t.early_stopping_patience > 0:
        from transformers import EarlyStoppingCallback

        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=t.early_stopping_patience,
                                                   early_stopping_threshold=t.early_stopping_threshold))


def _early_stopping(trainer: Any) -> Any:
    """The trainer's EarlyStoppingCallback: resuming replaces the one added with the checkpoint's copy."""
    from transformers import EarlyStoppingCallback

    return next((c for c in trainer.callback_handler.callbacks if isinstance(c, EarlyStoppingCallback)), None)


def best_outcome(cfg: RunConfig, trainer: Any, stopped: bool) -> dict[str, Any]:
    """What status.json and run_info.json record about the best evaluation: its step and value, the step early
    stopping ended the run at (None when it did not), and which weights the saved result holds."""
    if not cfg.training.watches_best():
        return {}
    state, callback = trainer.state, _early_stopping(trainer)
    # Early stopping ended the run when its counter ran out before the last step (Stop ends runs early too).
    ended_early = callback is not None and not stopped and state.global_step < state.max_steps \
        and callback.early_stopping_patience_counter >= callback.early_stopping_patience
    best = state.best_model_checkpoint
    return dict(stopped_early_at=state.global_step if ended_early else None, best_step=state.best_global_step,
                best_metric=state.best_metric, best_metric_name=trainer.args.metric_for_best_model,
                best_checkpoint=Path(best).name if best else None, kept=cfg.training.keep)
