"""What every stage measures in the training child at the end, for the run history and the Compare tab:
peak memory (from the start of training, not model loading), weight bytes, size on disk, and a greedy sample
answer when the run folder holds the comparison's prompt."""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import Any

from finetune.core.config import RunConfig
from finetune.core.run_folder import PROMPT_FILE

SAMPLE_TOKENS = 40



def reset_peak_memory() -> None:
    """Start the peak-memory window at training (model loading peaks are not what the techniques differ in)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:  # Linux: writing 5 resets the process's peak resident set size (VmHWM) to its current size
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_mb() -> float:
    """Peak memory since reset_peak_memory: CUDA allocations on a GPU, else the process's peak RSS."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def weight_bytes(model: Any) -> tuple[int, int]:
    """(bytes of all parameters and buffers, bytes of the Linear weights inside the transformer blocks).

    The second number is what the bit width changes: bitsandbytes quantizes those layers and leaves embeddings,
    norms and the LM head in the compute dtype. 4-bit constants (absmax) are counted too.
    """
    import torch

    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    linear = 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        # The frozen base layers only: not the LM head, not LoRA's own A/B layers.
        if not isinstance(module, torch.nn.Linear) or weight is None or "lm_head" in name or ".lora_" in name:
            continue
        linear += weight.numel() * weight.element_size()
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "absmax", None) is not None:
            linear += state.absmax.numel() * state.absmax.element_size()
    return total, linear


def folder_weight_mb(folder: Path) -> float:
    """Size of the saved weights (adapter or full model), without tokenizer and config files."""
    files = [p for p in folder.glob("*") if p.suffix in (".safetensors", ".bin", ".pt")]
    return sum(p.stat().st_size for p in files) / 2**20


def sample_answer(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = SAMPLE_TOKENS) -> str:
    """One short greedy answer, so every technique answers the same question the same deterministic way."""
    import torch

    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    device = next(model.parameters()).device
    ids = {k: v.to(device) for k, v in ids.items()}
    model.eval()
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def formula_memory(cfg: RunConfig) -> dict[str, Any]:
    """The Train tab's uncalibrated memory formula for this run, recorded beside the measured peak so later
    estimates on this machine can be calibrated against it (and a drift between the two is seen)."""
    from finetune.core.estimate import estimate_memory, model_shape
    from finetune.core.hardware import detect

    profile = detect()
    try:
        formula = estimate_memory(model_shape(cfg.model), cfg, profile).total_gb
    except Exception:  # noqa: BLE001 - a model whose shape cannot be read has no formula; the run is still fine
        return {}
    return {"memory_formula_gb": round(formula, 3), "memory_device": "cuda" if profile.is_cuda else "cpu"}


def record_measurements(trainer: Any, cfg: RunConfig, run_dir: Path, saved_dir: Path) -> dict[str, Any]:
    """What the comparison table needs beyond metrics.jsonl; the stage runner writes it into run_info.json."""
    total, linear = weight_bytes(trainer.model)
    info: dict[str, Any] = {"peft_method": cfg.lora.method, "peak_memory_mb": round(peak_memory_mb(), 1),
                            **formula_memory(cfg),
                            "weights_mb": round(total / 2**20, 2), "linear_weights_mb": round(linear / 2**20, 3),
                            "saved_weights_mb": round(folder_weight_mb(saved_dir), 3)}
    prompt_file = run_dir / PROMPT_FILE
    if prompt_file.is_file():
        try:
            info["sample_answer"] = sample_answer(trainer.model, trainer.processing_class,
                                                  prompt_file.read_text(encoding="utf-8").strip())
        except Exception as error:  # a sample is a nicety: never fail a finished run over it
            info["sample_answer"] = f"(no sample: {type(error).__name__}: {error})"
    return info
