# Over 600 lines on purpose: the one config object (every section, its help text, its cross-field checks) is the
# single source of truth for UI, CLI and trainer, and reads best as one file (DESIGN.md, style 1).
"""The run configuration: one set of dataclasses shared by the UI, the CLI and the trainer.

Every field carries its help text in ``metadata["help"]``; the UI shows it as the control's info text.
Validation lives in ``__post_init__`` and reports every problem at once, one clear sentence per field,
so a user fixing a form sees all of them together rather than one per attempt.

    cfg = load_config("configs/cpu-quick.yaml")
    cfg.lora.rank = 16
    save_config(cfg, "runs/my-run/config.yaml")
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from finetune.core.rewards import parse_rules, rule_problems

EMBEDDED_MODEL = "smollm2-135m-instruct"
BUNDLED_DATASET = "bundled:course_qa"

DATA_FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_completion", "prompt_response",
                "question_answer", "text")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adafactor", "sgd")
COMPUTE_DTYPES = ("auto", "float32", "float16", "bfloat16")
LORA_BIAS = ("none", "all", "lora_only")
# PEFT methods (finetune/train.py to_peft_config): LoRA and its variants, IA3, prompt tuning, or none at all.
PEFT_METHODS = ("lora", "dora", "rslora", "ia3", "prompt_tuning", "full")
LORA_METHODS = ("lora", "dora", "rslora")
# How LoRA's A and B start (finetune/core/lora_init.py maps them to peft and says where each does not apply).
LORA_INITS = ("default", "loftq", "pissa", "olora")
CHECKPOINTING = ("auto", "on", "off")
KEEP_CHOICES = ("last", "best")  # which weights a run saves (training.keep)
STRATEGIES = ("single", "ddp", "fsdp")  # how several processes share a run (finetune/core/distributed.py)
# Where the trainer also sends its metrics (transformers' report_to); LoRA Lab's own curves read metrics.jsonl.
REPORT_TO = ("tensorboard", "trackio", "wandb", "mlflow", "none")
TRACKIO_PROJECT = "lora-lab"  # the Trackio project every run logs into (one Trackio run per LoRA Lab run)
FSDP_METHODS = ("lora", "dora", "rslora", "full")  # what FSDP can shard: whole modules, trainable or frozen


REMOTE_CODE_ENV = "LORA_LAB_ALLOW_REMOTE_CODE"


PYTHON_REWARDS_ENV = "LORA_LAB_PYTHON_REWARDS"


def python_rewards_refusal() -> str | None:
    """Why a Python reward file may not run here, or None. It is the operator's code running in the training
    child: off unless the operator opts in, and never on a Space, whose visitors could name any file."""
    if os.environ.get("SPACE_ID"):
        return ("a Python reward runs code on the server, so a Space refuses it: declare the reward as rules "
                "(preference.rewards) instead")
    if os.environ.get(PYTHON_REWARDS_ENV, "").strip().lower() not in ("1", "true", "yes"):
        return (f"a Python reward runs code: the operator must allow it with {PYTHON_REWARDS_ENV}=1 (or declare "
                "the reward as rules in preference.rewards)")
    return None


def remote_code_allowed() -> bool:
    """True only when the operator has opted in: trust_remote_code runs a model repo's own Python code."""
    return os.environ.get(REMOTE_CODE_ENV, "").strip().lower() in ("1", "true", "yes")


class ConfigError(ValueError):
    """A config with one or more invalid fields; ``problems`` maps 'section.field' to a message."""

    def __init__(self, problems: dict[str, str]):
        self.problems = problems
        super().__init__("; ".join(f"{name}: {msg}" for name, msg in problems.items()))


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


# --- small checks that return an error message or None --------------------------------------------------

