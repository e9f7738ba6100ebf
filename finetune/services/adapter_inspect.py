# Over 600 lines on purpose: one analysis of the update s·B·A, read in order (one run, two runs, step 0), whose
# parts share the readers of the adapter's and the base's weights; splitting it would scatter those readers.
"""Inside a LoRA adapter: how large each update is, how many directions it uses, and how two runs' updates relate.

For every adapted matrix W (layer x module) of a finished LoRA-family run, the update the adapter adds is
``ΔW = s·B·A`` with ``s = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``). This module reads B and A from the run's
``adapter/adapter_model.safetensors`` and W from the base model's safetensors (one tensor at a time, so only the
frozen weights being compared are ever in memory) and reports:

- the update's size relative to the frozen weight, ``||ΔW||_F / ||W||_F``;
- the singular values of ΔW (at most r of them: ΔW has rank <= r), computed from the r x r core of B·A so no
  full-size SVD is needed;
- its **effective rank**: the fewest directions that hold ``ENERGY`` (90%) of the update's energy, the energy
  being the sum of squared singular values (= ``||ΔW||_F²``);
- for two runs on the same base, the **principal angles** between the subspaces their updates write into
  (the top-k left singular vectors) and read from (top-k right singular vectors), with the normalised subspace
  similarity ``||U1ᵀU2||_F² / k`` of the LoRA paper (section 7.2) and its chance level ``k / d`` for random
  subspaces of the same size.

DoRA adapters are handled by rebuilding the real weight change ``m ⊙ (W + sBA) / ||W + sBA||_row - W`` (its rank
is not bounded by r, so it takes a full SVD). IA3, prompt tuning, full fine-tuning, and LoRA adapters whose
PiSSA/OLoRA start changed the base weights are refused with a message that says why.

    report = inspect_run(Path("runs/cpu-quick"))
    print(report.summary())
    for row in report.top_changed(5): print(row)
    similarity = compare_updates(Path("runs/a"), Path("runs/b"), top_k=4)

App service: imports basic modules only (config, lora_init, models, run_folder).
"""

from __future__ import annotations

import functools
import json
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from finetune.core.config import ConfigError, LoraSettings, ModelConfig, RunConfig, load_config
from finetune.core.lora_init import (apply_loftq, full_precision_weights, init_problems, peft_init_kwargs, read_weight,
                                     reconstruction_error)
from finetune.core.models import ModelSourceError, load_model, resolve_source, model_source_kind
from finetune.core.run_folder import (ADAPTER_CONFIG, ADAPTER_DIR, ADAPTER_WEIGHTS, MODEL_CONFIG, CHECKPOINT_DIR,
                                      CONFIG_COPY, FULL_MODEL_DIR, RUN_CONFIG)


ENERGY = 0.90  # effective rank = fewest singular directions holding this share of the update's energy
PEFT_PREFIX = "base_model.model."
# A LoRA tensor's key: <module path>.lora_A.weight, .lora_B.weight or .lora_magnitude_vector[.weight]
LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_magnitude_vector)(?:\.weight)?$")
LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")
MUTATING_INITS = ("pissa", "olora", "corda")  # inits that move part of W into the adapter at step 0


class InspectError(ValueError):
    """The run cannot be inspected; the message says why in plain words."""


# --- results -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModuleUpdate:
    """One adapted matrix: where it sits and what the adapter does to it."""

    name: str                       # module path, e.g. model.layers.3.self_attn.q_proj
    layer: int | None               # transformer block index; None outside the blocks (e.g. lm_head)
    module: str                     # module type, e.g. q_proj
    rank: int                       # r set for this module
    update_norm: float              # ||ΔW||_F
    weight_norm: float              # ||W||_F of the frozen full-precision weight
    singular_values: tuple[float, ...]  # of ΔW, largest first
    effective_rank: int             # fewest directions holding ENERGY of ||ΔW||_F²
    shape: tuple[int, int] = (0, 0)  # (out, in) of W

    @property
    def relative_norm(self) -> float:
        return self.update_norm / self.weight_norm if self.weight_norm > 0 else math.inf

    def caption(self) -> str:
        return (f"{self.name}: rank {self.rank} was set; {ENERGY:.0%} of the update's energy is in "
                f"{self.effective_rank} direction{'s' if self.effective_rank != 1 else ''}; the update's norm is "
                f"{self.relative_norm:.2%} of the frozen weight's.")


