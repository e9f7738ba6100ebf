"""The one runner every stage goes through: TensorBoard, train (or resume), the STOP check, the final evaluation
point, save, and the measurements written to run_info.json.

A stage is a module with two functions (see finetune/stages/sft.py):
    build(cfg, run_dir) -> Built     the trainer ready to train, its metrics callback, whether it has held-out data
    save(cfg, trainer, run_dir) -> Path   write what the stage produces (adapter/, model/ or reward_model/)
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

from finetune.config import RunConfig
from finetune.metrics import STOP_FILE
from finetune.run_folder import TENSORBOARD_DIR, last_checkpoint, write_run_info
from finetune.stages import grpo, policy, reward, sft
from finetune.stages.measure import record_measurements, reset_peak_memory

# Keyed by the config's stage names (finetune.config.STAGES; a test keeps the two equal).
STAGES: dict[str, ModuleType] = {"sft": sft, "reward": reward, "dpo": policy, "kto": policy, "grpo": grpo}


def run_stage(cfg: RunConfig, run_dir: Path, resume: bool = False) -> Path:
    """Train ``cfg.stage`` in ``run_dir``; returns the folder of what it saved."""
    run_dir.mkdir(parents=True, exist_ok=True)
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / TENSORBOARD_DIR)  # transformers 5 reads it from env
    stage = STAGES[cfg.stage]
    built = stage.build(cfg, run_dir)
    trainer = built.trainer
    checkpoint = last_checkpoint(run_dir) if resume else None
    if built.evaluate_first and checkpoint is None:
        trainer.evaluate()
    reset_peak_memory()  # the recorded peak is the training's, not the model loading's
    trainer.train(resume_from_checkpoint=checkpoint)
    stopped = (run_dir / STOP_FILE).exists()
    if built.has_eval and not stopped and built.callback.last_eval_step != trainer.state.global_step:
        trainer.evaluate()  # the final eval point, whatever eval_steps was
    saved = stage.save(cfg, trainer, run_dir)
    if trainer.is_world_process_zero():
        write_run_info(run_dir, **record_measurements(trainer, cfg, run_dir, saved))
    return saved
