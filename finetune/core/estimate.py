"""Before a run starts: how many parameters LoRA trains, and roughly how much memory the run needs at its peak.

Nothing here loads weights. The model's architecture comes from its ``config.json`` (``AutoConfig``), the
module shapes from instantiating it on the ``meta`` device (no memory), and LoRA adds ``r·(in + out)``
parameters to each targeted ``Linear`` — the same count peft reports once the real model is loaded.

    shape = model_shape(cfg.model)
    trainable, total = lora_parameter_count(shape, cfg.lora)
    print(estimate_run(cfg, detect()).verdict)
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from finetune.core.config import LoraSettings, ModelConfig, RunConfig
from finetune.core.hardware import HardwareProfile, detect, resolve_compute_dtype
from finetune.core.lm_head import WHOLE_LOGITS_LIMIT
from finetune.core.models import ModelSourceError, from_hub_or_cache, weight_dtype

# Start checkpointing when the estimate without it would take more than this share of the device's memory.
CHECKPOINT_ABOVE_MEMORY_SHARE = 0.85

T4_MEMORY_GB = 15.0  # what torch reports for a "16 GB" T4
# The presets' Hub models, so their estimates also work offline (values from their config.json files).
KNOWN_HUB_CONFIGS: dict[str, dict[str, Any]] = {
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": dict(
        vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
        num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=True),
    "meta-llama/Llama-2-7b-chat-hf": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False),
}
LOGIT_TILE_TOKENS = 128
CUDA_CONTEXT_GB = 0.5  # the CUDA context and kernels: on the device, outside PyTorch's allocator
CPU_RUNTIME_GB = 0.3
OPTIMIZER_STATE_BYTES = {"adamw_torch": 8.0, "adamw_torch_fused": 8.0, "paged_adamw_32bit": 8.0, "adamw_8bit": 2.0,
                         "paged_adamw_8bit": 2.0, "adafactor": 1.0, "sgd": 0.0}


@dataclass(frozen=True)
class ModelShape:
    """What the estimates need from a model: its Linear layers and a few sizes."""

    name: str
    linears: tuple[tuple[str, int, int, bool], ...]   # (module name, in, out, has bias)
    total_params: int
    output_layer: str          # the LM head; 'all-linear' skips it, bitsandbytes keeps it unquantized
    hidden_size: int
    intermediate_size: int
    num_layers: int
    vocab_size: int
    model_type: str = ""       # picks peft's default IA3 targets for the architecture


@dataclass(frozen=True)
class MemoryEstimate:
    weights_gb: float
    adapter_gb: float          # LoRA weights + their gradients + optimizer states
    activations_gb: float
    logits_gb: float
    overhead_gb: float
    total_gb: float
    device_gb: float
    fits: bool
    verdict: str


# --- the model's shape, from its config only ---------------------------------------------------------------

def _auto_config(cfg: ModelConfig) -> Any:
    from transformers import AutoConfig, LlamaConfig

    try:
        return from_hub_or_cache(AutoConfig.from_pretrained, cfg.source, trust_remote_code=cfg.trust_remote_code)
    except ModelSourceError:
        # Offline, the presets' Hub models still get an estimate from their known shapes.
        if cfg.source in KNOWN_HUB_CONFIGS:
            return LlamaConfig(**KNOWN_HUB_CONFIGS[cfg.source])
        raise


def shape_from_config(config: Any, name: str = "") -> ModelShape:
    """Instantiate on the meta device: real module names and shapes, zero bytes allocated."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    output = model.get_output_embeddings()
    output_name = next((n for n, m in model.named_modules() if m is output), "lm_head")
    linears = tuple((n, m.in_features, m.out_features, m.bias is not None)
                    for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(getattr(text, "hidden_size", 0) or 0)
    return ModelShape(
        name=name or getattr(config, "_name_or_path", "") or type(config).__name__,
        linears=linears, total_params=sum(p.numel() for p in model.parameters()), output_layer=output_name,
        hidden_size=hidden, intermediate_size=int(getattr(text, "intermediate_size", 0) or 4 * hidden),
        num_layers=int(getattr(text, "num_hidden_layers", 0) or 0),
        vocab_size=int(getattr(text, "vocab_size", 0) or 0), model_type=str(getattr(config, "model_type", "")))


@functools.lru_cache(maxsize=16)
def _cached_shape(source: str, trust_remote_code: bool, stamp: float) -> ModelShape:
    config = _auto_config(ModelConfig(source=source, bits=32, trust_remote_code=trust_remote_code))
    return shape_from_config(config, source)


def model_shape(cfg: ModelConfig) -> ModelShape:
    """The shape of ``cfg.source``; raises ModelSourceError (offline Hub id, bad folder) like loading would."""
    folder = Path(cfg.source).expanduser() / "config.json"
    stamp = folder.stat().st_mtime if folder.is_file() else 0.0  # a re-saved local model is re-read
    return _cached_shape(cfg.source, cfg.trust_remote_code, stamp)


# --- parameter counts --------------------------------------------------------------------------------------

def targeted_linears(shape: ModelShape, lora: LoraSettings) -> list[tuple[str, int, int, bool]]:
    """The Linear layers peft would wrap: 'all-linear' = every Linear but the LM head; a list matches name ends."""
    targets = lora.target_module_list()
    if targets == "all-linear":
        return [lin for lin in shape.linears if lin[0] != shape.output_layer]
    return [lin for lin in shape.linears
            if any(lin[0] == t or lin[0].endswith("." + t) for t in targets)]


def lora_parameter_count(shape: ModelShape, lora: LoraSettings) -> tuple[int, int]:
    """(trainable, total) as peft's ``get_nb_trainable_parameters`` reports them (total includes LoRA)."""
    targeted = targeted_linears(shape, lora)
    trainable = sum(lora.rank * (fan_in + fan_out) for _, fan_in, fan_out, _ in targeted)
    if lora.bias == "all":
        trainable += sum(fan_out for _, _, fan_out, has_bias in shape.linears if has_bias)
    elif lora.bias == "lora_only":
        trainable += sum(fan_out for _, _, fan_out, has_bias in targeted if has_bias)
    adapter_only = sum(lora.rank * (fan_in + fan_out) for _, fan_in, fan_out, _ in targeted)
    return trainable, shape.total_params + adapter_only


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def ia3_parameter_count(shape: ModelShape, lora: LoraSettings) -> int:
    """One vector per targeted layer: its output size, or its input size for a feed-forward layer."""
    from peft.utils.constants import (TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD,
                                      TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS)

    feedforward = lora.feedforward_module_list()
    if feedforward is None and lora.target_module_list() == "all-linear":  # as train.to_peft_config: peft defaults
        targeted = [lin for lin in shape.linears if _matches(lin[0], TARGETS.get(shape.model_type, []))]
        feedforward = FEEDFORWARD.get(shape.model_type, [])
    else:
        targeted = targeted_linears(shape, lora)
        feedforward = feedforward or []
    return sum(fan_in if _matches(name, feedforward) else fan_out for name, fan_in, fan_out, _ in targeted)


def peft_parameter_count(shape: ModelShape, lora: LoraSettings) -> tuple[int, int]:
    """(trainable, total) for ``lora.method``, as peft (or, for full fine-tuning, the model) reports them."""
    if lora.method == "full":
        return shape.total_params, shape.total_params
    if lora.method == "ia3":
        extra = ia3_parameter_count(shape, lora)
    elif lora.method == "prompt_tuning":
        extra = lora.num_virtual_tokens * shape.hidden_size
    else:
        trainable, total = lora_parameter_count(shape, lora)
        if lora.method == "dora":  # one magnitude per output row of every targeted layer
            magnitudes = sum(fan_out for _, _, fan_out, _ in targeted_linears(shape, lora))
            return trainable + magnitudes, total + magnitudes
        return trainable, total
    return extra, shape.total_params + extra


def parameter_text(trainable: int, total: int) -> str:
    return f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / max(total, 1):.3f}%)"


