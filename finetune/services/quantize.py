"""Quantization side by side: one model loaded at 32/16-bit, LLM.int8 and 4-bit NF4/FP4 (with and without double
quantization), and for each format what it costs and what it loses.

Measured per format: the bytes the quantized layers really hold (packed weights plus every quantization constant),
the whole model's ``get_memory_footprint()``, the theoretical size of those layers, perplexity on a validation set,
greedy generation speed in tokens/s, and the answer to one prompt.

"Quantized layers" are the Linear layers bitsandbytes replaces: every Linear except the LM head (which, like the
embeddings and norms, stays in 16/32-bit). At 16/32-bit the same layers are measured, so the columns compare.

    for row in compare(EMBEDDED_MODEL, ["fp32", "nf4-dq"], rows, "What is LoRA?"):
        print(row.label, row.layer_mb, row.perplexity, row.tokens_per_second)
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from finetune.core.config import ModelConfig
from finetune.core.estimate import bytes_per_quantized_weight
from finetune.core.hardware import HardwareProfile, detect
from finetune.core.models import load_model, load_tokenizer, weight_dtype
from finetune.services.evaluate import dataset_loss

MB = 2**20


@dataclass(frozen=True)
class QuantFormat:
    key: str
    bits: int
    quant_type: str
    double_quant: bool
    explanation: str

    def model_config(self, source: str, trust_remote_code: bool = False) -> ModelConfig:
        return ModelConfig(source=source, bits=self.bits, quant_type=self.quant_type,
                           double_quant=self.double_quant, trust_remote_code=trust_remote_code)

    def label(self, profile: HardwareProfile) -> str:
        if self.bits == 16:  # the 16-bit dtype follows the hardware (bf16 on the CPU, fp16 on a T4)
            return str(weight_dtype(self.model_config("x"), profile)).removeprefix("torch.")
        names = {"fp32": "float32", "int8": "LLM.int8 (8-bit)", "nf4": "NF4", "nf4-dq": "NF4 + double quant",
                 "fp4": "FP4", "fp4-dq": "FP4 + double quant"}
        return names[self.key]


FORMATS: dict[str, QuantFormat] = {f.key: f for f in (
    QuantFormat("fp32", 32, "nf4", False,
                "Full precision: every weight is a 32-bit float (4 bytes). The reference for quality."),
    QuantFormat("16bit", 16, "nf4", False,
                "Half precision: 16-bit floats (2 bytes); bf16 keeps fp32's range with fewer mantissa bits, "
                "fp16 the reverse. Usually indistinguishable from fp32."),
    QuantFormat("int8", 8, "nf4", False,
                "LLM.int8: each weight row is scaled to 8-bit integers (1 byte + one fp32 scale per row); "
                "outlier input features are computed in 16-bit so quality holds."),
    QuantFormat("nf4", 4, "nf4", False,
                "NF4 (QLoRA): 4 bits per weight pick one of 16 levels spaced like a normal distribution, times "
                "an fp32 scale (absmax) per block of 64 weights: 0.5 + 4/64 bytes per weight."),
    QuantFormat("nf4-dq", 4, "nf4", True,
                "NF4 with double quantization: the per-block scales are themselves quantized to 8 bits (one "
                "fp32 per 256 scales), saving about 0.4 bit per weight. The QLoRA default."),
    QuantFormat("fp4", 4, "fp4", False,
                "FP4: 4-bit floats (sign, exponent, mantissa) with a per-block scale; its levels fit weight "
                "distributions less well than NF4, so it usually loses a little more."),
    QuantFormat("fp4-dq", 4, "fp4", True,
                "FP4 with double-quantized scales: the same 4-bit floats, smaller constants."),
)}


@dataclass(frozen=True)
class QuantResult:
    key: str
    label: str
    layer_bytes: int          # measured: what the quantized layers hold, constants included
    model_bytes: int          # model.get_memory_footprint(): all parameters and buffers
    theoretical_bytes: float  # weights x bytes per weight of the format
    weights: int              # number of weights in the quantized layers
    loss: float
    perplexity: float
    tokens_per_second: float
    answer: str
    load_seconds: float

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.layer_bytes / max(self.weights, 1)


# --- measuring memory ---------------------------------------------------------------------------------------

def quantizable_linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Every Linear-like layer (torch or bitsandbytes) except the LM head: the ones a 4/8-bit load replaces."""
    head = model.get_output_embeddings()
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head]


