"""A benchmark job's child process and its folder: the plan's units run one by one through lm-evaluation-harness
(cached ones copied), each unit's harness result JSON written into the job folder and the shared cache, progress
into status.json at each model call, and the STOP file honoured between two model calls. The app starts it through
the device queue (finetune/services/benchmarks.py), never in its own process:

    python -m finetune.services.benchmark_child --job <benchmarks>/jobs/<id> --cache <benchmarks>/cache

    jobs/<id>/plan.json        the BenchmarkPlan (written before the job is queued)
              status.json      the queue's and the child's state (finetune/core/run_status.py)
              STOP             written by Stop: the child ends at its next model call
              benchmark.log    the child's stdout and stderr
              results/unit-N.json   the harness's result of unit N
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from finetune.core.config import ModelConfig
from finetune.core.run_folder import STOP_FILE
from finetune.core.run_status import read_status, write_status
from finetune.services.benchmark_plan import RATES_FILE, BenchmarkPlan, Unit, task_manager

PLAN_FILE, RESULTS_DIR, LOG_FILE = "plan.json", "results", "benchmark.log"
STATUS_EVERY_SECONDS = 1.0         # progress writes are throttled: a model call can take milliseconds


class BenchmarkStopped(RuntimeError):
    """Raised inside the harness's model call when the STOP file appears."""


def child_command(python: str, folder: Path, cache_dir: Path) -> list[str]:
    """The child's argument list (no shell), as the device queue spawns it."""
    return [python, "-m", "finetune.services.benchmark_child", "--job", str(folder), "--cache", str(cache_dir)]


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

    def planned(self) -> bool:
        return (self.folder / PLAN_FILE).is_file()

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
    path = cache_dir / RATES_FILE
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.services.benchmark_child",
                                     description="Run one benchmark job's plan (the app's child process).")
    parser.add_argument("--job", required=True, help="the job folder (holds plan.json)")
    parser.add_argument("--cache", required=True, help="the shared result cache")
    args = parser.parse_args(argv)
    return run_job(BenchmarkJob(Path(args.job), Path(args.cache)))


if __name__ == "__main__":
    sys.exit(main())
