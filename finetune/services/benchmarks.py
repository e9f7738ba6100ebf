"""Benchmarks with EleutherAI's lm-evaluation-harness: does the tuned model still know what the base knew?

Each chosen task runs on the base model and on every chosen adapter, the base at the bit width the adapter was
trained at (so a difference is the adapter's alone), in a child process that writes its progress and the
harness's own result JSON into a job folder and honours a STOP file between two model calls. Results are cached
per (model and bits, adapter contents, task, limit): asking again is instant.

Offline (and in the tests) the bundled task ``lora_lab_basics`` (data/benchmarks/: 60 multiple-choice items
written for this project, in the harness's own YAML task format) needs no network; any other installed harness
task (arc_easy, hellaswag, mmlu subsets, gsm8k ...) downloads its data from the Hub and is refused up front
when the Hub cannot be reached.

The verdict: base and adapter answer the same items, so the difference's standard error is the PAIRED one,
sd(adapter_i - base_i) / sqrt(n) over the items' per-item scores (the harness's samples). It is smaller than
the combined sqrt(se_base^2 + se_adapter^2), which would treat the two runs as independent samples. A group of
tasks (mmlu) has no per-item samples of its own: its difference gets the combined error, which overstates the
uncertainty of a paired difference (the table says which one it used). "no measurable change" when
|difference| <= 1.96 x that error; with fewer than MIN_ITEMS items, no verdict at all.

    service = BenchmarkService("runs")
    plan = service.plan(adapters=["my-run"], tasks=["lora_lab_basics"], limit=60)   # BenchmarkError if refused
    print(plan.estimate_text())
    job = service.start(plan)             # child process: python -m finetune.services.benchmarks --job <folder>
    service.status(job); service.request_stop(job); service.table(job)

    python -m finetune.services.benchmarks --adapter runs/my-run --task lora_lab_basics --limit 60  # CLI, same checks
    python -m finetune.services.benchmarks --forgetting-check --adapter my-run --estimate-only
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import re
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from finetune.core.access import LOCAL, Visitor, can_view
from finetune.core.config import EMBEDDED_MODEL, ConfigError, ModelConfig, load_config
from finetune.core.models import ModelSourceError, cache_root, hub_reachable, model_source_kind, resolve_run_folder
from finetune.core.paths import PROJECT_ROOT
from finetune.core.run_folder import ADAPTER_CONFIG, ADAPTER_DIR, CONFIG_COPY, RUN_CONFIG, STOP_FILE, adapter_config
from finetune.core.run_status import read_status, write_status
from finetune.services.processes import pid_alive, spawn

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
LOG_FILE, PLAN_FILE, RESULTS_DIR = "benchmark.log", "plan.json", "results"
STOP_GRACE_SECONDS = 20.0          # after STOP, the child gets this long to end at a model call before SIGTERM
TERM_SECONDS = 5.0                 # and this long after SIGTERM before SIGKILL
STATUS_EVERY_SECONDS = 1.0         # progress writes are throttled: a model call can take milliseconds
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


class BenchmarkStopped(RuntimeError):
    """Raised inside the harness's model call when the STOP file appears."""


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
        source = _file_digest([Path(source) / "config.json"]) + str(Path(source).resolve())
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


# --- the child: runs the plan, unit by unit -----------------------------------------------------------------------

