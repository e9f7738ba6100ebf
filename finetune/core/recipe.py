"""The training recipe: the speed and memory choices, resolved for the hardware a run gets.

The usual QLoRA recipe (the classic Colab notebook) is slower and larger than plain 16-bit LoRA because it
upcasts every non-quantized weight to fp32, pads each batch to its longest row, and always recomputes activations.
LoRA Lab's default avoids each of those waste sources with maintained libraries only:

| choice                 | what it does                                                     | where         |
|------------------------|------------------------------------------------------------------|---------------|
| no fp32 upcast         | frozen weights stay in the compute dtype (no prepare_model_for_kbit_training) | always |
| fused LM head          | TRL scores only completion tokens, in tiles, never the full logits | always (TRL) |
| padding-free batches   | rows concatenated with per-row position ids; attention stays per row | switchable |
| packed attention       | varlen flash kernel (GPU) or causal SDPA per row (CPU): no cross-row blocks | Ampere+ GPU, CPU |
| Liger kernels          | Triton RMSNorm, RoPE, SwiGLU                                     | CUDA + package |
| checkpointing "auto"   | recompute activations only when the estimate says they won't fit | switchable    |
| fused AdamW            | one kernel for all adapter tensors instead of a loop             | CUDA          |
| CPU LM head            | answer tokens only, one log-softmax (finetune/core/lm_head.py)        | CPU           |
| quant storage          | 4-bit weights packed in the compute dtype (FSDP can shard them)  | CUDA          |

``resolve_recipe`` is pure and cheap: the trainer, the Train tab and the benchmark call it, and the run records
the result in run_info.json so a user sees what was applied and why.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field

from finetune.core.attention import packed_attention_supported
from finetune.core.config import RunConfig
from finetune.core.estimate import checkpointing_choice, uses_cpu_lm_head
from finetune.core.hardware import HardwareProfile

@dataclass(frozen=True)
class Recipe:
    padding_free: bool
    packed_attention: bool
    liger_kernels: bool
    gradient_checkpointing: bool
    cpu_lm_head: bool
    optimizer: str
    notes: tuple[str, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict[str, object]:
        return {**dataclasses.asdict(self), "notes": list(self.notes)}


def liger_available() -> bool:
    """Liger needs Triton, which only runs on CUDA; a CPU install has neither."""
    return importlib.util.find_spec("liger_kernel") is not None and importlib.util.find_spec("triton") is not None


def _optimizer(cfg: RunConfig, profile: HardwareProfile) -> str:
    # The fused kernel does the same math as the default loop, in one launch per step.
    if cfg.training.optimizer == "adamw_torch" and profile.is_cuda:
        return "adamw_torch_fused"
    return cfg.training.optimizer


def resolve_recipe(cfg: RunConfig, profile: HardwareProfile) -> Recipe:
    notes = []
    liger = cfg.training.liger_kernels and profile.is_cuda and liger_available()
    if cfg.training.liger_kernels and not liger:
        notes.append("Liger kernels off: they need a CUDA GPU and `pip install liger-kernel`")
    checkpointing, why = checkpointing_choice(cfg, profile)
    notes.append(why)
    padding_free = cfg.training.padding_free
    if padding_free and cfg.lora.method == "prompt_tuning":
        # peft drops position ids under prompt tuning, so concatenated rows would attend across each other.
        padding_free = False
        notes.append("padding-free batches off: prompt tuning ignores per-row position ids")
    packed = padding_free and packed_attention_supported(profile.is_cuda, profile.capability)
    if padding_free and not packed:
        notes.append("padding-free rows attend through SDPA with a block mask (the packed flash kernel needs an "
                     "Ampere or newer GPU)")
    elif packed and not profile.is_cuda:
        notes.append("padding-free rows attend one row at a time through causal SDPA (no block mask)")
    optimizer = _optimizer(cfg, profile)
    if optimizer != cfg.training.optimizer:
        notes.append(f"optimizer {cfg.training.optimizer} -> {optimizer} (same math, fused on the GPU)")
    cpu_lm_head = uses_cpu_lm_head(cfg, profile)
    if cpu_lm_head:
        notes.append("LM head on the CPU: answer tokens only, one log-softmax (TRL's tiles are built for GPUs)")
    return Recipe(padding_free=padding_free, packed_attention=packed, liger_kernels=liger,
                  gradient_checkpointing=checkpointing, cpu_lm_head=cpu_lm_head, optimizer=optimizer,
                  notes=tuple(notes))