# --- peak memory -------------------------------------------------------------------------------------------

def bytes_per_quantized_weight(model: ModelConfig) -> float:
    """Storage of one frozen Linear weight, quantization constants included."""
    if model.bits == 4:
        # One absmax per 64 weights: fp32 (4 B), or 8-bit plus an fp32 per 256 blocks with double quant.
        constants = (1 + 4 / 256) / 64 if model.double_quant else 4 / 64
        return 0.5 + constants
    if model.bits == 8:
        return 1.0 + 0.01  # int8 plus a per-row fp32 scale
    return 2.0 if model.bits == 16 else 4.0


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


def uses_cpu_lm_head(cfg: RunConfig, profile: HardwareProfile) -> bool:
    """finetune/core/lm_head.py's path: on the CPU, unless switched off (the recipe and the estimate ask)."""
    return cfg.training.cpu_lm_head and not profile.is_cuda


def checkpointing_choice(cfg: RunConfig, profile: HardwareProfile) -> tuple[bool, str]:
    """(on?, why): "auto" turns checkpointing on when the estimate without it would not fit comfortably."""
    mode = cfg.training.gradient_checkpointing
    if mode != "auto":
        return mode == "on", f"gradient checkpointing {mode} (set in the config)"
    if not profile.is_cuda:
        return False, "gradient checkpointing off: auto on the CPU, where RAM is not the limit"
    without = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, gradient_checkpointing="off"))
    try:
        estimate = estimate_memory(model_shape(cfg.model), without, profile)
    except Exception:  # the model's shape is unknown (e.g. offline Hub id): take the safe side
        return True, "gradient checkpointing on: auto, the model's size could not be estimated"
    needed = estimate.total_gb > profile.memory_gb * CHECKPOINT_ABOVE_MEMORY_SHARE
    return needed, (f"gradient checkpointing {'on' if needed else 'off'}: auto, about {estimate.total_gb:.1f} GB "
                    f"without it on {profile.memory_gb:.0f} GB")


