"""Benchmarks with EleutherAI's lm-evaluation-harness: does the tuned model still know what the base knew?

Each chosen task runs on the base model and on every chosen adapter, the base at the bit width the adapter was
trained at (so a difference is the adapter's alone), in a child process that writes its progress and the
harness's own result JSON into a job folder and honours a STOP file between two model calls. Results are cached
per (model and bits, adapter contents, task, limit): asking again is instant.

A benchmark needs the device as a training run does, so a job waits in the run manager's one device queue: behind a
training run, and a run queued after it waits behind it. The manager spawns, reaps and stops its child with the
code it uses for runs (finetune/services/processes.py), settles a job whose child died with the app, and applies the
same admission rules (signed in, the visitor's limits, the disk) and owners.

Offline (and in the tests) the bundled task ``lora_lab_basics`` (data/benchmarks/: 60 multiple-choice items
written for this project, in the harness's own YAML task format) needs no network; any other installed harness
task (arc_easy, hellaswag, mmlu subsets, gsm8k ...) downloads its data from the Hub and is refused up front
when the Hub cannot be reached.

The parts, each a module: what a job will run and how long it should take (benchmark_plan.py), the child and the
job folder (benchmark_child.py), the base-vs-adapter table and its verdict (benchmark_table.py); this module is the
service the app and the CLI use, and names their public parts in one place.

    service = BenchmarkService("runs", manager=manager)   # the app's RunManager: its one device queue
    plan = service.plan(adapters=["my-run"], tasks=["lora_lab_basics"], limit=60)   # BenchmarkError if refused
    print(plan.estimate_text())
    job = service.start(plan, visitor)    # waits in the device queue; its child: benchmark_child.py
    service.status(job); service.request_stop(job, visitor); service.table(job)

    python -m finetune.services.benchmarks --adapter runs/my-run --task lora_lab_basics --limit 60  # CLI, same checks
    python -m finetune.services.benchmarks --forgetting-check --adapter my-run --estimate-only
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from finetune.core.access import LOCAL, AccessDenied, Visitor, can_view
from finetune.core.config import EMBEDDED_MODEL
from finetune.core.models import cache_root
from finetune.core.run_status import read_status, write_status
from finetune.services.admission import RunError
from finetune.services.benchmark_child import LOG_FILE, PLAN_FILE, BenchmarkJob, child_command, record_rate
from finetune.services.benchmark_plan import (BUNDLED_ITEMS, BUNDLED_TASK, FORGETTING_CHECK_LIMIT,
                                              FORGETTING_CHECK_ONLINE, MIN_ITEMS, Z_95, BenchmarkError,
                                              BenchmarkPlan, Unit, check_limit, forgetting_check_tasks, make_plan,
                                              task_manager)
from finetune.services.benchmark_table import (TableRow, base_only_rows, build_table, format_table,
                                               paired_difference, verdict)
from finetune.services.run_queue import LIVE_STATES, JobKind
from finetune.services.runs import RunManager

# The public parts of the benchmark modules, importable from here as before the split.
__all__ = ["BUNDLED_ITEMS", "BUNDLED_TASK", "FORGETTING_CHECK_LIMIT", "FORGETTING_CHECK_ONLINE", "MIN_ITEMS", "Z_95",
           "BenchmarkError", "BenchmarkJob", "BenchmarkPlan", "BenchmarkService", "TableRow", "Unit", "app_root",
           "base_only_rows", "build_table", "check_limit", "default_root", "forgetting_check_tasks", "format_table",
           "main", "paired_difference", "record_rate", "task_manager", "verdict"]

JOBS_DIR, CACHE_DIR = "jobs", "cache"
JOB_ID = re.compile(r"^bench-\d{8}-\d{6}-[0-9a-f]{6}$")
JOB_KIND = "benchmark"
CLI_WAIT_SECONDS = 7 * 24 * 3600.0  # the CLI waits for its job as long as the queue ahead of it takes


def default_root() -> Path:
    return Path(os.environ.get("LORA_LAB_BENCHMARKS", cache_root() / "benchmarks"))


def app_root(runs_root: str | Path) -> Path:
    """Where the app keeps its benchmark jobs and results: beside its runs (a Space's persistent /data), unless
    LORA_LAB_BENCHMARKS says otherwise."""
    return Path(os.environ.get("LORA_LAB_BENCHMARKS") or Path(runs_root) / "benchmarks")


class BenchmarkService:
    """Plans (every check before a child starts) benchmark jobs and queues them in ``manager``'s device queue, which
    starts, watches and stops them; without a manager it makes one on ``runs_root`` (the CLI, tests)."""

    def __init__(self, runs_root: str | Path, root: str | Path | None = None, manager: RunManager | None = None):
        self.runs_root = Path(runs_root)
        self.root = Path(root if root is not None else default_root()).resolve()
        self.cache_dir = self.root / CACHE_DIR
        self.manager = manager or RunManager(runs_root)
        self.manager.add_job_kind(JobKind(JOB_KIND, self.root / JOBS_DIR, JOB_ID, LOG_FILE, self._child_command,
                                          self._seconds_left))

    def plan(self, tasks: list[str], limit: Any, adapters: list[str] | None = None, model: str | None = None,
             bits: int = 4, hub: bool | None = None, batch_size: int = 8) -> BenchmarkPlan:
        return make_plan(self.runs_root, self.cache_dir, tasks, limit, adapters, model, bits, hub, batch_size)

    def job(self, job_id: str) -> BenchmarkJob:
        if not JOB_ID.match(job_id or ""):  # the id comes from the page: never a path of its own
            raise BenchmarkError(f"No benchmark job {job_id!r}.")
        return BenchmarkJob(self.root / JOBS_DIR / job_id, self.cache_dir)

    def create(self, plan: BenchmarkPlan, owner: str | None = None) -> BenchmarkJob:
        """A job folder with its plan; it is no job of the queue until ``start`` queues it."""
        job = self.job(time.strftime("bench-%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6])
        job.folder.mkdir(parents=True)
        (job.folder / PLAN_FILE).write_text(json.dumps(plan.to_json(), indent=1), encoding="utf-8")
        write_status(job.folder, units=len(plan.units), unit=0, owner=owner)
        return job

    def start(self, plan: BenchmarkPlan, visitor: Visitor = LOCAL) -> str:
        """Queue a job for the uncached units (it starts when the device is free); a plan that is all cached is
        completed at once, with no child. RunError or AccessDenied when the queue's admission refuses it."""
        job = self.create(plan, visitor.owner)
        if all(u.cached for u in plan.units) and all(job.copy_cached(i, u) for i, u in enumerate(plan.units)):
            write_status(job.folder, state="completed", unit=len(plan.units), finished_at=time.time())
            return job.folder.name
        try:
            return self.manager.enqueue(job.folder.name, visitor, plan.seconds)
        except (RunError, AccessDenied):
            shutil.rmtree(job.folder, ignore_errors=True)  # refused: no job left behind to re-attach to
            raise

    def _child_command(self, folder: Path) -> list[str]:
        return child_command(self.manager.python, folder, self.cache_dir)

    def _seconds_left(self, folder: Path) -> float | None:
        """The queue's estimate for a job: its plan's seconds, less the time it has run; None once it overran."""
        try:
            plan = BenchmarkJob(folder, self.cache_dir).plan()
        except (OSError, ValueError, TypeError, KeyError):
            return None
        started = read_status(folder).get("started_at")
        left = plan.seconds - (time.time() - started if isinstance(started, (int, float)) else 0.0)
        return left if left > 0 else None

    def latest_job(self, visitor: Visitor = LOCAL) -> str | None:
        """The newest job ``visitor`` may see (the UI re-attaches to it after a page reload)."""
        folder = self.root / JOBS_DIR
        jobs = sorted(p.name for p in folder.iterdir() if JOB_ID.match(p.name) and self.job(p.name).planned()) \
            if folder.is_dir() else []
        visible = [job_id for job_id in jobs if can_view(visitor, self.owner_of(job_id))]
        return visible[-1] if visible else None

    def owner_of(self, job_id: str) -> str | None:
        return read_status(self.job(job_id).folder).get("owner")

    def status(self, job_id: str) -> dict[str, Any]:
        """The job's status as the device queue sees it (a child that died unseen is settled); a waiting job also
        gets its place: ``position``, the jobs ``ahead`` (the one on the device first) and ``starts_in``."""
        status = self.manager.status(self.job(job_id).folder.name)
        return {**status, **self.manager.queue_info(job_id)} if status.get("state") == "waiting" else status

    def running(self, job_id: str) -> bool:
        """Not over yet: waiting in the queue, starting or running, or its child still exiting."""
        return self.status(job_id).get("state") in LIVE_STATES or self.manager.child_alive(job_id)

    def request_stop(self, job_id: str, visitor: Visitor = LOCAL) -> dict[str, Any]:
        """Returns at once: a waiting job leaves the queue; a running one ends at its next model call (the STOP
        file), or is terminated, then killed, by the queue's escalation when it is stuck elsewhere."""
        return self.manager.request_stop(self.job(job_id).folder.name, visitor)

    def stop(self, job_id: str) -> dict[str, Any]:
        return self.manager.stop(self.job(job_id).folder.name)

    def table(self, job_id: str) -> list[TableRow]:
        job = self.job(job_id)
        return build_table(job.plan(), job.results())


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
    parser.add_argument("--out", default=None, help="benchmark folder (jobs and cache); default: the app's, beside the "
                                                    "runs (so the app's device queue sees the job)")
    parser.add_argument("--estimate-only", action="store_true", help="check and estimate, run nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    service = BenchmarkService(args.runs_root, args.out or app_root(args.runs_root))
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
    job_id = service.start(plan)  # through the device queue: it waits behind a run training on this runs folder
    if service.status(job_id).get("state") == "waiting":
        print(f"Waiting in the device queue behind {', '.join(service.status(job_id).get('ahead') or [])}.")
    status = service.manager.wait(job_id, timeout=CLI_WAIT_SECONDS)
    job = service.job(job_id)
    print(format_table(build_table(plan, job.results())) if any(u.adapter_dir for u in plan.units) else
          json.dumps(base_only_rows(plan, job.results()), indent=1))
    print(f"{status.get('state')}{': ' + status['error'] if status.get('error') else ''} (job folder {job.folder})")
    return 0 if status.get("state") == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