def _watched_lm_class() -> type:
    """The harness's HF model with two additions: progress into status.json and the STOP check, both at each
    model call (a batch of answer choices), so a stop lands within one batch."""
    from lm_eval.models.huggingface import HFLM

    class WatchedHFLM(HFLM):
        def __init__(self, *args: Any, job_dir: Path, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.job_dir, self.done, self.total, self.last_write = job_dir, 0, 0, 0.0

        def _start(self, requests: list[Any]) -> None:
            self.done, self.total = 0, len(requests)
            write_status(self.job_dir, scoring_started_at=time.time())  # the model is loaded: its time is known
            self._report(force=True)

        def _step(self, rows: int) -> None:
            if (self.job_dir / STOP_FILE).exists():
                raise BenchmarkStopped()
            self.done = min(self.total, self.done + rows)
            self._report()

        def _report(self, force: bool = False) -> None:
            if force or time.time() - self.last_write >= STATUS_EVERY_SECONDS:
                write_status(self.job_dir, requests_done=self.done, requests_total=self.total)
                self.last_write = time.time()

        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
            self._start(requests)
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
            self._start(requests)
            return super().generate_until(requests, disable_tqdm=disable_tqdm)

        def _model_call(self, inps: Any, attn_mask: Any = None, labels: Any = None) -> Any:
            self._step(0)
            logits = super()._model_call(inps, attn_mask=attn_mask, labels=labels)
            self._step(int(inps.shape[0]))
            return logits

        def _model_generate(self, context: Any, max_length: int, stop: list[str], **kwargs: Any) -> Any:
            self._step(0)
            out = super()._model_generate(context, max_length, stop, **kwargs)
            self._step(int(context.shape[0]))
            return out

    return WatchedHFLM


def _model_for(engine: Any, unit: Unit) -> tuple[Any, Any, Any]:
    """(model, tokenizer, context) as the Chat tab runs it: the base at the adapter's training bit width, the
    adapter attached without changing the base weights (chat.ChatEngine)."""
    import contextlib

    cfg = ModelConfig(**unit.model)
    if unit.adapter_dir is None:
        entry = engine.loaded(cfg)
        context = entry.model.disable_adapter() if entry.model is not entry.base else contextlib.nullcontext()
        return entry.model, entry.tokenizer, context
    # Named by its contents' cache key: unique per adapter, and valid as a peft adapter name.
    name = f"bench_{unit.cache_key}"
    entry = engine.attach(cfg, name, unit.adapter_dir)
    entry.model.set_adapter(name)
    return entry.model, entry.tokenizer, contextlib.nullcontext()


def harness_output_json(out: dict[str, Any]) -> dict[str, Any]:
    """The harness's result as its own ``--output_path`` writes it (results, groups, configs, versions, n-shot,
    n-samples, higher_is_better), plus the per-item samples reduced to what pairing needs."""
    from lm_eval.utils import handle_non_serializable

    keep = {k: v for k, v in out.items() if k != "samples"}
    samples = {task: [{key: value for key, value in row.items() if key not in ("doc", "arguments", "resps")}
                      for row in rows] for task, rows in (out.get("samples") or {}).items()}
    return json.loads(json.dumps({**keep, "samples": samples}, default=handle_non_serializable))


def run_unit(lm_class: type, engine: Any, unit: Unit, job_dir: Path, batch_size: int) -> dict[str, Any]:
    from lm_eval import simple_evaluate

    model, tokenizer, context = _model_for(engine, unit)
    with context:
        lm = lm_class(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, job_dir=job_dir)
        # bootstrap_iters > 0 or the harness reports no standard errors (for a mean it uses the closed form).
        out = simple_evaluate(lm, tasks=[unit.task], limit=unit.limit, task_manager=task_manager([unit.task]),
                              log_samples=True, bootstrap_iters=1000)
    return harness_output_json(out)


@functools.lru_cache(maxsize=32)
def _read_result(path: str, mtime_ns: int) -> dict[str, Any]:
    # The UI polls every few seconds and a result with per-item samples can be megabytes (mmlu): parse it once.
    # Callers must not modify the returned dict (it is shared).
    return json.loads(Path(path).read_text(encoding="utf-8"))


class BenchmarkJob:
    """The files of one job folder: plan, status, STOP, one harness result per unit, the shared cache."""

    def __init__(self, folder: Path, cache_dir: Path):
        self.folder, self.cache_dir = Path(folder), Path(cache_dir)

    def plan(self) -> BenchmarkPlan:
        return BenchmarkPlan.from_json(json.loads((self.folder / PLAN_FILE).read_text(encoding="utf-8")))

    def result_path(self, index: int) -> Path:
        return self.folder / RESULTS_DIR / f"unit-{index}.json"

    def results(self) -> dict[int, dict[str, Any]]:
        found = {}
        for index in range(len(self.plan().units)):
            path = self.result_path(index)
            if path.is_file():
                found[index] = _read_result(str(path), path.stat().st_mtime_ns)
        return found

    def copy_cached(self, index: int, unit: Unit) -> bool:
        cached = self.cache_dir / f"{unit.cache_key}.json"
        if not cached.is_file():
            return False
        self._write(self.result_path(index), cached.read_text(encoding="utf-8"))
        return True

    def store(self, index: int, unit: Unit, result: dict[str, Any]) -> None:
        text = json.dumps(result, indent=1)
        self._write(self.result_path(index), text)
        self._write(self.cache_dir / f"{unit.cache_key}.json", text)

    @staticmethod
    def _write(path: Path, text: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".tmp{os.getpid()}")
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)  # a reader never sees half a result; a killed child leaves none