@dataclass
class AdapterReport:
    run: str
    base: str                       # the base model's source as the run's config names it
    method: str                     # lora, rslora or dora
    rank: int
    alpha: float
    scaling: float                  # s in ΔW = s·B·A
    modules: list[ModuleUpdate]
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def top_changed(self, count: int = 5) -> list[ModuleUpdate]:
        return sorted(self.modules, key=lambda m: m.relative_norm, reverse=True)[:count]

    def by_module_type(self) -> dict[str, float]:
        """Mean relative update norm per module type, largest first."""
        return _mean_by(self.modules, lambda m: m.module)

    def effective_rank_by_type(self) -> dict[str, float]:
        """Median effective rank per module type, most concentrated first."""
        groups: dict[str, list[int]] = {}
        for module in self.modules:
            groups.setdefault(module.module, []).append(module.effective_rank)
        return dict(sorted(((name, statistics.median(ranks)) for name, ranks in groups.items()),
                           key=lambda item: item[1]))

    def by_layer(self) -> dict[int, float]:
        """Mean relative update norm per layer, in layer order."""
        inside = [m for m in self.modules if m.layer is not None]
        return dict(sorted(_mean_by(inside, lambda m: m.layer).items()))

    def rows(self) -> list[dict[str, Any]]:
        """One table row per adapted matrix, in model order."""
        return [{"layer": m.layer, "module": m.module, "name": m.name, "rank set": m.rank,
                 "effective rank": m.effective_rank, "update / weight norm": m.relative_norm,
                 "update norm": m.update_norm, "top singular value": m.singular_values[0] if m.singular_values
                 else 0.0} for m in self.modules]

    def random_effective_rank(self) -> float:
        """The median effective rank that random (Gaussian) B and A of the same shapes and rank would have: the
        baseline a trained update's effective rank is read against (a random rank-r product spreads its energy
        over most of its r directions, so a much smaller number means training concentrated the update)."""
        return statistics.median(random_effective_rank(m.shape, m.rank) for m in self.modules)

    def summary(self) -> str:
        """The plain-words headline: how much of the rank was used and where the update is largest."""
        if not self.modules:
            return f"{self.run}: the adapter holds no LoRA matrices."
        ranks = [m.effective_rank for m in self.modules]
        top_type, top_type_value = next(iter(self.by_module_type().items()))
        top = self.top_changed(1)[0]
        zero = sum(1 for m in self.modules if m.update_norm == 0)
        lines = [
            f"{self.run} ({self.method}, base {self.base}): rank {self.rank} was set (alpha {self.alpha:g}, scale "
            f"{self.scaling:g}) on {len(self.modules)} matrices; {ENERGY:.0%} of each update's energy is in a median "
            f"of {statistics.median(ranks):g} directions (fewest {min(ranks)}, most {max(ranks)}; random B and A of the same "
            f"shapes would need {self.random_effective_rank():g}).",
            f"Largest change: {top.name}, whose update is {top.relative_norm:.2%} of its weight's norm; by module "
            f"type, {top_type} changed most ({top_type_value:.2%} on average).",
        ]
        by_type = self.effective_rank_by_type()
        if len(by_type) > 1:
            (low_name, low), (high_name, high) = next(iter(by_type.items())), list(by_type.items())[-1]
            lines.append(f"Most concentrated: {low_name} (median {low:g} directions); least: {high_name} "
                         f"(median {high:g}).")
        if zero:
            lines.append(f"{zero} matrices have an update of exactly zero (B is still all zeros: no training "
                         f"reached them).")
        return " ".join(lines + self.notes)