def uses_checkpointing(cfg: RunConfig, profile: HardwareProfile) -> bool:
    return checkpointing_choice(cfg, profile)[0]


def memory_breakdown(shape: ModelShape, cfg: RunConfig, profile: HardwareProfile) -> dict[str, float]:
    """Bytes by part. Rough by design (within ~30%): enough to tell 'fits' from 'will not fit'."""
    quantizable = sum(i * o for n, i, o, _ in shape.linears if n != shape.output_layer)
    if cfg.model.bits in (16, 32):
        quantizable = 0
    other_bytes = _dtype_bytes(weight_dtype(cfg.model, profile))
    weights = quantizable * bytes_per_quantized_weight(cfg.model) + (shape.total_params - quantizable) * other_bytes
    trainable, _ = peft_parameter_count(shape, cfg.lora)
    state = OPTIMIZER_STATE_BYTES.get(cfg.training.optimizer, 8.0)
    # A full fine-tune's weights are already counted above; an adapter's fp32 copy comes on top.
    adapter = trainable * ((0 if cfg.lora.method == "full" else 4) + 4 + state)  # fp32 weights and gradients, plus the optimizer's states
    tokens = cfg.training.batch_size * cfg.data.max_seq_length  # the worst batch: every row at max length
    act_bytes = _dtype_bytes(torch.float32 if cfg.model.bits == 32 else
                             _compute_dtype(cfg.model, profile))
    # Per layer and token the backward pass keeps ~ (9·hidden + 2.7·intermediate) values: fitted to peaks measured
    # on an H100 with the default recipe (docs/benchmarks.md, within 10% for 1 B and 8 B Llama shapes). With
    # checkpointing only each layer's input stays, plus one layer recomputed at a time.
    per_layer = 9 * shape.hidden_size + 2.7 * shape.intermediate_size
    if uses_checkpointing(cfg, profile):
        activations = tokens * act_bytes * (shape.hidden_size * shape.num_layers + per_layer)
    else:
        activations = tokens * act_bytes * per_layer * shape.num_layers
    whole_logits = tokens * shape.vocab_size
    if uses_cpu_lm_head(cfg, profile) and whole_logits <= WHOLE_LOGITS_LIMIT:
        # finetune/core/lm_head.py: the answer tokens' fp32 logits, their log-softmax and its gradient
        logits = whole_logits * 4 * 3
    else:
        # TRL's fused LM head scores the answer tokens in tiles (so does lm_head.py above its limit): full
        # (tokens x vocab) logits never exist.
        logits = min(tokens, LOGIT_TILE_TOKENS) * shape.vocab_size * 4 * 2
    overhead = (CUDA_CONTEXT_GB if profile.is_cuda else CPU_RUNTIME_GB) * 2**30 + 0.05 * activations
    if cfg.training.strategy == "fsdp" and cfg.training.processes > 1:
        # FSDP keeps 1/N of the weights, adapter and optimizer states per device, plus one layer gathered whole
        # for its forward/backward at a time.
        n = cfg.training.processes
        weights = weights / n + weights / max(shape.num_layers, 1)
        adapter = adapter / n
    return {"weights": weights, "adapter": adapter, "activations": activations, "logits": logits,
            "overhead": overhead}


