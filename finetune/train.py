"""Supervised fine-tuning with LoRA / QLoRA through TRL's SFTTrainer.

Run it:
    python -m finetune.train configs/cpu-quick.yaml                      # new run folder under runs/
    python -m finetune.train configs/cpu-quick.yaml --output-dir runs/demo
    python -m finetune.train runs/demo/config.yaml --output-dir runs/demo --resume
    python -m finetune.train configs/dpo-cpu.yaml      # a config with `stage: reward|dpo|kto` runs finetune/rlhf.py
    accelerate launch --multi_gpu --num_processes 2 -m finetune.train configs/cpu-quick.yaml --output-dir runs/ddp
      (DDP; on a machine without CUDA this runs 2 CPU processes over gloo. accelerate's --cpu flag alone
      always starts a single process.)

The run folder receives config.yaml, metrics.jsonl, status.json, run_info.json, tensorboard/, checkpoints/
and, at the end, adapter/ (PEFT format, loadable with ``PeftModel.from_pretrained``).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from finetune.config import ConfigError, RunConfig, load_config, save_config
from finetune.paths import check_config
from finetune.data import DataError, prepare
from finetune.hardware import HardwareProfile, detect
from finetune.metrics import HOSTNAME, STOP_FILE, MetricsCallback, write_status
from finetune.models import ModelSourceError, count_parameters, load_model, load_tokenizer, resolve_source
from finetune.attention import use_varlen_attention
from finetune.lm_head import use_cpu_lm_head
from finetune.recipe import resolve_recipe

ADAPTER_DIR, CHECKPOINT_DIR, RUN_INFO_FILE = "adapter", "checkpoints", "run_info.json"
CONFIG_COPY = "lora_lab_config.yaml"  # the run's config, saved beside its adapter / reward model
FULL_MODEL_DIR = "model"  # a full fine-tune saves the whole model here instead of an adapter
USER_ERRORS = (ConfigError, DataError, ModelSourceError)


def to_lora_config(cfg: RunConfig, task_type: str = "CAUSAL_LM") -> Any:
    """LoRA, DoRA or rsLoRA (the method decides the two flags); the RLHF stages always train plain LoRA.
    ``task_type="SEQ_CLS"`` (a reward model) makes peft train and save the new score head too."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_module_list(), bias=cfg.lora.bias, task_type=task_type,
                      use_dora=cfg.lora.method == "dora", use_rslora=cfg.lora.method == "rslora")


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


def training_args(cfg: RunConfig, profile: HardwareProfile, run_dir: Path, has_eval: bool) -> dict[str, Any]:
    """The arguments every stage shares (SFT, reward, DPO, KTO), with the recipe's per-hardware choices."""
    t, recipe = cfg.training, resolve_recipe(cfg, profile)
    evaluate_during = has_eval and t.eval_steps > 0
    return dict(
        output_dir=str(run_dir / CHECKPOINT_DIR),
        learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_ratio,
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
        report_to=["tensorboard"], disable_tqdm=True, dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every LoRA weight is used each step; skip DDP's extra graph walk
    )


def to_sft_config(cfg: RunConfig, profile: HardwareProfile, run_dir: Path, has_eval: bool) -> Any:
    from trl import SFTConfig

    recipe = resolve_recipe(cfg, profile)
    args = training_args(cfg, profile, run_dir, has_eval)
    if recipe.padding_free:
        args["max_length"] = None  # data.prepare already dropped longer rows; padding-free batches require None
    return SFTConfig(**args, padding_free=recipe.padding_free, use_liger_kernel=recipe.liger_kernels,
                     include_num_input_tokens_seen="non_padding")


def keep_adapters_in_compute_dtype(model: torch.nn.Module, profile: HardwareProfile) -> None:
    """TRL casts QLoRA adapters to bf16 (the paper's choice on Ampere GPUs). On the CPU bf16 math is slow, and
    fp16 mixed precision (T4) needs fp32 master weights, so keep trainable weights in fp32 there."""
    if profile.is_cuda and profile.compute_dtype == "bfloat16":
        return
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()


def last_checkpoint(run_dir: Path) -> str | None:
    folder = run_dir / CHECKPOINT_DIR
    if not folder.is_dir():
        return None
    # The Trainer writes trainer_state.json last: a checkpoint without it was cut short (disk full, kill
    # mid-save) and must not be resumed from; fall back to the newest complete one.
    complete = [p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
                and (p / "trainer_state.json").is_file()]
    return str(max(complete, key=lambda p: int(p.name.split("-")[-1]))) if complete else None


def _write_run_info(run_dir: Path, **info: Any) -> None:
    path = run_dir / RUN_INFO_FILE
    current = json.loads(path.read_text()) if path.is_file() else {}
    current.update(info)
    path.write_text(json.dumps(current, indent=1, default=str), encoding="utf-8")


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


