"""Preference optimization on pairs or thumbs: TRL ``DPOTrainer`` (chosen/rejected pairs) or ``KTOTrainer``
(thumbs up/down), on a fresh LoRA over the base or, with ``preference.start_adapter``, on the SFT adapter trained
further (the starting adapter is then the frozen reference). Saved under ``adapter/`` like an SFT run, so the
Chat tab lists it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.core.config import KTO_LOSSES, RunConfig
from finetune.core.hardware import HardwareProfile, detect
from finetune.core.lm_head import use_cpu_lm_head
from finetune.core.metrics import MetricsCallback
from finetune.core.models import load_model, load_tokenizer, resolve_run_folder
from finetune.core.recipe import resolve_recipe
from finetune.core.run_folder import ADAPTER_DIR
from finetune.stages.common import (Built, keep_adapters_in_compute_dtype, load_preference_data, preference_data_fields,
                                    record_run_info, save_default_adapter, to_lora_config, training_args)


def to_dpo_config(cfg: RunConfig, profile: HardwareProfile, run_dir: Path, has_eval: bool) -> Any:
    from trl import DPOConfig

    loss = cfg.preference.loss_type if cfg.preference.loss_type not in KTO_LOSSES else "sigmoid"
    return DPOConfig(**training_args(cfg, profile, run_dir, has_eval), beta=cfg.preference.beta, loss_type=[loss])


def to_kto_config(cfg: RunConfig, profile: HardwareProfile, run_dir: Path, has_eval: bool) -> Any:
    from trl import KTOConfig

    loss = cfg.preference.loss_type if cfg.preference.loss_type in KTO_LOSSES else "kto"
    return KTOConfig(**training_args(cfg, profile, run_dir, has_eval), beta=cfg.preference.beta, loss_type=loss)


def policy_model(cfg: RunConfig, run_dir: Path, profile: HardwareProfile) -> tuple[Any, Any, str]:
    """(model, peft_config or None, what it starts from): a fresh LoRA, or the SFT adapter to keep training."""
    use_cpu_lm_head(resolve_recipe(cfg, profile).cpu_lm_head)  # DPO, KTO and GRPO score tokens like SFT does
    model = load_model(cfg.model, profile)
    if not cfg.preference.start_adapter:
        return model, to_lora_config(cfg), "base model"
    from peft import PeftModel

    folder = resolve_run_folder(cfg.preference.start_adapter, run_dir.parent, ADAPTER_DIR)
    return PeftModel.from_pretrained(model, str(folder), is_trainable=True), None, str(folder)


def build(cfg: RunConfig, run_dir: Path) -> Built:
    """DPOTrainer (pairs) or KTOTrainer (thumbs), on a fresh LoRA or on the SFT adapter to start from."""
    from trl import DPOTrainer, KTOTrainer

    profile = detect()
    tokenizer = load_tokenizer(cfg.model)
    is_kto = cfg.stage == "kto"
    data = load_preference_data(cfg, "unpaired" if is_kto else "paired")
    model, peft_config, start = policy_model(cfg, run_dir, profile)
    make_args = to_kto_config if is_kto else to_dpo_config
    has_eval = data.eval is not None
    callback = MetricsCallback(run_dir, stage=cfg.stage, final_eval=has_eval)
    trainer = (KTOTrainer if is_kto else DPOTrainer)(
        model=model, args=make_args(cfg, profile, run_dir, has_eval), train_dataset=data.train,
        eval_dataset=data.eval, processing_class=tokenizer, peft_config=peft_config, callbacks=[callback])
    keep_adapters_in_compute_dtype(trainer.model, profile)
    record_run_info(trainer, run_dir, profile, stage=type(trainer).__name__, started_from=start,
                    **preference_data_fields(data))
    # Evaluated once before training: the starting held-out margin and loss are measured, not assumed (the policy
    # starts as its reference, so its margin is 0), and the status line's "before -> after" has a real start.
    return Built(trainer, callback, has_eval=has_eval, evaluate_first=has_eval)


def save(cfg: RunConfig, trainer: Any, run_dir: Path) -> Path:
    return save_default_adapter(cfg, trainer, run_dir / ADAPTER_DIR)