@dataclass(frozen=True)
class SubspaceMatch:
    """How much two runs' updates of one matrix share directions."""

    name: str
    layer: int | None
    module: str
    k: int                          # directions compared on each side
    output_angles: tuple[float, ...]   # principal angles in degrees between the top-k left singular vectors
    input_angles: tuple[float, ...]    # ... and between the top-k right singular vectors
    output_similarity: float        # ||U1ᵀU2||_F² / k in [0, 1]
    input_similarity: float
    output_chance: float            # k / d_out: the expected similarity of two random k-dim subspaces
    input_chance: float


@dataclass
class RunComparison:
    first: str
    second: str
    matches: list[SubspaceMatch]
    skipped: list[str]              # matrices adapted in only one of the runs

    def summary(self) -> str:
        if not self.matches:
            return f"{self.first} and {self.second} adapt no matrix in common, so there is nothing to compare."
        out = statistics.mean(m.output_similarity for m in self.matches)
        chance = statistics.mean(m.output_chance for m in self.matches)
        into = statistics.mean(m.input_similarity for m in self.matches)
        into_chance = statistics.mean(m.input_chance for m in self.matches)
        k = self.matches[0].k
        text = (f"Over {len(self.matches)} matrices both runs adapt, the top {k} directions their updates write "
                f"into overlap {out:.2f} on average (1 = the same subspace, 0 = orthogonal; two random subspaces "
                f"of this size would give about {chance:.3f}). The directions they read from overlap {into:.2f} "
                f"(chance {into_chance:.3f})")
        if into < out / 2:
            # Each run's A starts as its own random matrix and moves little in a short run; B starts at zero and
            # is what training writes, so the output side is where two runs can agree.
            text += (": each run's A starts as its own random matrix, and this side stays near chance while A has "
                     "moved little from that start")
        text += "."
        if self.skipped:
            text += (f" {len(self.skipped)} matrices are left out: adapted by only one run, or with an update of "
                     "zero in one of them.")
        return text


# --- reading a run -------------------------------------------------------------------------------------------

def _mean_by(modules: list[ModuleUpdate], key: Any) -> dict[Any, float]:
    groups: dict[Any, list[float]] = {}
    for module in modules:
        groups.setdefault(key(module), []).append(module.relative_norm)
    means = {name: statistics.mean(values) for name, values in groups.items()}
    return dict(sorted(means.items(), key=lambda item: item[1], reverse=True))


def adapter_folder(run_dir: Path) -> Path:
    """The run's adapter folder, or an InspectError that says what the run holds instead."""
    run_dir = Path(run_dir)
    if (run_dir / ADAPTER_CONFIG).is_file():
        return run_dir  # given the adapter folder itself
    folder = run_dir / ADAPTER_DIR
    if (folder / ADAPTER_CONFIG).is_file():
        return folder
    if (run_dir / FULL_MODEL_DIR / MODEL_CONFIG).is_file():
        raise InspectError(f"{run_dir.name} is a full fine-tune: every weight changed and there is no low-rank "
                           "update to inspect. The inspector reads LoRA, rsLoRA and DoRA adapters.")
    raise InspectError(f"{run_dir.name} has no finished adapter ({ADAPTER_DIR}/{ADAPTER_CONFIG} is missing): "
                       "wait until the run has finished, or pick another run.")


def _read_adapter_config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise InspectError(f"{folder.parent.name}'s {ADAPTER_CONFIG} cannot be read: {error}") from None


