"""The LoRA / QLoRA aid beside the Train tab's form: W + (alpha/r)·B·A with the form's own numbers (the scale, one
example layer, the trainable count) and, at 4 bits, what QLoRA stores and trains. Not a tab: the Train tab shows
it, the course explains it."""

from __future__ import annotations

from typing import Any

from finetune.core.config import ConfigError, LoraSettings, ModelConfig
from finetune.core.estimate import lora_parameter_count, model_shape, parameter_text, targeted_linears
from finetune.core.paths import model_source as gated_model_source

LORA_STARTS = {  # how A and B start, per lora.init: the sentence the LoRA aid ends its first line with
    "default": "B starting at 0, so training starts exactly at the base model.",
    "loftq": "starting (LoftQ) as the best rank-r fix of the 4-bit rounding error W - deq(Q(W)), so B·A is not 0 at "
             "step 0 and base + adapter starts closer to the full-precision W.",
    "pissa": "starting (PiSSA) as W's top r singular directions, which are taken out of W; the result is saved as a "
             "plain LoRA on the unchanged W.",
    "olora": "starting (OLoRA) from a QR factorisation of W, taken out of W; the result is saved as a plain LoRA on "
             "the unchanged W.",
}


def lora_aid_markdown(model_source: str, rank: Any, alpha: Any, target_modules: str, bits: Any, quant_type: str,
                      double_quant: bool, optimizer: str, init: str = "default") -> str:
    """W + (alpha/r)·B·A with this form's numbers: the scale, one example layer, the live trainable count, and how
    A and B start (``init``, finetune/core/lora_init.py)."""
    try:
        lora = LoraSettings(rank=rank, alpha=alpha, target_modules=target_modules or "all-linear")
        model = ModelConfig(source=gated_model_source(model_source), bits=bits, quant_type=quant_type,
                            double_quant=double_quant)
        shape = model_shape(model)
    except ConfigError as error:
        return "LoRA aid unavailable until the form is valid: " + "; ".join(error.problems.values())
    except Exception as error:  # offline Hub id, unreadable folder: say why, keep the tab usable
        return f"LoRA aid unavailable: {error}"
    targeted = targeted_linears(shape, lora)
    if not targeted:
        return f"No Linear layer matches target modules '{lora.target_modules}'."
    name, fan_in, fan_out, _ = targeted[0]
    lines = [
        f"**LoRA:** each targeted layer computes h = W·x + (α/r)·B·A·x = W·x + ({lora.alpha:g}/{lora.rank})·B·A·x, "
        f"scale {lora.alpha / lora.rank:g}. W is frozen; A (r x d_in) and B (d_out x r) train, "
        f"{LORA_STARTS.get(init, LORA_STARTS['default'])}",
        f"Example `{name}`: W has {fan_in:,} x {fan_out:,} = {fan_in * fan_out:,} frozen weights; A and B add "
        f"r·(d_in + d_out) = {lora.rank}·({fan_in:,} + {fan_out:,}) = {lora.rank * (fan_in + fan_out):,} trainable.",
        f"Over {len(targeted)} targeted layers: **{parameter_text(*lora_parameter_count(shape, lora))}**.",
    ]
    if model.bits == 4:
        paged = "a paged optimizer" if optimizer.startswith("paged") else f"`{optimizer}` (QLoRA uses a paged one)"
        lines.append(f"**QLoRA:** the frozen W is stored in 4-bit {model.quant_type.upper()}"
                     f"{' with double quantization' if model.double_quant else ''} and dequantized per matmul; "
                     f"A and B train in 16/32-bit, with {paged}.")
    return "  \n".join(lines)