def _as_int(value: Any) -> int | None:
    """Accept ints and integral floats (gr.Number gives 8.0); reject bools, NaN and text."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class _Checker:
    """Collects per-field problems for one section and coerces numbers in place."""

    def __init__(self, section: str, obj: Any):
        self.section, self.obj, self.problems = section, obj, {}

    def fail(self, name: str, message: str) -> None:
        self.problems.setdefault(f"{self.section}.{name}", message)

    def int_field(self, name: str, low: int | None = None, high: int | None = None, what: str = "") -> None:
        number = _as_int(getattr(self.obj, name))
        if number is None:
            self.fail(name, f"{what or name} must be a whole number, got {getattr(self.obj, name)!r}")
        elif (low is not None and number < low) or (high is not None and number > high):
            self.fail(name, f"{what or name} must be {_range_text(low, high)}, got {number}")
        else:
            setattr(self.obj, name, number)

    def float_field(self, name: str, low: float | None = None, high: float | None = None,
                    low_open: bool = False, high_open: bool = False, what: str = "") -> None:
        number = _as_float(getattr(self.obj, name))
        if number is None:
            self.fail(name, f"{what or name} must be a finite number, got {getattr(self.obj, name)!r}")
            return
        too_low = low is not None and (number <= low if low_open else number < low)
        too_high = high is not None and (number >= high if high_open else number > high)
        if too_low or too_high:
            low_text = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
            high_text = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
            self.fail(name, f"{what or name} must be {' and '.join(t for t in (low_text, high_text) if t)}, "
                            f"got {number:g}")
        else:
            setattr(self.obj, name, number)

    def choice(self, name: str, choices: tuple[Any, ...], what: str = "") -> None:
        if getattr(self.obj, name) not in choices:
            listed = ", ".join(str(c) for c in choices)
            self.fail(name, f"{what or name} must be one of {listed}, got {getattr(self.obj, name)!r}")

    def flag(self, name: str, what: str = "") -> None:
        if not isinstance(getattr(self.obj, name), bool):
            self.fail(name, f"{what or name} must be true or false, got {getattr(self.obj, name)!r}")

    def text(self, name: str, what: str = "") -> None:
        value = getattr(self.obj, name)
        if not isinstance(value, str) or not value.strip():
            self.fail(name, f"{what or name} must not be empty")
        else:
            setattr(self.obj, name, value.strip())

    def raise_if_any(self) -> None:
        if self.problems:
            raise ConfigError(self.problems)


def _range_text(low: int | None, high: int | None) -> str:
    if low is not None and high is not None:
        return f"between {low} and {high}"
    return f">= {low}" if low is not None else f"<= {high}"


# --- the sections ------------------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    source: str = field(default=EMBEDDED_MODEL, metadata=_help(
        f"Which base model to fine-tune: '{EMBEDDED_MODEL}' (embedded, works offline), a Hugging Face Hub id "
        "such as 'HuggingFaceTB/SmolLM2-1.7B-Instruct', or a local folder with a saved model."))
    bits: int = field(default=4, metadata=_help(
        "Bit width of the frozen base weights: 4 = QLoRA (NF4/FP4), 8 = LLM.int8, 16 = half precision, "
        "32 = full precision. Fewer bits use less memory; the LoRA adapters always train in 16/32-bit.",
        choices=(4, 8, 16, 32)))
    quant_type: str = field(default="nf4", metadata=_help(
        "4-bit data type: 'nf4' (NormalFloat, spaced for normally distributed weights; the QLoRA default) "
        "or 'fp4' (plain 4-bit float).", choices=("nf4", "fp4")))
    double_quant: bool = field(default=True, metadata=_help(
        "Quantize the 4-bit quantization constants themselves (saves about 0.4 bit per weight)."))
    compute_dtype: str = field(default="auto", metadata=_help(
        "Dtype of the matrix multiplications: 'auto' picks float32 on CPU, float16 on a T4 (and other GPUs "
        "before Ampere), bfloat16 on Ampere and newer.", choices=COMPUTE_DTYPES))
    trust_remote_code: bool = field(default=False, metadata=_help(
        "Allow a Hub model to run its own Python code. Off unless you trust the model's author."))

    def __post_init__(self) -> None:
        check = _Checker("model", self)
        check.text("source", "Model source")
        check.int_field("bits", what="Bit width")
        if "model.bits" not in check.problems and self.bits not in (4, 8, 16, 32):
            check.fail("bits", f"Bit width must be 4, 8, 16 or 32, got {self.bits}")
        check.choice("quant_type", ("nf4", "fp4"), "4-bit quant type")
        check.choice("compute_dtype", COMPUTE_DTYPES, "Compute dtype")
        check.flag("double_quant", "Double quantization")
        check.flag("trust_remote_code", "Trust remote code")
        if self.trust_remote_code is True and not remote_code_allowed():
            # A public Space must not run code from any Hub repo a visitor names; the operator decides.
            check.fail("trust_remote_code", "Remote code is disabled on this server; the operator can allow it "
                                            f"by setting {REMOTE_CODE_ENV}=1 before starting the app")
        if self.bits in (4, 8) and importlib.util.find_spec("bitsandbytes") is None:
            check.fail("bits", f"{self.bits}-bit loading needs the bitsandbytes package; install it or pick 16/32")
        check.raise_if_any()


@dataclass
class LoraSettings:
    method: str = field(default="lora", metadata=_help(
        "What training updates: 'lora' (low-rank B·A beside each targeted weight), 'dora' (LoRA on the weight's "
        "direction plus a trained magnitude per output), 'rslora' (LoRA scaled by alpha/sqrt(r), steadier at high "
        "ranks), 'ia3' (one learned scaling vector per targeted layer: the fewest parameters), 'prompt_tuning' "
        "(trained virtual tokens in front of every input; the model is untouched), 'full' (every weight: the "
        "reference point; needs 16/32 bits and a much lower learning rate). The bit width is independent: "
        "LoRA on a 4-bit base is QLoRA.", choices=PEFT_METHODS))
    rank: int = field(default=8, metadata=_help(
        "r, the inner dimension of the low-rank update B·A. Trainable parameters grow linearly with it; "
        "4-64 covers most uses."))
    alpha: float = field(default=16.0, metadata=_help(
        "Scale of the update: W + (alpha / r)·B·A. A common start is alpha = 2 x rank."))
    dropout: float = field(default=0.05, metadata=_help(
        "Dropout on the adapter's input during training; regularises small datasets. 0 <= dropout < 1."))
    target_modules: str = field(default="all-linear", metadata=_help(
        "Which layers get adapters: 'all-linear' (QLoRA paper), or a comma-separated list such as "
        "'q_proj,v_proj' (the original LoRA paper)."))
    bias: str = field(default="none", metadata=_help(
        "Train bias terms too: 'none' (default), 'lora_only' or 'all'.", choices=LORA_BIAS))
    init: str = field(default="default", metadata=_help(
        "How the adapter starts: 'default' (B = 0: step 0 is exactly the base model), 'loftq' (4-bit bases: A and "
        "B start as the best rank-r fix of the quantization error, so base + adapter starts closer to the "
        "full-precision weights), 'pissa' (the adapter starts as the weight's top r singular directions and the "
        "base keeps the rest; 16/32-bit bases), 'olora' (A and B start orthonormal, from a QR decomposition of "
        "the weight, taken out of the base). The form says where a choice does not apply.", choices=LORA_INITS))
    ia3_feedforward_modules: str = field(default="auto", metadata=_help(
        "IA3 only: which targeted layers are feed-forward (their scaling vector multiplies the input instead of "
        "the output). 'auto' = peft's choice for the architecture (with its default targets k_proj, v_proj, "
        "down_proj when target modules is 'all-linear'), or a comma list such as 'down_proj'."))
    num_virtual_tokens: int = field(default=20, metadata=_help(
        "Prompt tuning only: how many trained virtual tokens precede every input (each one hidden-size numbers)."))
    prompt_init_text: str = field(default="", metadata=_help(
        "Prompt tuning only: start the virtual tokens from the embeddings of this text (e.g. 'Answer as a lab "
        "note:'); empty = random start."))

    def __post_init__(self) -> None:
        check = _Checker("lora", self)
        check.choice("method", PEFT_METHODS, "PEFT method")
        check.text("ia3_feedforward_modules", "IA3 feed-forward modules")
        check.int_field("num_virtual_tokens", low=1, high=1024, what="Virtual tokens")
        if not isinstance(self.prompt_init_text, str):
            check.fail("prompt_init_text", "Prompt init text must be text")
        check.int_field("rank", low=1, high=4096, what="LoRA rank")
        check.float_field("alpha", low=0, low_open=True, what="LoRA alpha")
        check.float_field("dropout", low=0, high=1, high_open=True, what="LoRA dropout")
        check.text("target_modules", "Target modules")
        check.choice("bias", LORA_BIAS, "LoRA bias")
        check.choice("init", LORA_INITS, "LoRA initialisation")
        check.raise_if_any()

    def target_module_list(self) -> str | list[str]:
        if self.target_modules == "all-linear":
            return "all-linear"
        return [name.strip() for name in self.target_modules.split(",") if name.strip()]

    def feedforward_module_list(self) -> list[str] | None:
        if self.ia3_feedforward_modules == "auto":
            return None
        return [name.strip() for name in self.ia3_feedforward_modules.split(",") if name.strip()]


@dataclass
class DataConfig:
    source: str = field(default=BUNDLED_DATASET, metadata=_help(
        f"Training data: '{BUNDLED_DATASET}' (bundled course Q&A, works offline), a Hub dataset name such as "
        "'tatsu-lab/alpaca', or a local file (.jsonl, .json, .csv, .parquet, .txt)."))
    hub_config: str | None = field(default=None, metadata=_help(
        "Configuration (subset) name of a Hub dataset, if it has several."))
    split: str = field(default="train", metadata=_help("Split of the dataset to train on."))
    format: str = field(default="auto", metadata=_help(
        "Row format: 'auto' detects it from the columns (messages, ShareGPT conversations, Alpaca "
        "instruction/input/output, prompt/completion, prompt/response, question/answer, text).",
        choices=DATA_FORMATS))
    column_mapping: dict[str, str] = field(default_factory=dict, metadata=_help(
        "Rename columns before detection, e.g. {'query': 'prompt', 'reply': 'completion'}."))
    max_seq_length: int = field(default=512, metadata=_help(
        "Longest example in tokens; longer rows are dropped (not cut) so answers are never truncated."))
    validation_fraction: float = field(default=0.1, metadata=_help(
        "Share of rows held out for eval loss when the dataset has no validation split. 0 disables eval."))
    max_samples: int | None = field(default=None, metadata=_help(
        "Use at most this many training rows (handy for quick experiments). Empty = all."))
    max_eval_samples: int | None = field(default=None, metadata=_help(
        "Evaluate on at most this many held-out rows (preference pairs for the RLHF stages), a fixed seeded sample: "
        "every evaluation's time grows with them. Fewer rows widen the intervals the app shows. Empty = all."))
    skip_bad_rows: bool = field(default=False, metadata=_help(
        "Train on the readable rows of a partly broken JSON Lines or CSV file: the malformed lines are listed and "
        "skipped. Off, such a file is refused so it can be fixed first. A file with more than half its lines "
        "malformed is refused either way."))

    def __post_init__(self) -> None:
        check = _Checker("data", self)
        check.flag("skip_bad_rows", "Skip malformed rows")
        check.text("source", "Dataset source")
        check.text("split", "Split")
        check.choice("format", DATA_FORMATS, "Data format")
        check.int_field("max_seq_length", low=16, high=131072, what="Max sequence length")
        check.float_field("validation_fraction", low=0, high=0.5, what="Validation fraction")
        if self.max_samples is not None:
            check.int_field("max_samples", low=1, what="Max samples")
        if self.max_eval_samples is not None:
            check.int_field("max_eval_samples", low=1, what="Max held-out rows")
        if self.hub_config is not None and not str(self.hub_config).strip():
            self.hub_config = None
        if not isinstance(self.column_mapping, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.column_mapping.items()):
            check.fail("column_mapping", "Column mapping must map column names to column names (text to text)")
        check.raise_if_any()


@dataclass
class TrainingConfig:
    learning_rate: float = field(default=2e-4, metadata=_help(
        "Step size of the optimizer. LoRA tolerates higher rates than full fine-tuning: 1e-4 to 3e-4 is typical "
        "for long runs, up to 1e-3 for the short CPU presets."))
    lr_scheduler: str = field(default="cosine", metadata=_help(
        "How the learning rate changes over training.", choices=SCHEDULERS))
    warmup_ratio: float = field(default=0.03, metadata=_help(
        "Fraction of steps spent ramping the learning rate up from 0; avoids early instability."))
    num_epochs: float = field(default=1.0, metadata=_help(
        "Passes over the training data (ignored when max steps > 0)."))
    max_steps: int = field(default=-1, metadata=_help(
        "Stop after this many optimizer steps; -1 = run the epochs."))
    batch_size: int = field(default=4, metadata=_help("Examples per device per forward pass."))
    gradient_accumulation: int = field(default=1, metadata=_help(
        "Forward passes summed before each optimizer step: effective batch = batch size x this."))
    optimizer: str = field(default="adamw_torch", metadata=_help(
        "Optimizer; 'paged_adamw_32bit'/'paged_adamw_8bit' move states to CPU RAM under GPU memory "
        "pressure (QLoRA).", choices=OPTIMIZERS))
    weight_decay: float = field(default=0.0, metadata=_help("L2-style decay of the adapter weights."))
    max_grad_norm: float = field(default=1.0, metadata=_help(
        "Clip the gradient norm to this value; protects against loss spikes. 0 disables clipping."))
    gradient_checkpointing: str = field(default="auto", metadata=_help(
        "Recompute activations in the backward pass: much less memory, about 20-30% slower. 'auto' turns it on "
        "only when the memory estimate says the run would not fit without it.", choices=CHECKPOINTING))
    padding_free: bool = field(default=True, metadata=_help(
        "Concatenate the batch's examples into one row with per-example position ids, so no compute or memory "
        "goes to padding tokens; attention still never crosses examples."))
    liger_kernels: bool = field(default=True, metadata=_help(
        "Fused Triton kernels from liger-kernel (RMSNorm, RoPE, SwiGLU) on CUDA GPUs when the package is "
        "installed; ignored on the CPU."))
    cpu_lm_head: bool = field(default=True, metadata=_help(
        "On the CPU, score only the answer tokens with one log-softmax instead of TRL's tile-by-tile GPU design "
        "(same numbers, 1.2-1.5x faster steps, the answer tokens' logits held until the backward); ignored on "
        "GPUs."))
    seed: int = field(default=42, metadata=_help("Random seed for data order and adapter init."))
    logging_steps: int = field(default=1, metadata=_help("Log the training loss every N steps."))
    eval_steps: int = field(default=10, metadata=_help("Compute the eval loss every N steps (0 = only at the end)."))
    save_steps: int = field(default=50, metadata=_help("Save a resumable checkpoint every N steps."))
    early_stopping_patience: int = field(default=0, metadata=_help(
        "Stop when the held-out metric (SFT and DPO/KTO: eval loss; reward model: held-out accuracy) has not "
        "improved for this many evaluations in a row; 0 = off. Needs eval steps > 0 and a validation fraction > 0; "
        "a checkpoint is then saved at every evaluation, so the best one is on disk."))
    early_stopping_threshold: float = field(default=0.0, metadata=_help(
        "Early stopping: how much the held-out metric must improve to count as an improvement (0 = any)."))
    keep: str = field(default="last", metadata=_help(
        "Which weights the saved adapter holds: 'last' (the final step's) or 'best' (the checkpoint with the best "
        "held-out metric). 'best' needs held-out evaluations, like early stopping.", choices=KEEP_CHOICES))
    report_to: str = field(default="tensorboard", metadata=_help(
        "Where the trainer also sends its metrics: 'tensorboard' (event files in the run folder), 'trackio' (a "
        f"local Trackio project '{TRACKIO_PROJECT}', no account needed), 'wandb' or 'mlflow' (only where the server "
        "has their package, and for W&B a key or offline mode), or 'none'. The app's own curves work either way.",
        choices=REPORT_TO))
    processes: int = field(default=1, metadata=_help(
        "Training processes: 1 = one device; 2 or more = one process per GPU (on a machine without a GPU, CPU "
        "processes talking over gloo). Each process trains on its own batch: effective batch = batch size x "
        "gradient accumulation x processes."))
    strategy: str = field(default="single", metadata=_help(
        "How the processes share the run: 'single' (one process), 'ddp' (data parallel: every device holds the "
        "whole 4-bit model and trains on its own rows; the adapter's gradients are averaged), 'fsdp' "
        "(FSDP-QLoRA: the frozen base is sharded across the GPUs, for a base too big for one GPU; 4/16/32-bit, "
        "LoRA, DoRA, rsLoRA or full, SFT only).", choices=STRATEGIES))

    def __post_init__(self) -> None:
        check = _Checker("training", self)
        check.float_field("learning_rate", low=0, high=1, low_open=True, high_open=True, what="Learning rate")
        check.choice("lr_scheduler", SCHEDULERS, "Scheduler")
        check.float_field("warmup_ratio", low=0, high=1, high_open=True, what="Warmup ratio")
        check.float_field("num_epochs", low=0, low_open=True, high=1000, what="Epochs")
        check.int_field("max_steps", low=-1, what="Max steps")
        if self.max_steps == 0:
            check.fail("max_steps", "Max steps must be -1 (use epochs) or a positive number of steps")
        check.int_field("batch_size", low=1, high=4096, what="Batch size")
        check.int_field("gradient_accumulation", low=1, high=4096, what="Gradient accumulation")
        check.choice("optimizer", OPTIMIZERS, "Optimizer")
        check.float_field("weight_decay", low=0, high=1, what="Weight decay")
        check.float_field("max_grad_norm", low=0, what="Max grad norm")
        # Older configs say true/false; keep them valid.
        if isinstance(self.gradient_checkpointing, bool):
            self.gradient_checkpointing = "on" if self.gradient_checkpointing else "off"
        check.choice("gradient_checkpointing", CHECKPOINTING, "Gradient checkpointing")
        check.flag("padding_free", "Padding-free batches")
        check.flag("liger_kernels", "Liger kernels")
        check.flag("cpu_lm_head", "CPU LM head")
        check.int_field("seed", low=0, what="Seed")
        check.int_field("logging_steps", low=1, what="Logging steps")
        check.int_field("eval_steps", low=0, what="Eval steps")
        check.int_field("save_steps", low=1, what="Save steps")
        check.int_field("early_stopping_patience", low=0, high=1000, what="Early stopping patience")
        check.float_field("early_stopping_threshold", low=0, what="Early stopping threshold")
        check.choice("keep", KEEP_CHOICES, "Saved weights")
        check.choice("report_to", REPORT_TO, "Report to")
        if "training.report_to" not in check.problems and tracker_problem(self.report_to):
            check.fail("report_to", tracker_problem(self.report_to))
        check.int_field("processes", low=1, high=512, what="Processes")
        check.choice("strategy", STRATEGIES, "Strategy")
        if not check.problems:
            self._check_processes(check)
        check.raise_if_any()

    def _check_processes(self, check: _Checker) -> None:
        """The strategy and the number of processes must agree: one process is 'single', several are not."""
        if self.strategy == "single" and self.processes > 1:
            check.fail("strategy", f"Strategy 'single' runs one process: set processes to 1, or pick 'ddp' to run "
                                   f"{self.processes} (one per GPU, or CPU processes over gloo; 'fsdp' needs GPUs)")
        elif self.strategy != "single" and self.processes == 1:
            check.fail("processes", f"Strategy '{self.strategy}' needs 2 or more processes (one per device): set "
                                    "processes, or pick strategy 'single'")

    def watches_best(self) -> bool:
        """Whether the run tracks its best evaluation (early stopping on, or the best checkpoint kept)."""
        return (isinstance(self.early_stopping_patience, int) and self.early_stopping_patience > 0) \
            or self.keep == "best"

    def watch_name(self) -> str:
        """What asked for the held-out evaluations, for refusals that name it."""
        return "Early stopping" if self.early_stopping_patience else "Keeping the best checkpoint"


def tracker_problem(report_to: str) -> str | None:
    """Why this server cannot report to ``report_to``, or None when it can. A W&B key comes only from the server's
    environment (WANDB_API_KEY), never from a config, so no config, log or export ever holds it."""
    package = {"trackio": "trackio", "wandb": "wandb", "mlflow": "mlflow"}.get(report_to)
    name = {"trackio": "Trackio", "wandb": "Weights & Biases", "mlflow": "MLflow"}.get(report_to)
    if package is None:
        return None
    if importlib.util.find_spec(package) is None:
        return (f"Reporting to {name} needs the {package} package, which this server does not have (the operator "
                f"can `pip install {package}`); pick 'tensorboard' or 'trackio'")
    if report_to == "wandb" and not os.environ.get("WANDB_API_KEY") \
            and os.environ.get("WANDB_MODE", "").lower() not in ("offline", "disabled"):
        return ("Reporting to Weights & Biases needs WANDB_API_KEY in the server's environment (never in a config) "
                "or WANDB_MODE=offline")
    return None


STAGES = ("sft", "reward", "dpo", "kto", "grpo")
PREFERENCE_FORMATS = ("auto", "paired", "implicit", "unpaired")
DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust", "apo_zero", "sppo_hard")
KTO_LOSSES = ("kto", "apo_zero_unpaired")


@dataclass
class PreferenceConfig:
    """Settings of the RLHF stages (reward model, DPO, KTO, GRPO); ignored by SFT runs."""

    format: str = field(default="auto", metadata=_help(
        "Preference data format: 'paired' (prompt/chosen/rejected), 'implicit' (chosen/rejected conversations "
        "that share their prompt turns), 'unpaired' (prompt/completion/label thumbs, for KTO); 'auto' detects it.",
        choices=PREFERENCE_FORMATS))
    beta: float = field(default=0.1, metadata=_help(
        "DPO/KTO/GRPO beta: how far the tuned model may move from the reference. Higher = stay closer; 0.1 is "
        "usual (GRPO: the weight of its KL penalty, 0 = none)."))
    loss_type: str = field(default="sigmoid", metadata=_help(
        "DPO loss: 'sigmoid' (the DPO paper), 'ipo', 'hinge', 'robust', 'apo_zero', 'sppo_hard'. KTO uses 'kto' "
        "(or 'apo_zero_unpaired'); a DPO loss name given to KTO means 'kto'.", choices=DPO_LOSSES + KTO_LOSSES))
    start_adapter: str = field(default="", metadata=_help(
        "DPO/KTO/GRPO: start from this SFT adapter (a run id or an adapter folder) and keep training it; "
        "empty = a fresh LoRA on the base model. The starting point is also the reference model."))
    reward_model: str = field(default="", metadata=_help(
        "A trained reward model (a reward run id or its reward_model folder), used to score the tuned "
        "model's answers against the base model's. GRPO trains against its scores (required there)."))
    num_generations: int = field(default=4, metadata=_help(
        "GRPO: answers sampled per prompt; each is rewarded relative to the others of its group. The batch size "
        "must be a multiple of it."))
    max_completion_length: int = field(default=64, metadata=_help(
        "GRPO: longest sampled answer, in tokens. Sampling is most of GRPO's time, so keep it short on a CPU."))
    temperature: float = field(default=1.0, metadata=_help(
        "GRPO: sampling temperature of its answers. 1.0 samples the model's own distribution (TRL's default); "
        "lower gives fewer wild answers, so a small model's groups hold right ones more often, with less variety."))
    rewards: list[dict[str, Any]] = field(default_factory=list, metadata=_help(
        "GRPO: rule rewards, declared not programmed (finetune/core/rewards.py): each a mapping with a kind "
        "(match, numeric, format, length, contains, not_contains), its settings and a weight, e.g. {kind: numeric, "
        "reference: answer, extract: last_number}. Beside the reward model or instead of it."))
    reward_model_weight: float = field(default=1.0, metadata=_help(
        "GRPO: the weight of the reward model's score when rule rewards are used too."))
    reward_file: str = field(default="", metadata=_help(
        "GRPO: a Python reward function, 'path/to/file.py:function', with TRL's signature f(prompts, completions, "
        "**columns) -> list[float]. Runs code: only where the operator allows it, never on a Space."))

    def __post_init__(self) -> None:
        check = _Checker("preference", self)
        self._check_rewards(check)
        check.choice("format", PREFERENCE_FORMATS, "Preference format")
        check.float_field("beta", low=0, low_open=True, high=100, what="Beta")
        check.choice("loss_type", DPO_LOSSES + KTO_LOSSES, "Preference loss")
        check.int_field("num_generations", low=2, high=64, what="Answers per prompt (GRPO)")
        check.int_field("max_completion_length", low=4, high=8192, what="Longest sampled answer (GRPO)")
        check.float_field("temperature", low=0, low_open=True, high=5, what="Sampling temperature (GRPO)")
        for name in ("start_adapter", "reward_model"):
            value = getattr(self, name)
            if value is None:
                setattr(self, name, "")
            elif not isinstance(value, str):
                check.fail(name, f"{name} must be a run id or a folder, got {value!r}")
            else:
                setattr(self, name, value.strip())
        check.raise_if_any()

    def _check_rewards(self, check: _Checker) -> None:
        if self.rewards is None:
            self.rewards = []
        for name, message in rule_problems(self.rewards).items():
            check.fail(name, message)
        check.float_field("reward_model_weight", what="Reward model weight")
        if not isinstance(self.reward_file, str):
            check.fail("reward_file", f"reward file must be 'file.py:function', got {self.reward_file!r}")
        elif self.reward_file.strip():
            self.reward_file = self.reward_file.strip()
            path, _, function = self.reward_file.rpartition(":")
            refusal = python_rewards_refusal()
            if refusal:
                check.fail("reward_file", refusal)
            elif not path.endswith(".py") or not function.isidentifier():
                check.fail("reward_file", f"reward file must be 'file.py:function', got {self.reward_file!r}")

    def reward_weights(self) -> dict[str, float]:
        """Each reward term's weight as GRPO will use it (rules by their names, then the reward model, then the
        Python function)."""
        weights = {rule.name: rule.weight for rule in parse_rules(self.rewards)}
        if self.reward_model:
            weights["reward_model"] = self.reward_model_weight
        if self.reward_file:
            weights["python_reward"] = 1.0
        return weights


_SECTIONS = {"model": ModelConfig, "lora": LoraSettings, "data": DataConfig, "training": TrainingConfig,
             "preference": PreferenceConfig}


@dataclass
class RunConfig:
    """Everything a fine-tuning run needs; ``runs/<id>/config.yaml`` is this object as YAML."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    run_name: str = ""
    stage: str = "sft"  # sft, or an RLHF stage: reward (reward model), dpo, kto, grpo (finetune/stages/)

    def __post_init__(self) -> None:
        bad = [name for name, kind in _SECTIONS.items() if not isinstance(getattr(self, name), kind)]
        if bad:
            raise ConfigError({name: f"expected a {_SECTIONS[name].__name__}" for name in bad})
        if self.stage not in STAGES:
            raise ConfigError({"stage": f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}"})
        if self.lora.method == "full" and self.model.bits in (4, 8):
            # A quantized weight has no gradient: only adapters can train on a 4/8-bit base.
            raise ConfigError({"model.bits": f"Full fine-tuning updates every weight, so it needs a 16 or 32-bit "
                                             f"base; got {self.model.bits}-bit (use LoRA for QLoRA)"})
        if self.lora.method != "lora" and self.stage != "sft":
            raise ConfigError({"lora.method": f"The {self.stage} stage trains a LoRA adapter; method must be "
                                              f"'lora', got {self.lora.method!r}"})
        if self.stage == "kto" and self.training.batch_size < 2:
            # KTO estimates its KL term from the other answers in the batch.
            raise ConfigError({"training.batch_size": "KTO needs a batch size of at least 2"})
        if self.stage == "grpo":
            self._check_grpo()
        if self.training.watches_best():
            self._check_held_out()
        if self.training.processes > 1:
            self._check_processes()

    def _check_held_out(self) -> None:
        """Early stopping and keep='best' judge the held-out evaluations: refuse a run that will have none."""
        what = self.training.watch_name()
        field_name = "training.early_stopping_patience" if self.training.early_stopping_patience else "training.keep"
        if self.stage == "grpo":
            # GRPO samples its own answers; held-out prompts would need sampling and scoring too, so it has no
            # validation metric to stop on.
            raise ConfigError({field_name: f"{what} needs a held-out evaluation, and GRPO has none (it scores its "
                                           "own samples): set early stopping patience to 0 and keep to 'last'"})
        if self.training.eval_steps == 0:
            # Early stopping and the best checkpoint compare evaluations made during training.
            raise ConfigError({"training.eval_steps": f"{what} needs evaluations during training: set eval steps "
                                                      "above 0 (for example 10)"})
        if self.data.validation_fraction == 0:
            raise ConfigError({"data.validation_fraction": f"{what} needs held-out rows to evaluate on: set the "
                                                           "validation fraction above 0 (for example 0.1)"})

    def _check_processes(self) -> None:
        """What several processes cannot do: FSDP shards whole modules of one dtype, and every process needs rows
        of its own for each forward pass."""
        t, problems = self.training, {}
        if t.strategy == "fsdp":
            if self.model.bits == 8:
                problems["model.bits"] = ("FSDP cannot shard 8-bit (LLM.int8) weights: use 4 bits (FSDP-QLoRA), 16 "
                                          "or 32, or strategy 'ddp'")
            if self.lora.method not in FSDP_METHODS:
                problems["lora.method"] = (f"FSDP cannot shard a model trained with {self.lora.method}: use lora, "
                                           "dora, rslora or full, or strategy 'ddp'")
            if self.stage != "sft":
                problems["training.strategy"] = (f"FSDP is offered for SFT runs; the {self.stage} stage runs with "
                                                 "strategy 'ddp'")
        rows = t.batch_size * t.processes
        if self.data.max_samples is not None and self.data.max_samples < rows:
            problems["data.max_samples"] = (f"{t.processes} processes x batch size {t.batch_size} take {rows} training "
                                            f"rows a forward pass, but max samples keeps {self.data.max_samples}: "
                                            f"raise max samples to {rows} or more, or lower the batch size or the "
                                            "processes")
        if problems:
            raise ConfigError(problems)

    def _check_grpo(self) -> None:
        problems = {}
        weights = self.preference.reward_weights()
        if not weights:
            problems["preference.reward_model"] = ("GRPO samples answers and trains against rewards: name a "
                                                   "finished reward run (step 3) or declare rule rewards")
        elif math.isclose(sum(weights.values()), 0.0, abs_tol=1e-12):
            problems["preference.rewards"] = (
                f"the reward weights sum to zero ({', '.join(f'{k} {v:g}' for k, v in weights.items())}): give "
                "the terms weights whose sum is not 0 (a penalty is a negative weight beside a larger positive one)")
        if self.training.batch_size % self.preference.num_generations:
            # TRL groups the sampled answers of one prompt inside a batch.
            problems["training.batch_size"] = (f"GRPO needs a batch size that is a multiple of the answers per "
                                               f"prompt ({self.preference.num_generations}), got "
                                               f"{self.training.batch_size}")
        if problems:
            raise ConfigError(problems)


def from_dict(raw: dict[str, Any]) -> RunConfig:
    """Build a RunConfig from nested dicts; unknown keys and every bad value are reported together."""
    if not isinstance(raw, dict):
        raise ConfigError({"config": "the config must be a mapping of sections (model, lora, data, training)"})
    problems: dict[str, str] = {}
    unknown = set(raw) - set(_SECTIONS) - {"run_name", "stage"}
    for key in sorted(unknown):
        problems[key] = f"unknown section '{key}'; expected one of {', '.join(_SECTIONS)}"
    sections: dict[str, Any] = {}
    for name, kind in _SECTIONS.items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            problems[name] = f"section '{name}' must be a mapping of field: value"
            continue
        known = {f.name for f in dataclasses.fields(kind)}
        for key in sorted(set(values) - known):
            problems[f"{name}.{key}"] = f"unknown field '{key}' in section '{name}'"
        try:
            sections[name] = kind(**{k: v for k, v in values.items() if k in known})
        except ConfigError as error:
            problems.update(error.problems)
    if problems:
        raise ConfigError(problems)
    return RunConfig(**sections, run_name=str(raw.get("run_name") or ""), stage=str(raw.get("stage") or "sft"))


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def load_config(path: str | Path) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError({"config": f"config file not found: {path}"})
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError({"config": f"{path} is not valid YAML: {error}"}) from None
    return from_dict(raw or {})


def save_config(cfg: RunConfig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def field_help(section: str, name: str) -> str:
    """The help text of one field, for UI info strings."""
    for f in dataclasses.fields(_SECTIONS[section]):
        if f.name == name:
            return f.metadata.get("help", "")
    raise KeyError(f"{section}.{name}")