def unreadable_reason(adapter_config: dict[str, Any]) -> str | None:
    """Why this adapter cannot be read as a low-rank update of the original base, or None when it can."""
    peft_type = str(adapter_config.get("peft_type", "")).upper()
    if peft_type == "IA3":
        return ("IA3 learns one scaling vector per layer, not a low-rank matrix: there are no singular values or "
                "subspaces to inspect. The inspector reads LoRA, rsLoRA and DoRA adapters.")
    if peft_type in ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"):
        return ("Prompt tuning trains virtual input tokens and leaves every weight untouched: there is no weight "
                "update to inspect. The inspector reads LoRA, rsLoRA and DoRA adapters.")
    if peft_type != "LORA":
        return f"This adapter is of type {peft_type or 'unknown'}; the inspector reads LoRA, rsLoRA and DoRA adapters."
    init = adapter_config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(MUTATING_INITS):
        return (f"This adapter started from a {init} initialisation, which moved part of each base weight into the "
                "adapter and saved it without converting back, so B·A is not the change to the original base. "
                "Save such runs with peft's path_initial_model_for_weight_conversion to inspect them.")
    return None


def _run_config(run_dir: Path, adapter_dir: Path) -> RunConfig:
    # A checkpoint (<run>/checkpoints/checkpoint-N) has no config of its own: its run's config applies.
    run_of_checkpoint = run_dir.parent.parent / RUN_CONFIG if run_dir.parent.name == CHECKPOINT_DIR else None
    for path in (adapter_dir / CONFIG_COPY, run_dir / RUN_CONFIG, run_of_checkpoint):
        if path is None:
            continue
        if path.is_file():
            try:
                return load_config(path)
            except ConfigError as error:
                raise InspectError(f"{run_dir.name}'s config cannot be read: {error}") from None
    raise InspectError(f"{run_dir.name} has no {CONFIG_COPY} beside its adapter, so its base model is unknown.")


def adapter_scaling(adapter_config: dict[str, Any], rank: int, alpha: float) -> float:
    """s in ΔW = s·B·A: alpha / r, or alpha / sqrt(r) for rsLoRA (peft's use_rslora)."""
    return alpha / math.sqrt(rank) if adapter_config.get("use_rslora") else alpha / rank


def _module_rank_alpha(adapter_config: dict[str, Any], name: str) -> tuple[int, float]:
    """r and alpha of one module; rank_pattern/alpha_pattern keys match the end of the module's path."""
    rank, alpha = int(adapter_config["r"]), float(adapter_config.get("lora_alpha", adapter_config["r"]))
    for pattern, value in (adapter_config.get("rank_pattern") or {}).items():
        if re.search(rf"(^|\.){pattern}$", name):
            rank = int(value)
    for pattern, value in (adapter_config.get("alpha_pattern") or {}).items():
        if re.search(rf"(^|\.){pattern}$", name):
            alpha = float(value)
    return rank, alpha


def base_weights_folder(model: ModelConfig) -> Path:
    """The local folder with the base model's safetensors (the embedded model's cache, a local folder, or a Hub
    snapshot already downloaded); an InspectError when the weights are not on this machine."""
    try:
        resolved = resolve_source(model.source)
        if model_source_kind(model.source) == "hub":
            from huggingface_hub import snapshot_download

            resolved = snapshot_download(model.source, local_files_only=True,
                                         allow_patterns=["*.safetensors", "*.json"])
    except (ModelSourceError, OSError, ValueError) as error:
        raise InspectError(f"The base model '{model.source}' is not on this machine, so the update cannot be "
                           f"compared with its weights: {error}") from None
    folder = Path(resolved)
    if not list(folder.glob("*.safetensors")):
        raise InspectError(f"The base model '{model.source}' has no safetensors files; the inspector reads the "
                           "frozen weights from safetensors only.")
    return folder


