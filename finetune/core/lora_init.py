"""How a LoRA adapter starts: ``lora.init`` -> peft's ``init_lora_weights``, and where each choice does not apply.

- ``default``: A random, B = 0, so base + adapter is exactly the base at step 0 (the LoRA paper).
- ``loftq``: on a 4-bit base, A and B start as the best rank-r approximation of the quantization error
  ``W - deq(Q)``, so ``deq(Q) + s·B·A`` starts closer to the full-precision W than ``deq(Q)`` alone (LoftQ,
  Li et al. 2023, one alternating step).
- ``pissa``: A and B start as W's top r singular directions and the base keeps the rest (PiSSA).
- ``olora``: A and B start from a QR decomposition of W, taken out of the base (OLoRA).

Why LoftQ is done here instead of by peft's ``init_lora_weights="loftq"``: peft 0.21 runs LoftQ on a CUDA (or
XPU) device only (it moves every weight to "cuda"), wants the unquantized model and leaves re-quantizing to the
user, and puts the low-rank residual into B·A without dividing by the scale s = alpha/r (peft issue #1982), so
with alpha = 2r its start is exactly as far from W as the default's. ``apply_loftq`` instead takes the model as
training loads it (4-bit, default LoRA init), reads each full-precision W from the base's safetensors, and sets
``B·A = lowrank_r(W - deq(Q)) / s``. The base stays the ordinary 4-bit quantization of W, so the trained adapter
loads onto the same 4-bit base in Chat and Evaluate like any other adapter.

    kwargs = peft_init_kwargs(cfg.lora)          # -> LoraConfig(**kwargs, ...)
    problems = init_problems(cfg)                # what the form shows before a run starts
    seconds = apply_loftq(peft_model, weights_folder, cfg.lora)   # after get_peft_model, when init == "loftq"

Basic module: of the project it imports only the config.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from finetune.core.config import LORA_INITS, ConfigError, LoraSettings, RunConfig

# lora.init -> peft's init_lora_weights. LoftQ builds the default adapter first; apply_loftq then replaces A and B.
PEFT_INIT = {"default": True, "loftq": True, "pissa": "pissa", "olora": "olora"}
assert set(PEFT_INIT) == set(LORA_INITS)

NAMES = {"default": "The default initialisation", "loftq": "LoftQ", "pissa": "PiSSA", "olora": "OLoRA"}
BASE_CHANGING = ("pissa", "olora")
LOFTQ_NEEDS_WEIGHTS = ("LoftQ starts from the base's full-precision weights, and this base's safetensors are not on "
                       "this machine.")  # these move part of W into the adapter: the base the adapter sits on changes


def peft_init_kwargs(lora: LoraSettings) -> dict[str, Any]:
    """The LoraConfig keyword(s) for ``lora.init``."""
    return {"init_lora_weights": PEFT_INIT[lora.init]}


def init_problems(cfg: RunConfig, weights_folder: Path | None = None) -> list[str]:
    """Why ``cfg.lora.init`` does not apply to this run, one sentence each; empty when it does.

    ``weights_folder`` is the base model's local folder (models.resolve_source), checked for the full-precision
    safetensors LoftQ starts from; None skips that check (e.g. a Hub model not downloaded yet)."""
    init = cfg.lora.init
    if init == "default":
        return []
    name = NAMES[init]
    if cfg.lora.method not in ("lora", "rslora"):
        return [f"{name} initialises LoRA's A and B matrices; the method '{cfg.lora.method}' has none to "
                "initialise (DoRA's magnitudes start from the base weights, so it keeps the default start)."]
    if cfg.preference.start_adapter:
        return [f"This run continues the adapter '{cfg.preference.start_adapter}', so there is no new adapter for "
                f"{name} to initialise; use the default."]
    if init == "loftq":
        return _loftq_problems(cfg, weights_folder)
    if init == "pissa" and cfg.model.bits in (4, 8):
        return [f"PiSSA splits the weight itself into adapter + residual, which peft does only on a 16 or 32-bit "
                f"base; this run loads the base at {cfg.model.bits} bits. Use LoftQ to start closer to the "
                "full-precision weights at 4 bits."]
    if init == "olora" and cfg.model.bits in (4, 8):
        # The saved result is converted into a plain LoRA on the original base, which assumes the base lost exactly
        # the initial adapter; re-quantizing the changed base breaks that, and OLoRA started farther from the
        # full-precision weights than the default on the 4-bit embedded model (13.3% vs 9.4%).
        return [f"OLoRA takes part of each weight into the adapter and re-quantizes the rest, so its result cannot "
                f"be turned back into a LoRA on the unchanged {cfg.model.bits}-bit base (and on the 4-bit embedded "
                "model it starts farther from the full-precision weights than the default). Use 16 or 32 bits, "
                "or LoftQ at 4 bits."]
    return []


def _loftq_problems(cfg: RunConfig, weights_folder: Path | None) -> list[str]:
    if cfg.model.bits in (16, 32):
        return [f"LoftQ starts the adapter as a fix for the 4-bit quantization error; a {cfg.model.bits}-bit run "
                "has no quantization error, so LoftQ would start A and B at zero and nothing would train. Use the "
                "default, or pick 4 bits."]
    if cfg.model.bits == 8:
        return ["LoftQ is offered for 4-bit bases only (8-bit quantization error is far smaller); pick 4 bits or "
                "the default initialisation."]
    if weights_folder is not None and not list(Path(weights_folder).glob("*.safetensors")):
        return ["LoftQ starts from the base's full-precision weights and reads them from safetensors files; the "
                "base model's folder has none."]
    return []


def check_init(cfg: RunConfig, weights_folder: Path | None = None) -> None:
    """Raise a ConfigError on ``lora.init`` when it does not apply (for the stage's checks before training)."""
    problems = init_problems(cfg, weights_folder)
    if problems:
        raise ConfigError({"lora.init": " ".join(problems)})


def scaling(lora: LoraSettings) -> float:
    """s in W + s·B·A: alpha / r, or alpha / sqrt(r) for rsLoRA."""
    return lora.alpha / math.sqrt(lora.rank) if lora.method == "rslora" else lora.alpha / lora.rank


# --- LoftQ on the model as training loads it -----------------------------------------------------------------

def loftq_factors(residual: Any, rank: int, scale: float) -> tuple[Any, Any]:
    """(A, B) with s·B·A the best rank-r approximation (Eckart-Young) of ``residual`` = W - deq(Q); the square
    root of each singular value goes to each side so A and B start at similar sizes."""
    import torch

    # float32 is plenty for a residual and halves the SVD time (the bulk of LoftQ's cost) against float64.
    u, s, vh = torch.linalg.svd(residual.float(), full_matrices=False)
    root = torch.sqrt(s[:rank] / scale)
    return root[:, None] * vh[:rank], u[:, :rank] * root


def full_precision_weights(folder: Path) -> dict[str, Path]:
    """{tensor name: safetensors file} of a saved model (single or sharded)."""
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    files: dict[str, Path] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            files.update({name: path for name in handle.keys()})
    return files


def read_weight(files: dict[str, Path], module_name: str) -> Any:
    """The float32 weight of ``module_name`` (a path as peft names it, with or without the model's own prefix),
    or None when the files do not hold it."""
    from safetensors import safe_open

    keys = [f"{module_name}.weight", f"{module_name.split('.', 1)[-1]}.weight"]
    if module_name.rsplit(".", 1)[-1] == "lm_head":
        keys.append("model.embed_tokens.weight")  # tied output head: saved once, as the input embeddings
    for key in keys:
        if key in files:
            with safe_open(str(files[key]), framework="pt") as handle:
                return handle.get_tensor(key).float()
    return None


def lora_4bit_layers(peft_model: Any, adapter: str = "default") -> list[tuple[str, Any]]:
    """(module path as the base model names it, peft layer) for every LoRA layer on a bitsandbytes 4-bit weight."""
    layers = []
    for name, module in peft_model.named_modules():
        base = getattr(module, "base_layer", None)
        if base is None or adapter not in getattr(module, "lora_A", {}):
            continue
        if base.weight.__class__.__name__ == "Params4bit":
            layers.append((name.removeprefix("base_model.model."), module))
    return layers


def dequantized(layer: Any) -> Any:
    """The 4-bit base weight of a peft LoRA layer as float32, the way the forward pass sees it."""
    import bitsandbytes as bnb

    weight = layer.base_layer.weight
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()


def apply_loftq(peft_model: Any, weights_folder: Path, adapter: str = "default") -> float:
    """Set every 4-bit LoRA layer's A and B so s·B·A is the best rank-r fix of its quantization error. Call right
    after get_peft_model, before any forward pass (bitsandbytes repacks 4-bit weights for its CPU kernel at the
    first forward). Returns the seconds it took."""
    import torch

    started = time.perf_counter()
    files = full_precision_weights(weights_folder)
    layers = lora_4bit_layers(peft_model, adapter)
    if not layers:
        raise ConfigError({"lora.init": "LoftQ found no LoRA layer on a 4-bit weight: load the base at 4 bits."})
    with torch.no_grad():
        for name, layer in layers:
            weight = read_weight(files, name)
            if weight is None:
                raise ConfigError({"lora.init": f"LoftQ needs the full-precision weight {name}.weight, which the "
                                                "base model's safetensors do not hold."})
            dequant = dequantized(layer)
            residual = weight.to(dequant.device) - dequant  # on a GPU the 4-bit weight lives there, W on the CPU
            a, b = loftq_factors(residual, layer.r[adapter], layer.scaling[adapter])
            layer.lora_A[adapter].weight.copy_(a)
            layer.lora_B[adapter].weight.copy_(b)
    return time.perf_counter() - started


def reconstruction_error(peft_model: Any, weights_folder: Path, adapter: str = "default") -> tuple[float, int]:
    """(sqrt(Σ ||W - (deq(Q) + s·B·A)||²) / sqrt(Σ ||W||²), matrices) over the model's 4-bit LoRA layers: how far
    base + adapter is from the full-precision weights. Call before any forward pass (bitsandbytes repacks 4-bit
    weights for its CPU kernel at the first one); a stage can record it at step 0 in run_info."""
    import torch

    files = full_precision_weights(weights_folder)
    error_squared = weight_squared = 0.0
    layers = lora_4bit_layers(peft_model, adapter)
    with torch.no_grad():
        for name, layer in layers:
            weight = read_weight(files, name)
            if weight is None:
                raise ConfigError({"model.source": f"The base model's safetensors hold no {name}.weight."})
            update = layer.scaling[adapter] * (layer.lora_B[adapter].weight.float().cpu()
                                               @ layer.lora_A[adapter].weight.float().cpu())
            error_squared += float(torch.linalg.norm(weight - dequantized(layer).cpu() - update)) ** 2
            weight_squared += float(torch.linalg.norm(weight)) ** 2
    return (error_squared / weight_squared) ** 0.5 if weight_squared else 0.0, len(layers)