def record_rate(cache_dir: Path, unit: Unit, seconds: float, requests: int, load_seconds: float | None = None
                ) -> None:
    """Seconds per answer choice (scoring only) and, for a base unit, its loading seconds, for this base on this
    machine: the next estimate uses them."""
    if requests <= 0:
        return
    path = cache_dir / "rates.json"
    rates = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    key = json.dumps(list(unit.base_key))
    old = rates.get(key) if isinstance(rates.get(key), dict) else {}
    rates[key] = {"per_request": seconds / requests,
                  "load": load_seconds if load_seconds is not None else old.get("load")}
    cache_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rates, indent=1), encoding="utf-8")


def run_job(job: BenchmarkJob) -> int:
    """The child's work: every unit in plan order (bases before their adapters), cached ones copied."""
    plan = job.plan()
    write_status(job.folder, state="running", pid=os.getpid(), units=len(plan.units), unit=0, started_at=time.time())
    engine, lm_class = None, None
    try:
        for index, unit in enumerate(plan.units):
            write_status(job.folder, unit=index, unit_label=unit.label, task=unit.task, requests_done=0,
                         requests_total=unit.requests, unit_started_at=time.time())
            if job.copy_cached(index, unit):
                continue
            if (job.folder / STOP_FILE).exists():
                raise BenchmarkStopped()
            if engine is None:
                from finetune.services.chat import ChatEngine
                engine, lm_class = ChatEngine(max_bases=1, max_seconds=0), _watched_lm_class()
            started = time.time()
            result = run_unit(lm_class, engine, unit, job.folder, plan.batch_size)
            job.store(index, unit, result)
            status = read_status(job.folder)
            total = status.get("requests_total", 0)
            # The count is rough while it runs (the harness scores choices that share a context in one row).
            write_status(job.folder, requests_done=total)
            scoring = status.get("scoring_started_at") or started  # loading ends where scoring starts
            record_rate(job.cache_dir, unit, time.time() - scoring, total,
                        scoring - started if unit.adapter_dir is None else None)
    except BenchmarkStopped:
        write_status(job.folder, state="stopped", finished_at=time.time())
        return 0
    except Exception as error:  # noqa: BLE001 - the message goes to the UI; the traceback stays in the log
        import traceback

        traceback.print_exc()
        write_status(job.folder, state="failed", error=f"{type(error).__name__}: {error}", finished_at=time.time())
        return 1
    write_status(job.folder, state="completed", unit=len(plan.units), finished_at=time.time())
    return 0


# --- the result table -------------------------------------------------------------------------------------------

