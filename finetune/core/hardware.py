"""What machine we train on, and the dtype and attention that follow from it.

The rule (used everywhere a dtype is chosen): CPU -> float32, because bf16 matmuls on the CPU made a QLoRA
step about 14x slower here; CUDA capability < 8.0 (T4, V100) -> float16, because those cards have no fast
bf16 and ``torch.cuda.is_bf16_supported()`` says True on a T4 anyway (it emulates); >= 8.0 -> bfloat16.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HardwareProfile:
    device: str                 # "cpu" or "cuda"
    name: str                   # "NVIDIA T4", "CPU (2 cores)"
    memory_gb: float            # GPU memory, or system RAM on the CPU
    capability: tuple[int, int] | None
    compute_dtype: str          # "float32" | "float16" | "bfloat16"
    attn_implementation: str    # "sdpa" everywhere torch has it; "eager" as the fallback

    @property
    def is_cuda(self) -> bool:
        return self.device == "cuda"

    def summary(self) -> str:
        cap = f", compute capability {self.capability[0]}.{self.capability[1]}" if self.capability else ""
        return f"{self.name} · {self.memory_gb:.1f} GB{cap} · compute dtype {self.compute_dtype} · " \
               f"attention {self.attn_implementation}"


def dtype_for(device: str, capability: tuple[int, int] | None) -> str:
    if device != "cuda":
        return "float32"
    if capability is not None and capability >= (8, 0):
        return "bfloat16"
    return "float16"


def profile_for(device: str, name: str, memory_gb: float,
                capability: tuple[int, int] | None = None) -> HardwareProfile:
    """Pure constructor, so the rule can be tested for a T4 or an A100 on a CPU-only machine."""
    attention = "sdpa" if hasattr(torch.nn.functional, "scaled_dot_product_attention") else "eager"
    return HardwareProfile(device, name, memory_gb, capability, dtype_for(device, capability), attention)


def _system_memory_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return 0.0


def _gpu_memory_cap_gb() -> float | None:
    """LORA_LAB_GPU_MEMORY_GB: plan for less GPU memory than the card has (a shared GPU, or a T4 rehearsal)."""
    try:
        cap = float(os.environ.get("LORA_LAB_GPU_MEMORY_GB", ""))
    except ValueError:
        return None
    return cap if cap > 0 else None


def detect() -> HardwareProfile:
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        memory = props.total_memory / 2**30
        cap = _gpu_memory_cap_gb()
        return profile_for("cuda", props.name, min(memory, cap) if cap else memory, (props.major, props.minor))
    cores = os.cpu_count() or 1
    name = f"CPU ({cores} cores{', ' + platform.machine() if platform.machine() else ''})"
    return profile_for("cpu", name, _system_memory_gb())


def resolve_compute_dtype(requested: str, profile: HardwareProfile) -> torch.dtype:
    """The config's compute_dtype ('auto' or a name) as a torch dtype for this machine."""
    name = profile.compute_dtype if requested == "auto" else requested
    return getattr(torch, name)
