"""The device queue: one job trains at a time on this machine, the others wait in line on disk (state
"waiting" in their status.json, ordered by ``enqueued_at``), so a restarted app carries on with them. A dispatch
starts the first in line when the device is free; it runs after every enqueue and every end of a job, under a
file lock so two processes on one runs folder never start a job twice, and on a background thread while jobs
wait behind a run this process did not start. A waiting job's place and expected start come from the seconds
per step of completed runs of the same model and bit width.

Training runs are not the only jobs that need the device: another kind (a benchmark, finetune/services/benchmarks.py)
registers a ``JobKind`` with the manager, and its jobs wait in the same line, are spawned, reaped, stopped and
settled after a restart by the same code as a run, and show the same place in the queue. A job of such a kind lives
in a folder of its own (``kind.root / job_id``) with the same status.json; only its child and its estimate differ.

``RunQueue`` is a part of ``RunManager`` (finetune/services/runs.py): it uses the manager's ``root``, its locks,
``list_ids()``, ``run_dir()``, ``status()``, ``_config()`` and ``_spawn()``, and the admission's ``_check_disk()``.
"""

from __future__ import annotations

import contextlib
import fcntl
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from finetune.core.config import RunConfig
from finetune.core.run_folder import QUEUE_LOCK_FILE, STATUS_FILE
from finetune.core.run_status import WAITING, is_remote, read_status, write_status
from finetune.core.storage import enforce_budget
from finetune.services.admission import RunError

DISPATCH_SECONDS = 1.0  # how often a queue waiting behind a run this process did not start looks again
LIVE_STATES = (WAITING, "queued", "running")  # a job in line, being started or running: it holds its place


@dataclass(frozen=True)
class JobKind:
    """A kind of device job other than a training run: where its folders are, which ids are its, its child's
    argument list and log, and how many seconds a job of it should still take (None: no estimate)."""
    name: str                                   # "benchmark": how messages and the queue's line name its jobs
    root: Path                                  # its job folders: root / <job id> / status.json
    id_pattern: re.Pattern[str]                 # its ids (never a path: the pattern allows no separator)
    log_file: str
    command: Callable[[Path], list[str]]        # job folder -> the child's argument list (no shell)
    seconds_left: Callable[[Path], float | None]

    def owns(self, job_id: str) -> bool:
        return isinstance(job_id, str) and bool(self.id_pattern.match(job_id))

    def job_ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return [p.name for p in self.root.iterdir() if self.owns(p.name) and (p / STATUS_FILE).is_file()]