@dataclass
class TableRow:
    task: str
    metric: str
    adapter: str
    base: float
    base_stderr: float | None      # the harness's standard error of each score
    tuned: float
    tuned_stderr: float | None
    difference: float
    difference_stderr: float | None
    stderr_kind: str               # "paired" (per-item differences) or "combined" (independent runs)
    items: int
    verdict: str

    def interval_text(self) -> str:
        """The difference's 95% interval, or why there is none: a zero spread is not "± 0.000" (which reads as
        a certainty) but items that all scored alike, from which no uncertainty can be estimated."""
        se = self.difference_stderr
        if se is None:
            return "no interval: the harness gave no standard error"
        if not math.isfinite(se):
            return f"no interval: {self.items} paired item(s) are too few to estimate one"
        if se == 0:
            alike = "the same" if self.difference == 0 else "by the same amount"
            return (f"no interval: every one of the {self.items} items scored {alike} for base and adapter, so "
                    "their spread gives no uncertainty to estimate")
        return f"95% interval ± {Z_95 * se:.3f}"


def _metric_values(result: dict[str, Any], task: str) -> dict[str, tuple[float, float | None]]:
    """{"acc": (value, stderr), "exact_match (flexible-extract)": ...} for one task of a harness result."""
    values = {}
    for key, value in (result.get("results", {}).get(task) or {}).items():
        if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
            continue
        metric, filter_name = key.split(",", 1)
        stderr = result["results"][task].get(f"{metric}_stderr,{filter_name}")
        name = metric if filter_name == "none" else f"{metric} ({filter_name})"
        values[name] = (float(value), float(stderr) if isinstance(stderr, (int, float)) else None)
    return values


def _per_item(result: dict[str, Any], task: str, metric: str) -> dict[tuple[Any, str], float]:
    name, _, filter_name = metric.partition(" (")
    filter_name = filter_name.rstrip(")") or "none"
    return {(row.get("doc_id"), row.get("filter", "none")): float(row[name])
            for row in (result.get("samples") or {}).get(task, [])
            if isinstance(row.get(name), (int, float, bool)) and row.get("filter", "none") == filter_name}


def paired_difference(base: dict[Any, float], tuned: dict[Any, float]) -> tuple[float, float, int]:
    """(mean difference, its standard error, n) over the items both scored."""
    diffs = [tuned[key] - base[key] for key in base.keys() & tuned.keys()]
    if len(diffs) < 2:
        return (diffs[0] if diffs else 0.0), math.inf, len(diffs)
    return statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs)), len(diffs)


def verdict(difference: float, stderr: float | None, items: int, higher_is_better: bool = True) -> str:
    if stderr is None or items < MIN_ITEMS:
        return f"no verdict: {items} items are too few (need {MIN_ITEMS})" if stderr is not None else \
            "no verdict: the harness gave no standard error"
    if abs(difference) <= Z_95 * stderr:
        return "no measurable change"
    better = (difference > 0) == higher_is_better
    return f"{'better' if better else 'worse'} (beyond {Z_95} x the standard error)"


def _compare(task: str, metric: str, label: str, base: dict[str, Any], tuned: dict[str, Any]) -> TableRow | None:
    base_values, tuned_values = _metric_values(base, task), _metric_values(tuned, task)
    if metric not in base_values or metric not in tuned_values:
        return None
    (b, b_se), (t, t_se) = base_values[metric], tuned_values[metric]
    base_items, tuned_items = _per_item(base, task, metric), _per_item(tuned, task, metric)
    if base_items and tuned_items:
        _, se, n = paired_difference(base_items, tuned_items)
        kind = "paired"
    else:
        se = math.sqrt(b_se ** 2 + t_se ** 2) if b_se is not None and t_se is not None else None
        n, kind = int((base.get("n-samples", {}).get(task) or {}).get("effective", MIN_ITEMS)), "combined"
    higher = (base.get("higher_is_better", {}).get(task) or {}).get(metric.split(" (")[0], True)
    return TableRow(task, metric, label, b, b_se, t, t_se, t - b, se, kind, n, verdict(t - b, se, n, higher))