def _compute_dtype(model: ModelConfig, profile: HardwareProfile) -> torch.dtype:
    return resolve_compute_dtype(model.compute_dtype, profile)


def estimate_memory(shape: ModelShape, cfg: RunConfig, profile: HardwareProfile) -> MemoryEstimate:
    parts = {k: v / 2**30 for k, v in memory_breakdown(shape, cfg, profile).items()}
    total = sum(parts.values())
    fits = total <= profile.memory_gb * 0.95
    return MemoryEstimate(parts["weights"], parts["adapter"], parts["activations"], parts["logits"],
                          parts["overhead"], total, profile.memory_gb, fits, _verdict(total, profile))


def _verdict(total_gb: float, profile: HardwareProfile) -> str:
    where = f"this {'GPU' if profile.is_cuda else 'machine'} ({profile.name}, {profile.memory_gb:.1f} GB)"
    if total_gb <= profile.memory_gb * 0.8:
        text = f"Estimated peak memory ≈ {total_gb:.2f} GB: fits on {where}."
    elif total_gb <= profile.memory_gb * 0.95:
        text = f"Estimated peak memory ≈ {total_gb:.2f} GB: tight on {where}; lower batch size or sequence length."
    else:
        text = (f"Estimated peak memory ≈ {total_gb:.2f} GB: will NOT fit on {where}. Use fewer bits, a smaller "
                "batch or sequence length, or turn on gradient checkpointing.")
    if "T4" not in profile.name:
        t4 = "fits" if total_gb <= T4_MEMORY_GB * 0.95 else "will not fit"
        text += f" On a 16 GB T4 (Hugging Face Spaces) it {t4}."
    return text


def strategy_note(shape: ModelShape, cfg: RunConfig, profile: HardwareProfile) -> str:
    """For several processes: memory per device with DDP (each holds the whole model) and with FSDP (the base
    sharded across them), and which of the two fits."""
    n = cfg.training.processes
    per_device = {strategy: estimate_memory(shape, dataclasses.replace(
        cfg, training=dataclasses.replace(cfg.training, strategy=strategy)), profile) for strategy in ("ddp", "fsdp")}
    fitting = [name.upper() for name, estimate in per_device.items() if estimate.fits]
    verdict = ("both fit; DDP is simpler and faster" if len(fitting) == 2 else
               f"only {fitting[0]} fits" if fitting else "neither fits: fewer bits, a smaller batch or sequence length")
    if not profile.is_cuda:  # processes on the CPU share one memory, and FSDP needs GPUs to shard across
        verdict = (f"on the CPU only DDP runs (FSDP needs GPUs), and its {n} processes share this machine's "
                   f"{profile.memory_gb:.1f} GB: about {n * per_device['ddp'].total_gb:.2f} GB in all")
    t = cfg.training
    return (f"With {n} processes, per device: DDP ≈ {per_device['ddp'].total_gb:.2f} GB (each holds the whole "
            f"model), FSDP ≈ {per_device['fsdp'].total_gb:.2f} GB (the base sharded over {n}); {verdict}. Effective "
            f"batch: {t.batch_size} x {t.gradient_accumulation} accumulation x {n} processes = "
            f"{t.batch_size * t.gradient_accumulation * n} rows a step.")