def _tensor_bytes(tensor: Any, seen: set[int]) -> int:
    """Bytes of a tensor, once: bitsandbytes shares lookup tables (the NF4 code) between layers."""
    if not isinstance(tensor, torch.Tensor) or tensor.data_ptr() in seen:
        return 0
    seen.add(tensor.data_ptr())
    return tensor.numel() * tensor.element_size()


def _quant_state_bytes(state: Any, seen: set[int]) -> int:
    """absmax, the code table, the offset and (double quant) the nested state's absmax and code."""
    if state is None:
        return 0
    total = sum(_tensor_bytes(getattr(state, name, None), seen) for name in ("absmax", "code", "offset"))
    return total + _quant_state_bytes(getattr(state, "state2", None), seen)


def layer_weight_count(module: torch.nn.Module) -> int:
    return int(module.in_features) * int(module.out_features)


def quantized_layer_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(measured bytes, weight count) of the quantized layers: packed weights, scales and code tables."""
    seen: set[int] = set()
    total = weights = 0
    for _, module in quantizable_linears(model):
        weight = module.weight
        total += _tensor_bytes(weight.data, seen)
        total += _quant_state_bytes(getattr(weight, "quant_state", None), seen)
        total += _tensor_bytes(getattr(weight, "SCB", None), seen)  # LLM.int8's per-row scales
        if module.bias is not None:
            total += _tensor_bytes(module.bias.data, seen)
        weights += layer_weight_count(module)
    return total, weights


def theoretical_bytes(fmt: QuantFormat, weights: int) -> float:
    """What the format should take for ``weights`` weights (biases and shared tables left out)."""
    return weights * bytes_per_quantized_weight(fmt.model_config("x"))


# --- speed and answer ---------------------------------------------------------------------------------------

def generate_timed(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int) -> tuple[str, float]:
    """(greedy answer, new tokens per second); the first forward pass (prompt) is included, as a user waits for it."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    batch = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(next(model.parameters()).device)
    started = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                pad_token_id=tokenizer.pad_token_id)
    seconds = time.perf_counter() - started
    new = output[0, batch["input_ids"].shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True).strip(), len(new) / max(seconds, 1e-9)


# --- one format, all formats --------------------------------------------------------------------------------

def measure(fmt: QuantFormat, source: str, rows: Any, prompt: str, max_new_tokens: int = 32,
            batch_size: int = 4, profile: HardwareProfile | None = None, trust_remote_code: bool = False
            ) -> QuantResult:
    """Load ``source`` in one format, measure it, and free it again."""
    profile = profile or detect()
    cfg = fmt.model_config(source, trust_remote_code)
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, profile).eval()
    try:
        layer_bytes, weights = quantized_layer_bytes(model)
        loss = dataset_loss(model, tokenizer, rows, batch_size=batch_size)
        answer, speed = generate_timed(model, tokenizer, prompt, max_new_tokens)
        return QuantResult(fmt.key, fmt.label(profile), layer_bytes, int(model.get_memory_footprint()),
                           theoretical_bytes(fmt, weights), weights, loss.loss, loss.perplexity, speed,
                           answer, round(getattr(model, "load_seconds", 0.0), 2))
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def compare(source: str, keys: list[str], rows: Any, prompt: str, max_new_tokens: int = 32,
            batch_size: int = 4, profile: HardwareProfile | None = None) -> Iterator[QuantResult]:
    """Measure each chosen format in turn (one model in memory at a time), yielding each result as it is ready."""
    unknown = [k for k in keys if k not in FORMATS]
    if unknown:
        raise ValueError(f"Unknown format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}.")
    for key in keys:
        yield measure(FORMATS[key], source, rows, prompt, max_new_tokens, batch_size, profile)
