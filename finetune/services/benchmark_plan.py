"""What a benchmark job will run, checked before any child starts: the tasks (the bundled one offline, any installed
lm-evaluation-harness task with the Hub), the adapters and the base each was trained on, one unit per (model, task),
each unit's cache key, and the time estimate (this machine's measured pace once a job has run, else a rough default).

    plan = make_plan(runs_root, cache_dir, tasks=["lora_lab_basics"], limit=60, adapters=["my-run"])
    print(plan.estimate_text())           # BenchmarkError before that when anything is refused
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from finetune.core.config import EMBEDDED_MODEL, ConfigError, ModelConfig, load_config
from finetune.core.models import ModelSourceError, hub_reachable, model_source_kind, resolve_run_folder
from finetune.core.paths import PROJECT_ROOT
from finetune.core.run_folder import ADAPTER_CONFIG, ADAPTER_DIR, CONFIG_COPY, MODEL_CONFIG, RUN_CONFIG, adapter_config

BUNDLED_TASK_DIR = PROJECT_ROOT / "data" / "benchmarks"
BUNDLED_TASK = "lora_lab_basics"
BUNDLED_ITEMS = 60                 # items in data/benchmarks/lora_lab_basics.json
BUNDLED_CHOICES = 4
# The forgetting check: general-knowledge tasks a fine-tune on a narrow data set could erode. Offline only the
# bundled task can run; with the Hub, three of the Open LLM Leaderboard's classic multiple-choice sets join it.
FORGETTING_CHECK_OFFLINE = (BUNDLED_TASK,)
FORGETTING_CHECK_ONLINE = (BUNDLED_TASK, "arc_easy", "hellaswag", "piqa")
FORGETTING_CHECK_LIMIT = 100
MIN_ITEMS = 10                     # fewer paired items than this support no verdict
Z_95 = 1.96
RATES_FILE = "rates.json"          # in the cache folder: this machine's measured pace per base
# Rough speed before this machine has measured its own (then rates.json holds, per base, the seconds per answer
# choice and the seconds its loading took). Measured on a busy 2-core CPU (2026-12, other jobs running): the
# embedded 135M model in 4-bit took 49 s to load and 1.24 s per answer choice (80 choices, batch 8), 156 s in all,
# where the old defaults (0.2 s per choice per 100M weights, no loading) promised 32 s.
CPU_SECONDS_PER_REQUEST_PER_100M = 0.6
CPU_LOAD_SECONDS = 45.0            # a base loaded (and quantized) on the CPU, once per base in a job
GPU_LOAD_SECONDS = 15.0
GPU_SECONDS_PER_REQUEST_PER_1B = 0.004
ASSUMED_CHOICES = 4                # per item, for tasks whose data we cannot see before they download
QUANTIZED_SLOWDOWN = 1.5           # bitsandbytes dequantizes every weight at every forward pass


class BenchmarkError(ValueError):
    """A benchmark request that cannot run; the message says why and what to do instead."""



# --- tasks ----------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def harness_task_index() -> dict[str, Any]:
    """Every task, group and tag the installed harness knows (about 6 s to index, once per process)."""
    from lm_eval.tasks import TaskManager

    return dict(TaskManager().task_index)


def task_manager(tasks: list[str]) -> Any:
    from lm_eval.tasks import TaskManager

    # Indexing the harness's 14,000 task files takes seconds: the bundled task alone does without them.
    only_bundled = all(task == BUNDLED_TASK for task in tasks)
    return TaskManager(include_path=str(BUNDLED_TASK_DIR), include_defaults=not only_bundled)


def _leaf_count(name: str, index: dict[str, Any], seen: frozenset[str] = frozenset()) -> int:
    """How many tasks a group or tag stands for (mmlu: 57), for the time estimate."""
    entry = index.get(name)
    if entry is None or name in seen:
        return 0
    kind = getattr(entry.kind, "name", "")
    if kind in ("TASK", "PY_TASK"):
        return 1
    if kind == "TAG":
        members = [n for n, e in index.items() if name in (getattr(e, "tags", None) or ())]
    else:
        listed = entry.cfg.get("task", []) if isinstance(entry.cfg, dict) else []
        members = [m if isinstance(m, str) else m.get("task", "") for m in
                   (listed if isinstance(listed, list) else [listed])]
    return sum(_leaf_count(m, index, seen | {name}) for m in members) or 1


@dataclass(frozen=True)
class TaskInfo:
    name: str
    bundled: bool
    subtasks: int          # 1 for a task; the number of tasks in a group (mmlu: 57)
    dataset: str           # where its data comes from


def task_info(name: str) -> TaskInfo:
    """The task ``name``, or BenchmarkError if the harness does not know it."""
    if name == BUNDLED_TASK:
        return TaskInfo(name, True, 1, "data/benchmarks (bundled)")
    index = harness_task_index()
    if name not in index:
        close = sorted(n for n in index if name.lower() in n.lower())[:5]
        hint = f" Similar names: {', '.join(close)}." if close else ""
        raise BenchmarkError(f"Unknown benchmark task '{name}': lm-evaluation-harness has no task, group or tag of "
                             f"that name.{hint} Offline, use the bundled task '{BUNDLED_TASK}'.")
    cfg = index[name].cfg if isinstance(index[name].cfg, dict) else {}
    return TaskInfo(name, False, _leaf_count(name, index), str(cfg.get("dataset_path") or "the Hugging Face Hub"))


def check_tasks(tasks: list[str], hub: bool | None = None) -> list[TaskInfo]:
    """Each task known, and a task that downloads its data only where the Hub can be reached."""
    names = [t.strip() for t in tasks if t and t.strip()]
    if not names:
        raise BenchmarkError(f"Choose at least one benchmark task (offline: '{BUNDLED_TASK}').")
    infos = [task_info(name) for name in dict.fromkeys(names)]
    needs_hub = [info for info in infos if not info.bundled]
    if needs_hub and not (hub_reachable() if hub is None else hub):
        listed = ", ".join(f"'{i.name}' (data: {i.dataset})" for i in needs_hub)
        raise BenchmarkError(f"Cannot reach the Hugging Face Hub, and {listed} download their data from it. "
                             f"Offline, use the bundled task '{BUNDLED_TASK}'.")
    return infos


def forgetting_check_tasks(hub: bool | None = None) -> list[str]:
    return list(FORGETTING_CHECK_ONLINE if (hub_reachable() if hub is None else hub) else FORGETTING_CHECK_OFFLINE)


def check_limit(limit: Any) -> int:
    """Items per task: a whole number of at least 1 (the UI's number box sends floats such as 20.0)."""
    text = str(limit).strip()
    try:
        value = float(text) if not isinstance(limit, bool) and text else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value != int(value):
        raise BenchmarkError(f"Limit must be a whole number of items per task, got {limit!r}.")
    if value <= 0:
        raise BenchmarkError(f"Limit must be at least 1 item per task, got {int(value)}.")
    return int(value)


# --- models and adapters --------------------------------------------------------------------------------------

def _base_key(cfg: ModelConfig) -> tuple[Any, ...]:
    return (cfg.source, cfg.bits, cfg.quant_type, cfg.double_quant, cfg.compute_dtype)


def base_label(cfg: ModelConfig) -> str:
    name = Path(cfg.source).name if model_source_kind(cfg.source) == "local" else cfg.source
    bits = f"4-bit {cfg.quant_type}{' + dq' if cfg.double_quant else ''}" if cfg.bits == 4 else f"{cfg.bits}-bit"
    return f"base: {name} ({bits})"


def _same_source(a: str, b: str) -> bool:
    if a == b:
        return True
    path_a, path_b = Path(a).expanduser(), Path(b).expanduser()
    return path_a.is_dir() and path_b.is_dir() and path_a.resolve() == path_b.resolve()


def trained_model_config(adapter_dir: Path) -> ModelConfig:
    """The base and bit width an adapter was trained with: its config copy, else its run's config."""
    for path in (adapter_dir / CONFIG_COPY, adapter_dir.parent / RUN_CONFIG):
        if path.is_file():
            try:
                return load_config(path).model
            except ConfigError as error:
                raise BenchmarkError(f"The adapter's config {path.name} cannot be read: {error}") from None
    raise BenchmarkError(f"Adapter '{adapter_dir}' has no {CONFIG_COPY} (nor a run config beside it), so the base "
                         "model and bit width it was trained with are unknown; benchmark a LoRA Lab run instead.")


def check_adapter(value: str, runs_root: Path, model: str | None) -> tuple[Path, ModelConfig]:
    """(adapter folder, its training ModelConfig); BenchmarkError if missing or trained on another base."""
    try:
        folder = resolve_run_folder(str(value).strip(), runs_root, ADAPTER_DIR)
    except ModelSourceError as error:
        raise BenchmarkError(str(error)) from None
    cfg = trained_model_config(folder)
    if model and not _same_source(cfg.source, model):
        recorded = adapter_config(folder).get("base_model_name_or_path", "")
        raise BenchmarkError(f"Adapter '{value}' was trained on '{cfg.source}', not on the chosen model '{model}' "
                             f"(its {ADAPTER_CONFIG} names '{recorded}'); an adapter only fits the base it was "
                             "trained on. Choose that model, or leave the model empty to use each adapter's own base.")
    return folder, cfg


# --- the plan: what will run, from what cache, for how long ------------------------------------------------------

@dataclass
class Unit:
    """One harness run: one model (a base, or an adapter on it) on one task."""
    label: str                 # "base: smollm2-135m-instruct (4-bit nf4 + dq)" or "adapter: <run>"
    model: dict[str, Any]      # ModelConfig fields
    adapter_dir: str | None
    task: str
    limit: int
    requests: int              # answer choices to score (upper bound where the task's size is unknown)
    cache_key: str = ""
    cached: bool = False

    @property
    def base_key(self) -> tuple[Any, ...]:
        return _base_key(ModelConfig(**self.model))


@dataclass
class BenchmarkPlan:
    tasks: list[str]
    limit: int
    units: list[Unit]
    seconds: float             # rough estimate of the uncached units
    batch_size: int = 8
    notes: list[str] = field(default_factory=list)
    measured_rate: bool = False        # the estimate's pace was measured here (rates.json), not the default
    seconds_per_request: float = 0.0   # that pace (the first uncached unit's)

    def estimate_text(self) -> str:
        return self._scope_text() + self._time_text() + (
            f" With {self.limit} questions per task the table gives no verdict: it needs at least {MIN_ITEMS}."
            if self.limit < MIN_ITEMS else "")

    def _scope_text(self) -> str:
        """Said first: with no adapter picked the job scores the base alone, and compares nothing."""
        if any(u.adapter_dir for u in self.units):
            return ""
        return ("**No adapter picked: this scores the base model only** (no base-vs-adapter comparison; pick "
                "adapters above for that). ")

    def _time_text(self) -> str:
        todo = [u for u in self.units if not u.cached]
        if not todo:
            return f"All {len(self.units)} results are cached: nothing to run."
        minutes = self.seconds / 60
        span = f"about {self.seconds:.0f} s" if minutes < 2 else f"about {minutes:.0f} min"
        cached = f", {len(self.units) - len(todo)} cached" if len(todo) < len(self.units) else ""
        runs = f"{len(todo)} harness run{'s' if len(todo) > 1 else ''}"
        pace = (f"at the {self.seconds_per_request:.2f} s per answer choice this machine's last benchmark of "
                "this base measured" if self.measured_rate else "at a rough default speed (no benchmark has been "
                "timed on this machine yet)")
        return (f"{runs} ({sum(u.requests for u in todo)} answer choices to score{cached}): "
                f"{span} {pace}; re-measured while it runs (generation tasks such as gsm8k take several times longer).")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> BenchmarkPlan:
        return cls(**{**raw, "units": [Unit(**u) for u in raw["units"]]})


def _file_digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def unit_cache_key(unit: Unit) -> str:
    """Same model and bits, same adapter contents (not just its path: a rerun overwrites it), same task files
    and limit, same harness version -> same result."""
    import importlib.metadata

    adapter = _file_digest([p for p in Path(unit.adapter_dir).iterdir() if p.is_file()
                            and p.name != CONFIG_COPY]) if unit.adapter_dir else None
    task = _file_digest([p for p in BUNDLED_TASK_DIR.iterdir() if p.suffix in (".yaml", ".json", ".py")]) \
        if unit.task == BUNDLED_TASK else unit.task
    source = unit.model["source"]
    if model_source_kind(source) == "local":
        source = _file_digest([Path(source) / MODEL_CONFIG]) + str(Path(source).resolve())
    key = {"model": {**unit.model, "source": source}, "adapter": adapter, "task": [unit.task, task],
           "limit": unit.limit, "lm_eval": importlib.metadata.version("lm_eval")}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def _requests(info: TaskInfo, limit: int) -> int:
    if info.bundled:
        return min(limit, BUNDLED_ITEMS) * BUNDLED_CHOICES
    return limit * info.subtasks * ASSUMED_CHOICES


def _default_load_seconds() -> float:
    import torch

    return GPU_LOAD_SECONDS if torch.cuda.is_available() else CPU_LOAD_SECONDS


def _default_seconds_per_request(cfg: ModelConfig) -> float:
    import torch

    from finetune.core.estimate import model_shape

    try:
        params = model_shape(cfg).total_params
    except (ModelSourceError, OSError, ValueError):
        params = 135_000_000
    slowdown = QUANTIZED_SLOWDOWN if cfg.bits in (4, 8) else 1.0
    if torch.cuda.is_available():
        return GPU_SECONDS_PER_REQUEST_PER_1B * max(params / 1e9, 0.1) * slowdown
    return CPU_SECONDS_PER_REQUEST_PER_100M * params / 1e8 * slowdown




def make_plan(runs_root: Path, cache_dir: Path, tasks: list[str], limit: Any, adapters: list[str] | None = None,
              model: str | None = None, bits: int = 4, hub: bool | None = None, batch_size: int = 8) -> BenchmarkPlan:
    """Every check a job needs, then its units (each base before its adapters: the child loads each base once),
    which of them ``cache_dir`` already holds, and the time the others should take."""
    limit = check_limit(limit)
    model = (model or "").strip() or None
    chosen = [check_adapter(a, runs_root, model) for a in (adapters or []) if str(a).strip()]
    if model is not None:
        _check_model(model, hub)
    infos = check_tasks(tasks, hub)
    groups: dict[tuple[Any, ...], tuple[ModelConfig, list[tuple[Path, ModelConfig]]]] = {}
    for folder, cfg in chosen:
        groups.setdefault(_base_key(cfg), (cfg, []))[1].append((folder, cfg))
    if not chosen:
        try:
            base = ModelConfig(source=model or EMBEDDED_MODEL, bits=int(bits))
        except (ConfigError, TypeError, ValueError) as error:
            raise BenchmarkError(f"Bits must be 4, 8, 16 or 32 ({error}).") from None
        groups[_base_key(base)] = (base, [])
    units = []
    for base, members in groups.values():
        for info in infos:
            units.append(Unit(base_label(base), asdict(base), None, info.name, limit, _requests(info, limit)))
            units += [Unit(f"adapter: {_adapter_label(folder)}", asdict(cfg), str(folder), info.name, limit,
                           _requests(info, limit)) for folder, cfg in members]
    for unit in units:
        unit.cache_key = unit_cache_key(unit)
        unit.cached = (cache_dir / f"{unit.cache_key}.json").is_file()
    seconds, measured, pace = _seconds(cache_dir, units)
    return BenchmarkPlan([i.name for i in infos], limit, units, seconds, batch_size, measured_rate=measured,
                         seconds_per_request=pace)


def _check_model(model: str, hub: bool | None) -> None:
    try:
        kind = model_source_kind(model)
    except ModelSourceError as error:
        raise BenchmarkError(str(error)) from None
    if kind == "hub" and not (hub_reachable() if hub is None else hub):
        raise BenchmarkError(f"Cannot reach the Hugging Face Hub to download the model '{model}'; use the "
                             f"embedded model '{EMBEDDED_MODEL}' or a local folder.")


def _seconds(cache_dir: Path, units: list[Unit]) -> tuple[float, bool, float]:
    """(seconds for the uncached units, whether the pace was measured here, the first unit's pace)."""
    path = cache_dir / RATES_FILE
    rates = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    total, measured, first, loaded = 0.0, False, 0.0, set()
    for unit in units:
        if unit.cached:
            continue
        rate = rates.get(json.dumps(list(unit.base_key)))
        rate = rate if isinstance(rate, dict) else {"per_request": rate}  # older files: the pace alone
        pace = rate.get("per_request") or _default_seconds_per_request(ModelConfig(**unit.model))
        if unit.base_key not in loaded:  # the child loads each base once
            loaded.add(unit.base_key)
            total += rate.get("load") or _default_load_seconds()
        measured, first = (bool(rate.get("per_request")), pace) if not first else (measured, first)
        total += unit.requests * pace
    return total, measured, first


def _adapter_label(folder: Path) -> str:
    """The run id for <runs>/<id>/adapter, else the folder's own name."""
    return folder.parent.name if folder.name == ADAPTER_DIR else folder.name