class BaseWeights:
    """Reads single frozen weights by name from a base model's (possibly sharded) safetensors files."""

    def __init__(self, folder: Path):
        self.files = full_precision_weights(folder)

    def get(self, module_name: str) -> torch.Tensor:
        """The weight of ``module_name`` (a path as peft writes it), as float32."""
        weight = read_weight(self.files, module_name)
        if weight is None:
            raise InspectError(f"The base model has no weight named {module_name}.weight: the adapter was trained "
                               "on a different base model than its config names.")
        return weight


def _lora_tensors(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{module path: {"lora_A": A, "lora_B": B[, "lora_magnitude_vector": m]}} as float32."""
    path = folder / ADAPTER_WEIGHTS
    if not path.is_file():
        raise InspectError(f"{folder.parent.name}'s adapter has no {ADAPTER_WEIGHTS} (an older .bin adapter?); "
                           "the inspector reads safetensors adapters.")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():
            match = LORA_KEY.match(key)
            if match is None:
                continue  # modules_to_save copies, score heads: not low-rank updates
            name = match["module"].removeprefix(PEFT_PREFIX)
            modules.setdefault(name, {})[match["part"]] = handle.get_tensor(key).float()
    return {name: parts for name, parts in modules.items() if "lora_A" in parts and "lora_B" in parts}


# --- the numbers ---------------------------------------------------------------------------------------------

def low_rank_svd(b: torch.Tensor, a: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, V) of scale·B·A without forming it: B = Qb·Rb and Aᵀ = Qa·Ra turn B·A into Qb·(Rb·Raᵀ)·Qaᵀ, so the
    SVD of the small r x r core gives the update's singular values and vectors (U: out x r, V: in x r)."""
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().T)
    u, s, vh = torch.linalg.svd(scale * rb @ ra.T)
    return qb @ u, s, qa @ vh.T


def effective_rank(singular_values: torch.Tensor, energy: float = ENERGY) -> int:
    """Fewest leading singular directions whose squared singular values hold ``energy`` of the total (0 for a zero
    update). A small tolerance keeps an exact rank-k update at k despite rounding."""
    squares = singular_values.double() ** 2
    total = float(squares.sum())
    if total == 0:
        return 0
    cumulative = torch.cumsum(squares, 0) / total
    return int((cumulative < energy - 1e-9).sum()) + 1


@functools.lru_cache(maxsize=64)
def random_singular_values(shape: tuple[int, int], rank: int, seed: int = 0) -> tuple[float, ...]:
    """Singular values of B·A with B (out x r) and A (r x in) drawn from a standard normal, with a fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    b = torch.randn(shape[0], rank, generator=generator, dtype=torch.float64)
    a = torch.randn(rank, shape[1], generator=generator, dtype=torch.float64)
    return tuple(float(v) for v in low_rank_svd(b, a, 1.0)[1])


def random_effective_rank(shape: tuple[int, int], rank: int) -> int:
    return effective_rank(torch.tensor(random_singular_values(shape, rank)))


def energy_curve(singular_values: tuple[float, ...] | list[float]) -> list[float]:
    """Cumulative share of the energy (squared singular values) held by the first 1, 2, ... directions."""
    squares = torch.tensor(singular_values, dtype=torch.float64) ** 2
    total = float(squares.sum())
    return [float(v) for v in torch.cumsum(squares, 0) / total] if total > 0 else [0.0] * len(squares)


def dora_update(weight: torch.Tensor, b: torch.Tensor, a: torch.Tensor, magnitude: torch.Tensor,
                scale: float) -> torch.Tensor:
    """DoRA's real weight change: each output row of W + s·B·A rescaled to its trained magnitude, minus W."""
    combined = weight.double() + scale * b.double() @ a.double()
    row_norms = torch.linalg.norm(combined, dim=1, keepdim=True)
    return magnitude.double().reshape(-1, 1) * combined / row_norms - weight.double()


def _layer_and_type(name: str) -> tuple[int | None, str]:
    match = LAYER_INDEX.search(f".{name}.")
    return (int(match.group(1)) if match else None), name.rsplit(".", 1)[-1]