def build_table(plan: BenchmarkPlan, results: dict[int, dict[str, Any]]) -> list[TableRow]:
    """One row per (adapter, task, metric) whose base and adapter results are both in."""
    bases = {(u.base_key, u.task): i for i, u in enumerate(plan.units) if u.adapter_dir is None}
    rows = []
    for index, unit in enumerate(plan.units):
        base_index = bases.get((unit.base_key, unit.task))
        if unit.adapter_dir is None or index not in results or base_index not in results:
            continue
        base, tuned = results[base_index], results[index]
        for task in tuned.get("results", {}):
            for metric in _metric_values(tuned, task):
                row = _compare(task, metric, unit.label.removeprefix("adapter: "), base, tuned)
                if row is not None:
                    rows.append(row)
    return rows


def base_only_rows(plan: BenchmarkPlan, results: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Scores of the base units (a run with no adapter chosen still shows what the base scored)."""
    rows = []
    for index, unit in enumerate(plan.units):
        if unit.adapter_dir is None and index in results:
            for task in results[index].get("results", {}):
                for metric, (value, stderr) in _metric_values(results[index], task).items():
                    rows.append({"model": unit.label, "task": task, "metric": metric, "score": value,
                                 "stderr": stderr})
    return rows


def format_table(rows: list[TableRow]) -> str:
    def number(value: float | None) -> str:
        return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"

    lines = ["| task | metric | adapter | base ± se | adapter ± se | difference, 95% interval (kind) | items | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.task} | {r.metric} | {r.adapter} | {number(r.base)} ± {number(r.base_stderr)} | "
                     f"{number(r.tuned)} ± {number(r.tuned_stderr)} | {r.difference:+.3f}, {r.interval_text()} "
                     f"({r.stderr_kind}) | {r.items} | {r.verdict} |")
    return "\n".join(lines)


# --- the service the app and the CLI use ----------------------------------------------------------------------------

def default_root() -> Path:
    return Path(os.environ.get("LORA_LAB_BENCHMARKS", cache_root() / "benchmarks"))


def app_root(runs_root: str | Path) -> Path:
    """Where the app keeps its benchmark jobs and results: beside its runs (a Space's persistent /data), unless
    LORA_LAB_BENCHMARKS says otherwise."""
    return Path(os.environ.get("LORA_LAB_BENCHMARKS") or Path(runs_root) / "benchmarks")


JOB_ID = re.compile(r"^bench-\d{8}-\d{6}-[0-9a-f]{6}$")


class BenchmarkService:
    """Plans (every check before a child starts), starts, watches and stops benchmark jobs."""

    def __init__(self, runs_root: str | Path, root: str | Path | None = None):
        self.runs_root = Path(runs_root)
        self.root = Path(root) if root is not None else default_root()
        self.cache_dir = self.root / "cache"
        self._children: dict[str, subprocess.Popen] = {}

    # planning -------------------------------------------------------------------------------------------------
    def plan(self, tasks: list[str], limit: Any, adapters: list[str] | None = None, model: str | None = None,
             bits: int = 4, hub: bool | None = None, batch_size: int = 8) -> BenchmarkPlan:
        limit = check_limit(limit)
        model = (model or "").strip() or None
        chosen = [check_adapter(a, self.runs_root, model) for a in (adapters or []) if str(a).strip()]
        if model is not None:
            self._check_model(model, hub)
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
        for base, members in groups.values():   # bases first: the child loads each base once
            for info in infos:
                units.append(Unit(base_label(base), asdict(base), None, info.name, limit, _requests(info, limit)))
                units += [Unit(f"adapter: {_adapter_label(folder)}", asdict(cfg), str(folder), info.name, limit,
                               _requests(info, limit)) for folder, cfg in members]
        for unit in units:
            unit.cache_key = unit_cache_key(unit)
            unit.cached = (self.cache_dir / f"{unit.cache_key}.json").is_file()
        seconds, measured, pace = self._seconds(units)
        return BenchmarkPlan([i.name for i in infos], limit, units, seconds, batch_size, measured_rate=measured,
                             seconds_per_request=pace)

    @staticmethod
    def _check_model(model: str, hub: bool | None) -> None:
        try:
            kind = model_source_kind(model)
        except ModelSourceError as error:
            raise BenchmarkError(str(error)) from None
        if kind == "hub" and not (hub_reachable() if hub is None else hub):
            raise BenchmarkError(f"Cannot reach the Hugging Face Hub to download the model '{model}'; use the "
                                 f"embedded model '{EMBEDDED_MODEL}' or a local folder.")

    def _seconds(self, units: list[Unit]) -> tuple[float, bool, float]:
        """(seconds for the uncached units, whether the pace was measured here, the first unit's pace)."""
        path = self.cache_dir / "rates.json"
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

    # running --------------------------------------------------------------------------------------------------
    def job(self, job_id: str) -> BenchmarkJob:
        if not JOB_ID.match(job_id or ""):  # the id comes from the page: never a path of its own
            raise BenchmarkError(f"No benchmark job {job_id!r}.")
        return BenchmarkJob(self.root / "jobs" / job_id, self.cache_dir)

    def create(self, plan: BenchmarkPlan, owner: str | None = None) -> BenchmarkJob:
        job_id = time.strftime("bench-%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        job = self.job(job_id)
        job.folder.mkdir(parents=True)
        (job.folder / PLAN_FILE).write_text(json.dumps(plan.to_json(), indent=1), encoding="utf-8")
        write_status(job.folder, state="queued", units=len(plan.units), unit=0, owner=owner)
        return job

    def start(self, plan: BenchmarkPlan, owner: str | None = None) -> str:
        """A job folder, and a child process for the uncached units (none when everything is cached). One job at a
        time: two would share the CPU (or GPU) and each take twice as long."""
        busy = [job_id for job_id in self._children if self.running(job_id)]
        if busy and not all(u.cached for u in plan.units):
            raise BenchmarkError(f"A benchmark is already running ({busy[0]}); stop it or wait until it ends.")
        job = self.create(plan, owner)
        if all(u.cached for u in plan.units) and all(job.copy_cached(i, u) for i, u in enumerate(plan.units)):
            write_status(job.folder, state="completed", unit=len(plan.units), finished_at=time.time())
            return job.folder.name
        # Its own session, so Stop can end the child and anything it started with one killpg.
        child = spawn([sys.executable, "-m", "finetune.services.benchmarks", "--job", str(job.folder)],
                      job.folder / LOG_FILE, env={"LORA_LAB_BENCHMARKS": str(self.root)})
        self._children[job.folder.name] = child
        write_status(job.folder, pid=child.pid)
        return job.folder.name

    def latest_job(self, visitor: Visitor = LOCAL) -> str | None:
        """The newest job ``visitor`` may see (the UI re-attaches to it after a page reload)."""
        folder = self.root / "jobs"
        jobs = sorted(p.name for p in folder.iterdir() if (p / PLAN_FILE).is_file()) if folder.is_dir() else []
        visible = [job_id for job_id in jobs if can_view(visitor, self.owner_of(job_id))]
        return visible[-1] if visible else None

    def owner_of(self, job_id: str) -> str | None:
        return read_status(self.job(job_id).folder).get("owner")

    def running(self, job_id: str) -> bool:
        child = self._children.get(job_id)
        return child is not None and child.poll() is None

    def status(self, job_id: str) -> dict[str, Any]:
        folder = self.job(job_id).folder
        status = read_status(folder)
        child = self._children.get(job_id)
        # Without a pid the child is still being started (or this is the CLI's own in-process job).
        ended = child.poll() is not None if child is not None else \
            status.get("pid") is not None and not pid_alive(status.get("pid"))
        if status.get("state") in ("queued", "running") and ended:
            # The child died without saying so (killed, out of memory, or an app restart lost it): say that
            # instead of "running" forever.
            code = f"exit code {child.returncode}" if child is not None else "no longer running"
            status = write_status(folder, state="stopped" if (folder / STOP_FILE).exists() else "failed",
                                  error=status.get("error") or f"the benchmark process ended ({code}); see {LOG_FILE}")
        return status

    def request_stop(self, job_id: str) -> None:
        """Returns at once: STOP ends the child at its next model call; a child stuck elsewhere (loading a
        model, downloading data) gets SIGTERM after STOP_GRACE_SECONDS, then SIGKILL."""
        (self.job(job_id).folder / STOP_FILE).touch()
        threading.Thread(target=self._escalate, args=(job_id,), daemon=True).start()

    def stop(self, job_id: str) -> dict[str, Any]:
        (self.job(job_id).folder / STOP_FILE).touch()
        self._escalate(job_id)
        return self.status(job_id)

    def _escalate(self, job_id: str) -> None:
        child = self._children.get(job_id)
        if child is None:
            return
        for sig, seconds in ((None, STOP_GRACE_SECONDS), (signal.SIGTERM, TERM_SECONDS), (signal.SIGKILL, None)):
            if sig is not None:
                try:
                    os.killpg(child.pid, sig)
                except (ProcessLookupError, PermissionError):
                    return
            try:
                child.wait(timeout=seconds)
                return
            except subprocess.TimeoutExpired:
                continue

    def table(self, job_id: str) -> list[TableRow]:
        job = self.job(job_id)
        return build_table(job.plan(), job.results())


def _adapter_label(folder: Path) -> str:
    """The run id for <runs>/<id>/adapter, else the folder's own name."""
    return folder.parent.name if folder.name == ADAPTER_DIR else folder.name


# --- CLI --------------------------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m finetune.services.benchmarks",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", action="append", default=[], help=f"harness task (repeatable); offline: "
                                                                     f"{BUNDLED_TASK}")
    parser.add_argument("--forgetting-check", action="store_true", help="the general-knowledge preset")
    parser.add_argument("--adapter", action="append", default=[], help="run id or adapter folder (repeatable)")
    parser.add_argument("--model", default=None, help=f"base model (default: each adapter's own, else "
                                                      f"{EMBEDDED_MODEL})")
    parser.add_argument("--bits", type=int, default=4, help="bit width of the base when no adapter is given")
    parser.add_argument("--limit", default=None, help="items per task")
    parser.add_argument("--runs-root", default="runs")
    parser.add_argument("--out", default=None, help="benchmark folder (jobs and cache); default: the app's")
    parser.add_argument("--estimate-only", action="store_true", help="check and estimate, run nothing")
    parser.add_argument("--job", default=None, help=argparse.SUPPRESS)  # the app's child process
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.job:
        folder = Path(args.job)
        return run_job(BenchmarkJob(folder, Path(os.environ.get("LORA_LAB_BENCHMARKS", default_root())) / "cache"))
    service = BenchmarkService(args.runs_root, args.out)
    tasks = args.task + (forgetting_check_tasks() if args.forgetting_check else [])
    limit = args.limit if args.limit is not None else (FORGETTING_CHECK_LIMIT if args.forgetting_check else None)
    try:
        plan = service.plan(tasks, limit, args.adapter, args.model, args.bits)
    except BenchmarkError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(plan.estimate_text())
    if args.estimate_only:
        return 0
    job = service.create(plan)
    code = run_job(job)   # the CLI is its own process already: no second child
    status = read_status(job.folder)
    print(format_table(build_table(plan, job.results())) if any(u.adapter_dir for u in plan.units) else
          json.dumps(base_only_rows(plan, job.results()), indent=1))
    print(f"{status.get('state')}{': ' + status['error'] if status.get('error') else ''} (job folder {job.folder})")
    return code


if __name__ == "__main__":
    sys.exit(main())