def estimate_run(cfg: RunConfig, profile: HardwareProfile | None = None,
                 measured: list[tuple[float, float]] | None = None) -> tuple[str, MemoryEstimate]:
    """(parameter text, memory estimate) for the Train tab; raises what ``model_shape`` raises. With several
    processes the estimate is per device, and its verdict compares DDP with FSDP. On the CPU, ``measured``
    (formula GB, measured peak GB) pairs of this machine's finished runs calibrate it (``memory_records``)."""
    profile = profile or detect()
    shape = model_shape(cfg.model)
    estimate = estimate_memory(shape, cfg, profile)
    if not profile.is_cuda:
        estimate = calibrated_on_cpu(estimate, profile, measured or [])
    if cfg.training.processes > 1:
        estimate = dataclasses.replace(estimate, verdict=f"{estimate.verdict} {strategy_note(shape, cfg, profile)}")
    return parameter_text(*peft_parameter_count(shape, cfg.lora)), estimate


# --- the CPU: the formula against the peaks runs measured here -----------------------------------------------------
# The formula counts tensors; it was fitted to CUDA peaks on an H100 (within 9% there, docs/benchmarks.md). On the
# CPU a run's peak is the process's resident memory: the Python runtime and libraries, and memory the allocator
# keeps after loading, come on top (the cpu-quick run measured 2.47 GB against a formula of 1.37 GB). Each finished
# run records both numbers (run_info.json: memory_formula_gb, peak_memory_mb), and later estimates scale by them.

def memory_ratio(measured: list[tuple[float, float]]) -> float | None:
    """The median of measured peak / formula over this machine's finished runs; None without any."""
    ratios = sorted(peak / formula for formula, peak in measured if formula > 0 and peak > 0)
    if not ratios:
        return None
    middle = len(ratios) // 2
    return ratios[middle] if len(ratios) % 2 else (ratios[middle - 1] + ratios[middle]) / 2


def calibrated_on_cpu(estimate: MemoryEstimate, profile: HardwareProfile,
                      measured: list[tuple[float, float]]) -> MemoryEstimate:
    """The CPU estimate scaled by what this machine's runs measured, or said to leave the process out."""
    ratio = memory_ratio(measured)
    if ratio is None:
        note = (" On the CPU this counts tensors only: the process's peak memory also holds the Python runtime, the "
                "libraries and memory kept after loading the model, so expect more. After a run, its status shows "
                "this estimate beside the peak it measured, and later estimates are calibrated on it.")
        return dataclasses.replace(estimate, verdict=estimate.verdict + note)
    total = estimate.total_gb * ratio
    fits = total <= profile.memory_gb * 0.95
    calibration = (f" (the formula's {estimate.total_gb:.2f} GB × {ratio:.2f}, the median measured peak / formula of "
                   f"{len(measured)} finished run{'s' if len(measured) != 1 else ''} on this machine)")
    verdict = _verdict(total, profile).replace(f"{total:.2f} GB", f"{total:.2f} GB{calibration}", 1)
    return dataclasses.replace(estimate, total_gb=total, fits=fits, verdict=verdict)


def memory_check_text(info: dict[str, Any]) -> str:
    """After a run: its estimate beside its measured peak, so a drift between the two is seen."""
    formula, peak_mb = info.get("memory_formula_gb"), info.get("peak_memory_mb")
    if not isinstance(formula, (int, float)) or not isinstance(peak_mb, (int, float)) or formula <= 0:
        return ""
    peak = peak_mb / 1024
    what = "peak resident memory of the process" if info.get("memory_device") == "cpu" else "peak GPU memory"
    return (f"Memory: the formula estimated {formula:.2f} GB; the run measured {peak:.2f} GB ({what}), "
            f"{peak / formula:.2f}x the formula.")