def _module_update(name: str, parts: dict[str, torch.Tensor], weight: torch.Tensor, rank: int,
                   scale: float) -> ModuleUpdate:
    if "lora_magnitude_vector" in parts:
        singular = torch.linalg.svdvals(dora_update(weight, parts["lora_B"], parts["lora_A"],
                                                    parts["lora_magnitude_vector"], scale))
    else:
        singular = low_rank_svd(parts["lora_B"], parts["lora_A"], scale)[1]
    layer, module = _layer_and_type(name)
    return ModuleUpdate(name=name, layer=layer, module=module, rank=rank,
                        update_norm=float(torch.linalg.norm(singular)), weight_norm=float(torch.linalg.norm(weight)),
                        singular_values=tuple(float(v) for v in singular), effective_rank=effective_rank(singular),
                        shape=(int(weight.shape[0]), int(weight.shape[1])))


@dataclass
class _OpenedRun:
    name: str
    folder: Path
    adapter_config: dict[str, Any]
    config: RunConfig
    tensors: dict[str, dict[str, torch.Tensor]]

    @property
    def model(self) -> ModelConfig:
        return self.config.model

    @property
    def method(self) -> str:
        return "dora" if self.adapter_config.get("use_dora") else (
            "rslora" if self.adapter_config.get("use_rslora") else "lora")


def _open_run(run_dir: Path) -> _OpenedRun:
    run_dir = Path(run_dir)
    folder = adapter_folder(run_dir)
    adapter_config = _read_adapter_config(folder)
    reason = unreadable_reason(adapter_config)
    if reason:
        raise InspectError(reason)
    owner = folder.parent if folder.name == ADAPTER_DIR else folder
    config = _run_config(owner, folder)
    tensors = _lora_tensors(folder)
    if not tensors:
        raise InspectError(f"{owner.name}'s adapter holds no LoRA matrices (no lora_A/lora_B tensors).")
    return _OpenedRun(owner.name, folder, adapter_config, config, tensors)


def inspect_run(run_dir: Path) -> AdapterReport:
    """Per adapted matrix: update norm relative to the frozen weight, singular values and effective rank."""
    started = time.perf_counter()
    opened = _open_run(run_dir)
    weights = BaseWeights(base_weights_folder(opened.model))
    modules = []
    for name, parts in opened.tensors.items():
        rank, alpha = _module_rank_alpha(opened.adapter_config, name)
        weight = weights.get(name)
        _check_shapes(name, parts, weight)
        modules.append(_module_update(name, parts, weight, rank, adapter_scaling(opened.adapter_config, rank, alpha)))
    rank = int(opened.adapter_config["r"])
    alpha = float(opened.adapter_config.get("lora_alpha", rank))
    report = AdapterReport(run=opened.name, base=opened.model.source, method=opened.method, rank=rank, alpha=alpha,
                           scaling=adapter_scaling(opened.adapter_config, rank, alpha), modules=modules)
    if opened.method == "dora":
        report.notes.append("DoRA: each update is the real weight change, magnitude rescaling included, so its "
                            "effective rank can exceed the rank set.")
    if opened.config.lora.init == "loftq":
        report.notes.append("This adapter started from LoftQ, so B·A also holds the low-rank fix of the 4-bit "
                            "quantization error it started with, not only what training learned.")
    if opened.model.bits in (4, 8):
        report.notes.append(f"The run trained on a {opened.model.bits}-bit copy of the base; the norms here are "
                            "relative to the full-precision weights.")
    report.seconds = time.perf_counter() - started
    return report


def _check_shapes(name: str, parts: dict[str, torch.Tensor], weight: torch.Tensor) -> None:
    expected = (parts["lora_B"].shape[0], parts["lora_A"].shape[1])
    if tuple(weight.shape) != expected:
        raise InspectError(f"{name}: the adapter's update is {expected[0]} x {expected[1]} but the base weight is "
                           f"{weight.shape[0]} x {weight.shape[1]}: the adapter belongs to another base model.")