class RunQueue:
    """The queue's part of the run manager: waiting jobs in order, dispatch, and the expected start."""

    def add_job_kind(self, kind: JobKind) -> None:
        """Let jobs of ``kind`` wait in this queue (one kind of each name: a later one replaces it). Like the
        manager at its start, it settles jobs whose child died with an earlier app and carries on with waiting
        ones."""
        self._kinds = tuple(k for k in self._kinds if k.name != kind.name) + (kind,)
        for job_id in kind.job_ids():
            self.status(job_id)
        if self.waiting_ids():
            self.dispatch()

    def job_kind(self, job_id: str) -> JobKind | None:
        """The registered kind of ``job_id``; None for a training run."""
        return next((kind for kind in self._kinds if kind.owns(job_id)), None)

    def kind_name(self, job_id: str) -> str:
        kind = self.job_kind(job_id)
        return kind.name if kind else "run"

    def job_ids(self) -> list[str]:
        """Every job the device queue knows: the runs, then each registered kind's jobs."""
        return self.list_ids() + [job_id for kind in self._kinds for job_id in kind.job_ids()]

    def active_job(self) -> str | None:
        """The job (of any kind) holding the device on THIS machine, if any."""
        return self._holding_device(self.job_ids())

    def _holding_device(self, job_ids: list[str]) -> str | None:
        """The first of ``job_ids`` started on THIS machine and not ended (a synced run from another host does not
        hold the device)."""
        for job_id in job_ids:
            status = self.status(job_id)
            if status.get("state") in ("running", "queued") and not is_remote(status):
                return job_id
        return None

    def waiting_ids(self) -> list[str]:
        """Queued jobs not started yet, first in line first."""
        waiting = [(read_status(self.run_dir(job_id)), job_id) for job_id in self.job_ids()]
        waiting = [(status.get("enqueued_at") or 0, job_id) for status, job_id in waiting
                   if status.get("state") == WAITING]
        return [job_id for _, job_id in sorted(waiting)]

    def dispatch(self) -> str | None:
        """Start the first queued job if the device is free; returns the run started. Called after every
        enqueue and every end of a run, and by a background thread while jobs wait (an app restarted with a
        queue picks it up)."""
        with self._lock, self._queue_file_lock():
            if self.active_job() is not None:
                self._ensure_dispatcher()
                return None
            for run_id in self.waiting_ids():
                if self._start_waiting(run_id):
                    return run_id
        return None

    def _start_waiting(self, run_id: str) -> bool:
        """Start one waiting job; a job that cannot start (full disk, a config that no longer loads, a child
        that cannot be spawned) fails with its reason, and the caller goes on to the next in line."""
        folder = self.run_dir(run_id)
        resume = bool(read_status(folder).get("resume_requested"))
        try:
            enforce_budget(self.root)  # the budget is kept whenever a job takes the device
            self._check_disk("start a queued run")
            # A status() between 'queued' on disk and the child being known would settle the job as gone
            # (and free the device for the next one): settling waits for the start.
            with self._settle_lock:
                write_status(folder, state="queued", resume_requested=None, dequeued_at=time.time())
                self._spawn(run_id, resume=resume)
            return True
        except Exception as error:  # whatever it is, it is this job's, not the queue's
            message = str(error) if isinstance(error, RunError) else f"could not start: {type(error).__name__}: {error}"
            write_status(folder, state="failed", error=message, finished_at=time.time())
            return False

    @contextlib.contextmanager
    def _queue_file_lock(self) -> Iterator[None]:
        """Across processes (an app and the CLI, or an old app still shutting down, on one runs folder): one
        dispatch at a time, so a waiting job is never started twice."""
        with open(self.root / QUEUE_LOCK_FILE, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _ensure_dispatcher(self) -> None:
        """While jobs wait behind a run this process did not start (the app restarted), poll for its end."""
        if self._dispatcher is not None and self._dispatcher.is_alive():
            return
        self._dispatcher = threading.Thread(target=self._dispatch_while_waiting, name="run-queue", daemon=True)
        self._dispatcher.start()

    def _dispatch_while_waiting(self) -> None:
        while self.root.is_dir() and self.waiting_ids():
            time.sleep(DISPATCH_SECONDS)
            try:
                self.dispatch()
            except (OSError, RunError):  # the folder went away (tests) or a job is broken: keep the rest going
                continue

    def queue_info(self, run_id: str) -> dict[str, Any]:
        """A waiting job's place: position (1 = next), the jobs ahead and when it should start (seconds from
        now; None when a job ahead has no estimate yet)."""
        waiting = self.waiting_ids()
        if run_id not in waiting:
            return {}
        ahead = waiting[:waiting.index(run_id)]
        active = self.active_job()
        seconds: float | None = 0.0
        if active is not None:
            seconds = self._seconds_left(active)
        for other in ahead:
            estimate = self._expected_seconds(other)
            seconds = None if seconds is None or estimate is None else seconds + estimate
        return {"position": len(ahead) + 1, "ahead": ([active] if active else []) + ahead, "starts_in": seconds}

    def _seconds_left(self, run_id: str) -> float | None:
        """The running job's own ETA, while it is a whole one: None while an evaluation it still has to run has
        not been timed (its ETA leaves it out), the job's estimate before it has an ETA at all."""
        if self.job_kind(run_id) is not None:
            return self._expected_seconds(run_id)
        status = self.status(run_id)
        if status.get("evals_untimed"):
            return None
        left = status.get("eta_seconds")
        return float(left) if isinstance(left, (int, float)) else self._expected_seconds(run_id)

    def _expected_seconds(self, job_id: str) -> float | None:
        """How long a job should (still) take: its kind's estimate, or a run's from its config."""
        kind = self.job_kind(job_id)
        return kind.seconds_left(self.run_dir(job_id)) if kind else self._job_seconds(self._config(job_id))

    def expected_seconds(self, cfg: RunConfig) -> float | None:
        """How long ``cfg`` should train here, from completed runs of its model and bit width (the queue's own
        estimate); None before any such run was timed. The course says it before a step starts."""
        return self._job_seconds(cfg)

    def _job_seconds(self, cfg: RunConfig | None) -> float | None:
        """How long a job should take: its steps at the seconds per step that completed runs of the same model
        and bit width took on this machine; None when it trains by epochs or nothing comparable ran yet."""
        if cfg is None or cfg.training.max_steps <= 0:
            return None
        key = (cfg.model.source, cfg.model.bits)
        rates = sorted(rate for other, rate in map(self._step_rate, self.list_ids()) if other == key)
        return cfg.training.max_steps * rates[len(rates) // 2] if rates else None

    def _step_rate(self, run_id: str) -> tuple[tuple[str, int] | None, float]:
        """((model source, bits), seconds per step) of a completed run, else (None, 0). A completed run never
        changes, so it is read once: the queue's expected start is polled every few seconds per waiting job."""
        if run_id in self._step_rates:
            return self._step_rates[run_id]
        status = read_status(self.root / run_id)
        if status.get("state") != "completed":
            return None, 0.0  # not final yet (or failed): not kept, it may still complete
        cfg = self._config(run_id)
        rate = ((cfg.model.source, cfg.model.bits), float(status["duration"]) / int(status["step"])) \
            if cfg and status.get("duration") and status.get("step") else (None, 0.0)
        self._step_rates[run_id] = rate
        return rate