def build_trainer(cfg: RunConfig, run_dir: Path) -> tuple[Any, MetricsCallback, Any]:
    """(SFTTrainer ready to train, its metrics callback, the prepared data); writes run_info.json."""
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")  # transformers 5 reads it from env
    profile = detect()
    tokenizer = load_tokenizer(cfg.model)
    data = prepare(cfg.data, tokenizer, seed=cfg.training.seed)
    model = load_model(cfg.model, profile)
    callback = MetricsCallback(run_dir, stage="sft", final_eval=data.eval is not None)  # see main()
    trainer = sft_trainer(cfg, profile, model, tokenizer, data.train, data.eval, run_dir, [callback])
    trainable, total = count_parameters(trainer.model)
    if trainer.is_world_process_zero():
        _write_run_info(run_dir, hardware=profile.summary(), compute_dtype=profile.compute_dtype,
                        recipe=resolve_recipe(cfg, profile).as_dict(),
                        world_size=trainer.args.world_size,
                        data_format=data.format, train_rows=len(data.train),
                        eval_rows=len(data.eval) if data.eval is not None else 0, data_notes=data.notes,
                        trainable_parameters=trainable, total_parameters=total,
                        model_load_seconds=round(getattr(model, "load_seconds", 0.0), 2))
    return trainer, callback, data


def main(cfg: RunConfig, run_dir: str | Path, resume: bool = False) -> Path:
    """Train, save the adapter under run_dir/adapter and return its path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.stage != "sft":  # reward model, DPO, KTO: the RLHF stages live in finetune/rlhf.py
        from finetune.rlhf import main as rlhf_main

        return rlhf_main(cfg, run_dir, resume=resume)
    trainer, callback, data = build_trainer(cfg, run_dir)
    from finetune.compare import reset_peak_memory

    reset_peak_memory()  # the recorded peak is the training's, not the model loading's
    trainer.train(resume_from_checkpoint=last_checkpoint(run_dir) if resume else None)
    stopped = (run_dir / STOP_FILE).exists()
    if data.eval is not None and not stopped and callback.last_eval_step != trainer.state.global_step:
        trainer.evaluate()  # the final eval point, whatever eval_steps was
    adapter_dir = run_dir / (FULL_MODEL_DIR if cfg.lora.method == "full" else ADAPTER_DIR)
    if getattr(trainer, "is_fsdp_enabled", False):  # gather the shards: adapter/ is PEFT format under FSDP too
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(adapter_dir))
    if trainer.is_world_process_zero():
        trainer.processing_class.save_pretrained(adapter_dir)
        save_config(cfg, adapter_dir / CONFIG_COPY)
        from finetune.compare import record_measurements  # peak memory, size on disk, a sample answer

        _write_run_info(run_dir, **record_measurements(trainer, cfg, run_dir, adapter_dir))
    return adapter_dir


def _failure_message(error: BaseException) -> str:
    if isinstance(error, USER_ERRORS):
        return str(error)
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return ("Disk full while saving: free some space (old runs, checkpoints) and resume; the previous "
                "checkpoint is kept.")
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return ("Out of GPU memory. Try a smaller batch size, a shorter max sequence length, gradient "
                "checkpointing, or fewer bits (4-bit).")
    return f"{type(error).__name__}: {error}"


def run(cfg: RunConfig, run_dir: Path, resume: bool = False) -> int:
    """main() with the run's status kept right whatever happens; returns the process exit code."""
    rank_zero = int(os.environ.get("RANK", "0")) == 0
    started = time.time()
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank_zero:
        write_status(run_dir, state="running", stage=cfg.stage, pid=os.getpid(), hostname=HOSTNAME,
                     started_at=started, error=None)
    try:
        main(cfg, run_dir, resume=resume)
    except BaseException as error:  # includes KeyboardInterrupt: the status must say what happened
        if rank_zero:
            state = "stopped" if isinstance(error, KeyboardInterrupt) else "failed"
            write_status(run_dir, state=state, error=_failure_message(error), finished_at=time.time())
        if not isinstance(error, USER_ERRORS):
            traceback.print_exc()
        print(f"error: {_failure_message(error)}", file=sys.stderr)
        return 1
    if rank_zero:
        state = "stopped" if (run_dir / STOP_FILE).exists() else "completed"
        write_status(run_dir, state=state, finished_at=time.time(), duration=round(time.time() - started, 1))
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m finetune.train", description=__doc__.split("\n")[0])
    parser.add_argument("config", help="YAML config (see configs/)")
    parser.add_argument("--output-dir", help="run folder (default: runs/<config name>-<time>)")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    return parser.parse_args(argv)


def cli(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config)
        check_config(cfg, operator=True)  # the operator's own config: local paths allowed, names still checked
    except ConfigError as error:
        print("error: invalid config:", file=sys.stderr)
        for name, message in error.problems.items():
            print(f"  {name}: {message}", file=sys.stderr)
        return 2
    run_dir = Path(args.output_dir or f"runs/{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.mkdir(parents=True, exist_ok=True)
    if int(os.environ.get("RANK", "0")) == 0 and (run_dir / "config.yaml").resolve() != Path(args.config).resolve():
        save_config(cfg, run_dir / "config.yaml")
    return run(cfg, run_dir, resume=args.resume)


if __name__ == "__main__":
    sys.exit(cli())