# --- two runs ------------------------------------------------------------------------------------------------

def principal_angles(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Principal angles in degrees between the column spaces of two matrices with orthonormal columns."""
    cosines = torch.linalg.svdvals(first.double().T @ second.double()).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.arccos(cosines))


def _top_vectors(parts: dict[str, torch.Tensor], scale: float, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, _, v = low_rank_svd(parts["lora_B"], parts["lora_A"], scale)
    return u[:, :k], v[:, :k]


def compare_updates(first_dir: Path, second_dir: Path, top_k: int = 4) -> RunComparison:
    """Principal angles between the top-k singular subspaces of two runs' updates, matrix by matrix."""
    if top_k < 1:
        raise InspectError(f"Compare at least 1 direction, got {top_k}.")
    first, second = _open_run(first_dir), _open_run(second_dir)
    if first.model.source != second.model.source:
        raise InspectError(f"{first.name} adapts '{first.model.source}' and {second.name} adapts "
                           f"'{second.model.source}': updates of different base models live in different weight "
                           "spaces and cannot be compared.")
    for opened in (first, second):
        if opened.method == "dora":
            raise InspectError(f"{opened.name} is a DoRA run: its weight change is not the low-rank B·A alone, so "
                               "subspace comparison is offered for LoRA and rsLoRA runs only.")
    shared = [name for name in first.tensors if name in second.tensors]
    # A zero update (B never trained) has no directions: its singular vectors would be arbitrary.
    compared = [name for name in shared if _nonzero(first, name) and _nonzero(second, name)]
    skipped = sorted((set(first.tensors) ^ set(second.tensors)) | (set(shared) - set(compared)))
    return RunComparison(first.name, second.name, [_match(name, first, second, top_k) for name in compared],
                         skipped)


def _nonzero(opened: _OpenedRun, name: str) -> bool:
    return bool(opened.tensors[name]["lora_B"].any()) and bool(opened.tensors[name]["lora_A"].any())


def _match(name: str, first: _OpenedRun, second: _OpenedRun, top_k: int) -> SubspaceMatch:
    vectors = []
    for opened in (first, second):
        rank, alpha = _module_rank_alpha(opened.adapter_config, name)
        vectors.append(_top_vectors(opened.tensors[name], adapter_scaling(opened.adapter_config, rank, alpha), top_k))
    (u1, v1), (u2, v2) = vectors
    if u1.shape[0] != u2.shape[0] or v1.shape[0] != v2.shape[0]:
        raise InspectError(f"{name} has different shapes in the two runs: they adapt different base models.")
    k = min(u1.shape[1], u2.shape[1])
    out_angles, in_angles = principal_angles(u1[:, :k], u2[:, :k]), principal_angles(v1[:, :k], v2[:, :k])
    layer, module = _layer_and_type(name)
    return SubspaceMatch(
        name=name, layer=layer, module=module, k=k,
        output_angles=tuple(float(a) for a in out_angles), input_angles=tuple(float(a) for a in in_angles),
        output_similarity=_similarity(out_angles, k), input_similarity=_similarity(in_angles, k),
        output_chance=k / u1.shape[0], input_chance=k / v1.shape[0])


def _similarity(angles_degrees: torch.Tensor, k: int) -> float:
    """||U1ᵀU2||_F² / k: the mean squared cosine of the principal angles."""
    return float((torch.cos(torch.deg2rad(angles_degrees)) ** 2).sum()) / k


# --- step 0: how far a 4-bit base plus a fresh adapter starts from the full-precision weights --------------------

@dataclass(frozen=True)
class Step0Error:
    """Reconstruction error at step 0, over every adapted matrix of a 4-bit base."""

    init: str
    relative_error: float       # sqrt(Σ ||W - (deq(Q) + s·B·A)||²) / sqrt(Σ ||W||²), Q as the layer holds it then
    init_seconds: float         # get_peft_model plus the initialisation itself (LoftQ's SVDs)
    matrices: int

    def caption(self, default: "Step0Error | None" = None) -> str:
        """In words; against the default start (B = 0, so the 4-bit base alone) when given."""
        text = (f"{self.init}: the 4-bit base plus the fresh adapter starts {self.relative_error:.2%} away from the "
                f"full-precision weights over {self.matrices} matrices")
        if default is not None and self.init != "default" and default.relative_error > 0:
            change = 1 - self.relative_error / default.relative_error
            text += (f", {abs(change):.1%} {'closer' if change >= 0 else 'farther'} than the default start "
                     f"({default.relative_error:.2%}, the 4-bit base alone)")
        return text + f"; initialising took {self.init_seconds * 1000:.0f} ms."


def step0_comparison(model: ModelConfig, lora: LoraSettings,
                     inits: tuple[str, ...] = ("default", "loftq")) -> list[Step0Error]:
    """step0_quantization_error for each init, each on a freshly loaded base (PiSSA/OLoRA change the base)."""
    return [step0_quantization_error(model, lora, init) for init in inits]


def step0_model(model: ModelConfig, lora: LoraSettings, init: str) -> tuple[Any, float, Path]:
    """(peft model, seconds the init took, base weights folder): the base loaded at 4 bits as training loads it,
    with a fresh LoRA adapter started by ``init``; an InspectError where the init does not apply."""
    import dataclasses

    from peft import LoraConfig, get_peft_model

    lora = dataclasses.replace(lora, init=init)
    folder = base_weights_folder(model)
    problems = ([f"The step-0 quantization error is measured on a 4-bit base; this config loads the base at "
                 f"{model.bits} bits."] if model.bits != 4 else init_problems(RunConfig(model=model, lora=lora),
                                                                             folder))
    if problems:
        raise InspectError(" ".join(problems))
    base = load_model(model)
    started = time.perf_counter()
    peft_model = get_peft_model(base, LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, target_modules=lora.target_module_list(),
        use_rslora=lora.method == "rslora", lora_dropout=0.0, **peft_init_kwargs(lora)))
    if init == "loftq":
        apply_loftq(peft_model, folder)
    return peft_model, time.perf_counter() - started, folder


