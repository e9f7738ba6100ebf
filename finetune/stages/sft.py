"""Supervised fine-tuning with LoRA / QLoRA (or DoRA, rsLoRA, IA3, prompt tuning, a full fine-tune) through TRL's
SFTTrainer. Saves ``adapter/`` (PEFT format) or, for a full fine-tune, ``model/``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.core.attention import use_varlen_attention
from finetune.core.config import RunConfig
from finetune.core.data import prepare
from finetune.core.hardware import HardwareProfile, detect
from finetune.core.lm_head import use_cpu_lm_head
from finetune.core.lora_init import BASE_CHANGING, LOFTQ_NEEDS_WEIGHTS, apply_loftq, check_init, reconstruction_error
from finetune.core.metrics import MetricsCallback
from finetune.core.models import ModelSourceError, load_model, load_tokenizer, local_weights_folder, resolve_source
from finetune.core.recipe import resolve_recipe
from finetune.core.run_folder import ADAPTER_DIR, FULL_MODEL_DIR, INITIAL_ADAPTER_DIR
from finetune.core.run_status import write_status
from finetune.stages.common import (Built, keep_adapters_in_compute_dtype, record_run_info, save_beside, to_lora_config,
                                    training_args)


def to_peft_config(cfg: RunConfig) -> Any:
    """The peft config for ``cfg.lora.method``; None for full fine-tuning (every weight trains)."""
    from peft import IA3Config, PromptTuningConfig

    method = cfg.lora.method
    if method == "full":
        return None
    if method == "ia3":
        feedforward = cfg.lora.feedforward_module_list()
        targets = cfg.lora.target_module_list()
        if feedforward is None and targets == "all-linear":
            targets = None  # peft's per-architecture defaults (attention k/v and the MLP's down projection)
        return IA3Config(target_modules=targets, feedforward_modules=feedforward, task_type="CAUSAL_LM")
    if method == "prompt_tuning":
        text = cfg.lora.prompt_init_text.strip()
        init = {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": text,
                "tokenizer_name_or_path": resolve_source(cfg.model.source)} if text else {}
        return PromptTuningConfig(num_virtual_tokens=cfg.lora.num_virtual_tokens, task_type="CAUSAL_LM", **init)
    return to_lora_config(cfg)


def to_sft_config(cfg: RunConfig, profile: HardwareProfile, run_dir: Path, has_eval: bool) -> Any:
    from trl import SFTConfig

    recipe = resolve_recipe(cfg, profile)
    args = training_args(cfg, profile, run_dir, has_eval)
    if recipe.padding_free:
        args["max_length"] = None  # data.prepare already dropped longer rows; padding-free batches require None
    return SFTConfig(**args, padding_free=recipe.padding_free, use_liger_kernel=recipe.liger_kernels,
                     include_num_input_tokens_seen="non_padding")


def sft_trainer(cfg: RunConfig, profile: HardwareProfile, model: Any, tokenizer: Any, train: Any, evaluation: Any,
                run_dir: Path, callbacks: list[Any]) -> Any:
    """The project's SFT recipe around an already loaded model (bench/train_throughput.py uses it too)."""
    from trl import SFTTrainer

    args = to_sft_config(cfg, profile, run_dir, has_eval=evaluation is not None)
    recipe = resolve_recipe(cfg, profile)
    if recipe.packed_attention:
        use_varlen_attention(model)
    use_cpu_lm_head(recipe.cpu_lm_head)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                         processing_class=tokenizer, peft_config=to_peft_config(cfg), callbacks=callbacks)
    keep_adapters_in_compute_dtype(trainer.model, profile)
    return trainer


def initialise_adapter(cfg: RunConfig, trainer: Any, run_dir: Path) -> dict[str, Any]:
    """The adapter's start (finetune/core/lora_init.py) before any forward pass, and what run_info records of it: the
    seconds LoftQ took, and on a 4-bit base how far base + adapter starts from the full-precision weights."""
    if cfg.lora.method not in ("lora", "rslora", "dora"):
        return {}
    info: dict[str, Any] = {"lora_init": cfg.lora.init}
    folder = local_weights_folder(cfg.model) if cfg.model.bits == 4 or cfg.lora.init == "loftq" else None
    check_init(cfg, folder)
    if cfg.lora.init == "loftq":
        if folder is None:
            raise ModelSourceError(LOFTQ_NEEDS_WEIGHTS)
        if trainer.is_world_process_zero():  # minutes on a big model: the progress bar says what it waits for
            write_status(run_dir, phase="initialising", phase_note="LoftQ: fitting A and B to the 4-bit rounding "
                                                                   "error, layer by layer")
        info["init_seconds"] = round(apply_loftq(trainer.model, folder), 2)
        if trainer.is_world_process_zero():
            write_status(run_dir, phase=None, phase_note=None)
    elif cfg.lora.init in BASE_CHANGING:
        trainer.model.save_pretrained(str(run_dir / INITIAL_ADAPTER_DIR))
    if cfg.model.bits == 4 and folder is not None and cfg.lora.method != "dora":
        info["step0_weight_error"] = round(reconstruction_error(trainer.model, folder)[0], 6)
    return info


def build(cfg: RunConfig, run_dir: Path) -> Built:
    profile = detect()
    tokenizer = load_tokenizer(cfg.model)
    data = prepare(cfg.data, tokenizer, seed=cfg.training.seed)
    model = load_model(cfg.model, profile)
    # final_eval: the runner adds the last evaluation point after training, whatever eval_steps was
    callback = MetricsCallback(run_dir, stage="sft", final_eval=data.eval is not None)
    trainer = sft_trainer(cfg, profile, model, tokenizer, data.train, data.eval, run_dir, [callback])
    start = initialise_adapter(cfg, trainer, run_dir)
    record_run_info(trainer, run_dir, profile, recipe=resolve_recipe(cfg, profile).as_dict(), **start,
                    data_format=data.format, train_rows=len(data.train),
                    eval_rows=len(data.eval) if data.eval is not None else 0, data_notes=data.notes,
                    malformed_rows=data.malformed_rows, skipped_rows=data.skipped_rows,
                    dropped_too_long=data.dropped_too_long,
                    model_load_seconds=round(getattr(model, "load_seconds", 0.0), 2))
    return Built(trainer, callback, has_eval=data.eval is not None)


def save(cfg: RunConfig, trainer: Any, run_dir: Path) -> Path:
    target = run_dir / (FULL_MODEL_DIR if cfg.lora.method == "full" else ADAPTER_DIR)
    if getattr(trainer, "is_fsdp_enabled", False):  # gather the shards: adapter/ is PEFT format under FSDP too
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    initial = run_dir / INITIAL_ADAPTER_DIR
    if cfg.lora.init in BASE_CHANGING and initial.is_dir():
        # PiSSA/OLoRA moved part of W into the adapter: saved relative to the initial adapter, the result is a plain
        # LoRA (of twice the rank) on the unchanged base, which Chat, Evaluate and export load like any other.
        if trainer.is_world_process_zero():
            trainer.model.save_pretrained(str(target), path_initial_model_for_weight_conversion=str(initial))
    else:
        trainer.save_model(str(target))
    if trainer.is_world_process_zero():
        save_beside(cfg, trainer, target)
    return target
