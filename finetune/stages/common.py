"""What the stages share: the training arguments, the LoRA config, the dtype of trainable weights, the run info
each stage records, preference data with its size warnings, and saving a trained adapter with its config."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finetune.core.config import TRACKIO_PROJECT, ConfigError, RunConfig, TrainingConfig, save_config
from finetune.core.hardware import HardwareProfile
from finetune.core.lora_init import peft_init_kwargs
from finetune.core.metrics import BEST_METRICS, MetricsCallback
from finetune.core.models import count_parameters
from finetune.core.preference import (PreferenceData, data_size, load_preferences, rows_per_step, size_statement,
                                      size_warnings)
from finetune.core.recipe import resolve_recipe
from finetune.core.run_folder import CHECKPOINT_DIR, CONFIG_COPY, write_run_info


@dataclass
class Built:
    """A stage's trainer ready to train, as the shared runner needs it."""

    trainer: Any
    callback: MetricsCallback
    has_eval: bool                # a held-out set exists: the runner adds the final evaluation point
    evaluate_first: bool = False  # evaluate once before training (a reward model's chance level at step 0)


def warmup_steps(t: TrainingConfig) -> float:
    """Warmup in whole steps, scaled to the steps the run will do. Why not hand transformers the ratio: it rounds
    ratio x steps *up*, and a linear warmup's first step runs at learning rate 0, so a run capped to 2 steps spent
    step 1 learning nothing (0.05 x 2 -> 1 warmup step). Rounded down, a run shorter than 1/ratio steps has no
    warmup. A run bounded by epochs (max_steps <= 0) keeps the ratio: its step count is known only to the trainer."""
    if t.max_steps <= 0:
        return t.warmup_ratio
    return int(math.floor(t.warmup_ratio * t.max_steps))


def training_args(cfg: RunConfig, profile: HardwareProfile, run_dir: Path, has_eval: bool) -> dict[str, Any]:
    """The arguments every stage shares (SFT, reward, DPO, KTO, GRPO), with the recipe's per-hardware choices."""
    t, recipe = cfg.training, resolve_recipe(cfg, profile)
    evaluate_during = has_eval and t.eval_steps > 0
    args = dict(
        output_dir=str(run_dir / CHECKPOINT_DIR),
        learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler, warmup_steps=warmup_steps(t),
        num_train_epochs=t.num_epochs, max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation, optim=recipe.optimizer,
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        gradient_checkpointing=recipe.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if recipe.gradient_checkpointing else None,
        seed=t.seed, data_seed=t.seed,
        logging_steps=t.logging_steps, logging_first_step=True,
        eval_strategy="steps" if evaluate_during else "no", eval_steps=t.eval_steps if evaluate_during else None,
        save_strategy="steps", save_steps=t.save_steps, save_total_limit=2,
        # TRL defaults to bf16 even on the CPU, where it made steps about 7x slower: follow the hardware.
        bf16=profile.is_cuda and profile.compute_dtype == "bfloat16",
        fp16=profile.is_cuda and profile.compute_dtype == "float16",
        use_cpu=not profile.is_cuda, max_length=cfg.data.max_seq_length,
        report_to=t.report_to, run_name=run_dir.name, disable_tqdm=True, dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every LoRA weight is used each step; skip DDP's extra graph walk
    )
    args.update(best_checkpoint_args(cfg, has_eval))
    if t.report_to == "trackio":
        # One local project for every run, no Hub Space: a static Space would be made (and made public) on a push.
        args.update(project=TRACKIO_PROJECT, trackio_space_id=None, trackio_static_space_id=False)
    return args