def step0_quantization_error(model: ModelConfig, lora: LoraSettings, init: str) -> Step0Error:
    """Load the base at 4 bits as training does, attach a LoRA adapter started with ``init`` and measure
    ||W - (deq(Q) + s·B·A)|| against the full-precision W read from the base's safetensors."""
    peft_model, seconds, folder = step0_model(model, lora, init)
    error, matrices = reconstruction_error(peft_model, folder)
    return Step0Error(init, error, seconds, matrices)


# --- command line --------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """``python -m finetune.services.adapter_inspect RUN [--compare OTHER] [--top-k 4] [--show 10]``"""
    import argparse

    parser = argparse.ArgumentParser(description="What a LoRA run's adapter changed, matrix by matrix.")
    parser.add_argument("run", type=Path, help="a run folder (or its adapter folder)")
    parser.add_argument("--compare", type=Path, help="a second run on the same base: overlap of the update subspaces")
    parser.add_argument("--top-k", type=int, default=4, help="directions compared per matrix (default 4)")
    parser.add_argument("--show", type=int, default=10, help="most changed matrices listed (default 10)")
    args = parser.parse_args(argv)
    try:
        report = inspect_run(args.run)
        print(report.summary())
        for module in report.top_changed(args.show):
            print(" ", module.caption())
        print(f"Computed in {report.seconds:.1f} s.")
        if args.compare:
            print(compare_updates(args.run, args.compare, args.top_k).summary())
    except InspectError as error:
        print(f"error: {error}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