def best_checkpoint_args(cfg: RunConfig, has_eval: bool) -> dict[str, Any]:
    """Early stopping and keep='best' (training.early_stopping_patience, training.keep) as transformers' arguments:
    the stage's held-out metric (finetune.core.metrics.BEST_METRICS) is tracked, a checkpoint is saved at every
    evaluation (so the best one exists on disk: transformers' rotation never deletes the best or the newest), and
    with keep='best' the trainer loads the best checkpoint back after training, so the saved adapter is it.
    Refuses a run that tracks its best but will have no held-out evaluation (too few rows to hold any out)."""
    t = cfg.training
    if not t.watches_best():
        return {}
    if not has_eval or t.eval_steps <= 0 or cfg.stage not in BEST_METRICS:
        raise ConfigError({"data.validation_fraction": (
            f"{t.watch_name()} needs held-out rows, and this data left none to evaluate on (a dataset needs at "
            "least 10 rows to hold some out): add rows or a validation split, or set early stopping patience to 0 "
            "and keep to 'last'")})
    metric = BEST_METRICS[cfg.stage]
    # save_steps = eval_steps: transformers needs save_steps to be a multiple of eval_steps for
    # load_best_model_at_end, and a best evaluation without a checkpoint of its own could not be kept.
    return dict(save_steps=t.eval_steps, metric_for_best_model=metric.key, greater_is_better=metric.greater_is_better,
                load_best_model_at_end=t.keep == "best",
                # The patience counter travels in the checkpoint: a resumed run goes on counting, not from 0.
                restore_callback_states_from_checkpoint=True)


def to_lora_config(cfg: RunConfig, task_type: str = "CAUSAL_LM") -> Any:
    """LoRA, DoRA or rsLoRA (the method decides the two flags); the RLHF stages always train plain LoRA.
    ``task_type="SEQ_CLS"`` (a reward model) makes peft train and save the new score head too."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_module_list(), bias=cfg.lora.bias, task_type=task_type,
                      use_dora=cfg.lora.method == "dora", use_rslora=cfg.lora.method == "rslora",
                      **peft_init_kwargs(cfg.lora))


def keep_adapters_in_compute_dtype(model: torch.nn.Module, profile: HardwareProfile) -> None:
    """TRL casts QLoRA adapters to bf16 (the paper's choice on Ampere GPUs). On the CPU bf16 math is slow, and
    fp16 mixed precision (T4) needs fp32 master weights, so keep trainable weights in fp32 there. Every LoRA
    weight too, frozen ones included (DPO's reference copy): else each forward pays bf16's slow CPU path."""
    if profile.is_cuda and profile.compute_dtype == "bfloat16":
        return
    for name, parameter in model.named_parameters():
        if (parameter.requires_grad or "lora_" in name) and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()


def record_run_info(trainer: Any, run_dir: Path, profile: HardwareProfile, **fields: Any) -> None:
    """What every stage writes into run_info.json before training: hardware, world size, parameter counts."""
    if not trainer.is_world_process_zero():
        return
    trainable, total = count_parameters(trainer.model)
    write_run_info(run_dir, hardware=profile.summary(), compute_dtype=profile.compute_dtype,
                   world_size=trainer.args.world_size, trainable_parameters=trainable, total_parameters=total,
                   **fields)


def preference_data_fields(data: PreferenceData) -> dict[str, Any]:
    return dict(data_format=data.source_format, train_rows=len(data.train),
                eval_rows=len(data.eval) if data.eval is not None else 0, data_notes=data.notes,
                malformed_rows=data.malformed_rows, skipped_rows=data.skipped_rows)


def load_preference_data(cfg: RunConfig, want: str) -> PreferenceData:
    """The split data; its size and what training on it will do go to the log (the CLI's user sees no tab)."""
    data = load_preferences(cfg.data, cfg.preference.format, want=want, seed=cfg.training.seed)
    size, per_step = data_size(data), rows_per_step(cfg)
    print(size_statement(size, cfg.training.max_steps, per_step).replace("**", ""), flush=True)
    for warning in size_warnings(size, cfg.training.max_steps, per_step):
        print(f"Warning: {warning}", flush=True)
        data.notes.append(warning)
    return data


def save_beside(cfg: RunConfig, trainer: Any, target: Path) -> None:
    """The tokenizer and the run's config next to a saved adapter: the folder alone can be loaded and chatted with."""
    trainer.processing_class.save_pretrained(target)
    save_config(cfg, target / CONFIG_COPY)


def save_default_adapter(cfg: RunConfig, trainer: Any, target: Path) -> Path:
    """Save the trained LoRA named "default" (DPO on a started adapter also holds TRL's frozen "ref" copy, which
    is not the run's result)."""
    if trainer.is_world_process_zero():
        model = trainer.accelerator.unwrap_model(trainer.model)
        model.save_pretrained(str(target), selected_adapters=["default"])
        save_beside(cfg, trainer, target)
    return target
