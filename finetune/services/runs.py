"""The run manager: training runs in child processes, one at a time on the device, their state on disk.

Training never runs inside the app's process: a crash, an out-of-memory error or a kill ends the child only,
and the GPU memory goes with it. The child is ``python -m finetune.train runs/<id>/config.yaml --output-dir
runs/<id>`` (an argument list, no shell), its output goes to ``runs/<id>/train.log``.

    manager = RunManager("runs")
    run_id = manager.start(cfg)          # queued: starts now, or after the jobs before it (persisted on disk)
    manager.queue_info(run_id)           # a waiting job's position and expected start
    manager.request_stop(run_id)         # returns at once; the manager escalates in the background
    manager.cancel(run_id) / delete(run_id)   # take a waiting job out of the queue / remove a finished run
    manager.stop(run_id)                 # the same, then waits for the final state (CLI and tests)
    manager.resume(run_id)               # continues from the last checkpoint

Stop escalates: the STOP file asks the child to checkpoint and stop at its next step end; after
``LORA_LAB_STOP_GRACE_SECONDS`` (default 30) the child's process group gets SIGTERM, and SIGKILL
``LORA_LAB_STOP_TERM_SECONDS`` (default 10) later. The deadline counts from the STOP file's time on disk, so an app
restarted meanwhile finishes the escalation. A killed run ends ``stopped`` and resumes from its last complete
checkpoint. A running run with no progress on disk for ``LORA_LAB_STALL_SECONDS`` (default 600) is reported stalled.

Its parts, each a module: the device queue (run_queue.py), the admission rules (admission.py: limits, disk,
owners, source pre-checks) and the child processes themselves (processes.py: spawn, reap, escalation).

Benchmarks are device jobs too: their service registers a ``JobKind`` (run_queue.py), and ``enqueue(job_id)``,
``status``, ``request_stop``, ``cancel``, ``stop`` and ``queue_info`` then serve a benchmark job by its id as they
serve a run; ``run_dir`` names its folder. Only what is a run's alone (resume, delete, summaries, adapters) stays
with runs.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.core.access import LOCAL, Visitor
from finetune.core.config import ConfigError, RunConfig, load_config, save_config
from finetune.core.distributed import check_launch, end_leftover_ranks, is_multi_process, launch_command, process_start
from finetune.core.run_folder import (ADAPTER_DIR, LOG_FILE, METRICS_FILE, REWARD_DIR, RUN_CONFIG, STOP_FILE,
                                      UPLOADS_DIR, has_adapter, is_run_id, last_checkpoint, modified_time, run_folders,
                                      run_id_stem)
from finetune.core.run_status import (FINAL_STATES, HOSTNAME, WAITING, is_remote, read_metrics, read_status,
                                      write_status)
from finetune.core.storage import DISK_FULL_EXIT, disk_full_message, enforce_budget, folder_bytes
from finetune.services.admission import RunAdmission, RunError
from finetune.services.processes import ChildProcess, escalate_stop, reap_in_background, spawn, tail
from finetune.services.run_queue import JobKind, RunQueue

STARTING_SECONDS = 60.0  # a job dequeued this recently without a pid on disk is still having its child started
_log = logging.getLogger(__name__)


def _seconds_setting(name: str, default: float) -> float:
    """An operator setting in seconds from the environment; a bad value stops the app with a clear message."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a positive number of seconds, got {raw!r}")
    return value


@dataclass
class RunSummary:
    run_id: str
    state: str
    config: RunConfig | None
    step: int
    max_steps: int
    final_loss: float | None
    final_eval_loss: float | None
    duration: float | None
    error: str | None
    has_adapter: bool


class RunManager(RunQueue, RunAdmission):
    """Starts, stops, resumes and lists runs under one folder; at most one trains at a time."""

    def __init__(self, root: str | Path = "runs", python: str = sys.executable, stop_grace: float | None = None,
                 term_grace: float | None = None, stall_after: float | None = None):
        """The three times (seconds) default to the operator settings LORA_LAB_STOP_GRACE_SECONDS (30),
        LORA_LAB_STOP_TERM_SECONDS (10) and LORA_LAB_STALL_SECONDS (600); tests pass shorter ones."""
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.python = python
        self.stop_grace = stop_grace or _seconds_setting("LORA_LAB_STOP_GRACE_SECONDS", 30.0)
        self.term_grace = term_grace or _seconds_setting("LORA_LAB_STOP_TERM_SECONDS", 10.0)
        self.stall_after = stall_after or _seconds_setting("LORA_LAB_STALL_SECONDS", 600.0)
        self._lock = threading.Lock()
        self._settle_lock = threading.RLock()  # the reaper, the stop escalation and status() may settle at once
        self._children: dict[str, subprocess.Popen] = {}
        self._stoppers: dict[str, threading.Thread] = {}
        self._dispatcher: threading.Thread | None = None
        self._kinds: tuple[JobKind, ...] = ()  # other kinds of device jobs (benchmarks): add_job_kind
        self._step_rates: dict[str, tuple[tuple[str, int] | None, float]] = {}  # completed runs, read once
        for run_id in self.list_ids():  # an app restarted during a Stop finishes the escalation it began
            self.status(run_id)
        if self.waiting_ids():  # an app restarted with jobs in the queue carries on with them
            self.dispatch()

    # --- paths --------------------------------------------------------------------------------------------

    def keep_upload(self, path: str) -> str:
        """Copy an upload beside the runs: gradio's temporary copy may vanish while the child still reads it.
        A start that is then refused hands the copy to discard_upload."""
        source = Path(path)
        if not source.is_file() or source.parent == self.root / UPLOADS_DIR:
            return path
        # The random part keeps two visitors' same-named uploads in the same second apart.
        target = self.root / UPLOADS_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}-{source.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        return str(target)

    def discard_upload(self, path: str | None) -> None:
        """Remove a kept upload that no run uses (its start was refused). Anything outside runs/uploads, and
        a copy that a run's config names, is left alone."""
        if not path:
            return
        copy = Path(path)
        if copy.parent != self.root / UPLOADS_DIR or not copy.is_file():
            return
        for run_id in self.list_ids():
            config = self.root / run_id / RUN_CONFIG
            if config.is_file() and copy.name in config.read_text(encoding="utf-8", errors="replace"):
                return
        copy.unlink(missing_ok=True)

    def run_dir(self, run_id: str) -> Path:
        """The run's folder (or a job of another kind's, in its kind's folder); refuses ids that could point outside
        the runs folder."""
        kind = self.job_kind(run_id)
        if kind is not None:
            return kind.root / run_id
        if not is_run_id(run_id):
            raise RunError(f"Invalid run id {run_id!r}: use letters, digits, '.', '_' and '-'.")
        folder = (self.root / run_id).resolve()
        if folder.parent != self.root:
            raise RunError(f"Invalid run id {run_id!r}.")
        return folder

    def new_run_id(self, cfg: RunConfig) -> str:
        base, stamp = run_id_stem(cfg.run_name), time.strftime("%Y%m%d-%H%M%S")
        run_id, n = f"{base}-{stamp}", 1
        while (self.root / run_id).exists():
            n += 1
            run_id = f"{base}-{stamp}-{n}"
        return run_id

    # --- state --------------------------------------------------------------------------------------------

    def status(self, run_id: str) -> dict[str, Any]:
        """status.json, corrected when the process behind a 'running' run has died without saying so. A live
        run also gets, not stored, ``stop_requested_at`` once Stop was pressed and ``stalled_seconds`` when nothing
        in its folder moved for ``stall_after`` seconds."""
        folder = self.run_dir(run_id)
        status = read_status(folder)
        if is_remote(status):  # trained elsewhere and synced back: only that machine knows if it still runs
            return status
        if status.get("state") not in ("running", "queued"):
            return status
        if status.get("state") == "queued" and not status.get("pid") and \
                time.time() - float(status.get("dequeued_at") or 0) < STARTING_SECONDS:
            return status  # being started (maybe by another process on this folder): no pid to judge it by yet
        process = self._process(run_id, status)
        if not process.alive():
            return self._settle(run_id, process)
        live: dict[str, Any] = {}
        try:
            live["stop_requested_at"] = (folder / STOP_FILE).stat().st_mtime
            self._escalate_in_background(run_id)  # after an app restart, this finishes the Stop it began
        except FileNotFoundError:
            pass
        idle = time.time() - self._last_progress(run_id, status)
        if idle >= self.stall_after:
            live["stalled_seconds"] = round(idle)
        return {**status, **live}

    def _last_progress(self, run_id: str, status: dict[str, Any]) -> float:
        """When the run last showed life on disk: a status write, a metrics row or a line in its log."""
        times = [float(status.get(key) or 0) for key in ("updated_at", "started_at", "created_at")]
        for path in (self.run_dir(run_id) / METRICS_FILE, self._log_path(run_id)):
            try:
                times.append(path.stat().st_mtime)
            except OSError:
                pass
        return max(times)

    def _settle(self, run_id: str, process: ChildProcess) -> dict[str, Any]:
        """Write the final state of a run whose process has ended, unless the child wrote one itself."""
        with self._settle_lock:
            folder = self.run_dir(run_id)
            status = read_status(folder)
            # A process of an earlier attempt (the run was resumed meanwhile) says nothing about the run now.
            if status.get("state") not in ("running", "queued") or self._children.get(run_id) is not process.popen:
                return status
            code = process.exit_code()
            if (folder / STOP_FILE).exists():  # asked to stop, then ended or was ended: resumable
                return write_status(folder, state="stopped", finished_at=time.time(),
                                    error=status.get("stop_note") or status.get("error"))
            process_name = "training" if self.job_kind(run_id) is None else self.kind_name(run_id)
            message = (f"{process_name} process ended unexpectedly (exit code {code})" if code is not None
                       else f"{process_name} process is no longer running (app restarted or process killed)")
            if code == DISK_FULL_EXIT:  # the child may not have had room to write its own reason
                message = disk_full_message("saving (a checkpoint, the metrics or the status)",
                                            "resume: the previous checkpoint is kept")
            state = "failed" if code is not None else "interrupted"
            return write_status(folder, state=state, error=status.get("error") or message, finished_at=time.time())

    def _process(self, run_id: str, status: dict[str, Any]) -> ChildProcess:
        child = self._children.get(run_id)
        if child is not None:
            return ChildProcess(child, child.pid)
        return ChildProcess(None, status.get("pid"), status.get("pid_start"))

    def active_run(self) -> str | None:
        """The run training on THIS machine, if any (the device may also be held by a benchmark: active_job)."""
        return self._holding_device(self.list_ids())

    def list_ids(self) -> list[str]:
        """The runs, newest first; odd entries of the runs folder (symlinks, files, unreadable folders) are skipped."""
        return [p.name for p in sorted(run_folders(self.root), key=modified_time, reverse=True)]

    def summary(self, run_id: str) -> RunSummary:
        folder = self.run_dir(run_id)
        status = self.status(run_id)
        try:
            cfg: RunConfig | None = load_config(folder / RUN_CONFIG)
        except Exception:  # an old or hand-edited config must not hide the run from the history
            cfg = None
        rows = read_metrics(folder)
        losses = [r["loss"] for r in rows if isinstance(r.get("loss"), (int, float))]
        evals = [r["eval_loss"] for r in rows if isinstance(r.get("eval_loss"), (int, float))]
        duration = status.get("duration")
        if duration is None and status.get("started_at"):
            duration = round((status.get("finished_at") or time.time()) - status["started_at"], 1)
        return RunSummary(run_id, status.get("state", "unknown"), cfg, int(status.get("step") or 0),
                          int(status.get("max_steps") or 0), losses[-1] if losses else None,
                          evals[-1] if evals else None, duration, status.get("error"),
                          has_adapter(folder / ADAPTER_DIR))

    def list_runs(self) -> list[RunSummary]:
        return [self.summary(run_id) for run_id in self.list_ids()]

    def finished_adapters(self) -> dict[str, Path]:
        """run id -> adapter folder, for every run that saved one: SFT, DPO and KTO runs. A reward run saves
        under reward_model/ instead, so it never shows up as something to chat with."""
        return {run_id: self.run_dir(run_id) / ADAPTER_DIR for run_id in self.list_ids()
                if has_adapter(self.run_dir(run_id) / ADAPTER_DIR)}

    def reward_models(self) -> dict[str, Path]:
        """run id -> reward model folder, for every finished reward run (they score answers, they do not chat)."""
        return {run_id: self.run_dir(run_id) / REWARD_DIR for run_id in self.list_ids()
                if has_adapter(self.run_dir(run_id) / REWARD_DIR)}

    def log_tail(self, run_id: str, lines: int = 30) -> str:
        return tail(self._log_path(run_id), lines)

    def _log_path(self, job_id: str) -> Path:
        kind = self.job_kind(job_id)
        return self.run_dir(job_id) / (kind.log_file if kind else LOG_FILE)

    # --- actions ------------------------------------------------------------------------------------------

    def start(self, cfg: RunConfig, run_id: str | None = None, visitor: Visitor = LOCAL,
              check_limits: bool = True) -> str:
        """Queue a run for ``visitor`` and return its id; it starts at once when the device is free, else when the
        jobs queued before it have run (RunError when a limit or the disk refuses it, AccessDenied when
        signed-out)."""
        with self._lock:
            check_launch(cfg)  # more processes than devices, FSDP on the CPU: refused before it waits
            if check_limits:
                self.check_job(cfg, visitor)
            run_id = run_id or self.new_run_id(cfg)
            folder = self.run_dir(run_id)
            folder.mkdir(parents=True, exist_ok=True)
            save_config(cfg, folder / RUN_CONFIG)
            now = time.time()
            write_status(folder, state=WAITING, created_at=now, enqueued_at=now, step=0, error=None,
                         owner=visitor.owner)
        self.dispatch()
        return run_id

    def enqueue(self, job_id: str, visitor: Visitor = LOCAL, seconds: float | None = None) -> str:
        """Queue a job of a registered kind (a benchmark) whose folder its service has laid out: refused like a run
        (signed out, over the visitor's limits, a full disk: RunError or AccessDenied), else it waits in line."""
        kind = self.job_kind(job_id)
        if kind is None:
            raise RunError(f"{job_id!r} is no job of a kind this queue knows.")
        with self._lock:
            self.check_device_job(visitor, f"run a {kind.name}", seconds)
            now = time.time()
            write_status(self.run_dir(job_id), state=WAITING, created_at=now, enqueued_at=now, error=None,
                         owner=visitor.owner)
        self.dispatch()
        return job_id

    def child_alive(self, job_id: str) -> bool:
        """Whether a child this manager started for the job is still a process (it may have written its final
        state a moment before it exits)."""
        child = self._children.get(job_id)
        return child is not None and child.poll() is None

    def resume(self, run_id: str, visitor: Visitor = LOCAL) -> str:
        """Queue a stopped, failed or interrupted run to continue from its last checkpoint."""
        self.require_can_act(run_id, visitor, "resume this run")
        with self._lock:
            folder = self.run_dir(run_id)
            status = self.status(run_id)
            if status.get("state") not in ("stopped", "failed", "interrupted"):
                raise RunError(f"Run {run_id} is {status.get('state', 'unknown')}; only stopped, failed or "
                               "interrupted runs can be resumed.")
            if last_checkpoint(folder) is None:
                raise RunError(f"Run {run_id} saved no checkpoint yet, so there is nothing to resume from.")
            self._check_disk("resume a run")
            try:  # the devices may have changed since it started
                check_launch(load_config(folder / RUN_CONFIG))
            except ConfigError as error:
                raise RunError(f"Run {run_id} cannot resume on this machine: {error}") from None
            (folder / STOP_FILE).unlink(missing_ok=True)
            write_status(folder, state=WAITING, enqueued_at=time.time(), resume_requested=True, error=None,
                         stop_note=None, finished_at=None)
        self.dispatch()
        return run_id

    def _config(self, run_id: str) -> RunConfig | None:
        try:
            return load_config(self.run_dir(run_id) / RUN_CONFIG)
        except Exception:  # a hand-edited config has no estimate; it still runs or fails with its own message
            return None

    def cancel(self, run_id: str, visitor: Visitor = LOCAL) -> dict[str, Any]:
        """Take a job out of the queue before it starts (a started one is stopped instead: request_stop)."""
        self.require_can_act(run_id, visitor, f"cancel this {self.kind_name(run_id)}")
        with self._lock:
            status = read_status(self.run_dir(run_id))
            if status.get("state") != WAITING:
                return status
            if status.get("resume_requested"):  # it trained before: it stays resumable from its checkpoints
                return write_status(self.run_dir(run_id), state="stopped", resume_requested=None,
                                    finished_at=time.time(), error="Its resume was cancelled while it waited in "
                                    "the queue; resume it again to continue from its last checkpoint.")
            return write_status(self.run_dir(run_id), state="cancelled", finished_at=time.time(),
                                error="Cancelled while it waited in the queue; it never started.")

    def delete(self, run_id: str, visitor: Visitor = LOCAL) -> int:
        """Remove a run's folder with its checkpoints, merges and exports (and its kept upload when no other run
        uses it); returns the bytes freed. A run still training must be stopped first."""
        self.require_can_act(run_id, visitor, "delete this run")
        with self._lock:
            folder = self.run_dir(run_id)
            if not folder.is_dir():
                raise RunError(f"Run {run_id} does not exist (deleted already?).")
            if self.status(run_id).get("state") in ("running", "queued"):
                raise RunError(f"Run {run_id} is still training: stop it first, then delete it.")
            cfg = self._config(run_id)
            freed = folder_bytes(folder)
            shutil.rmtree(folder)
        if cfg is not None:
            self.discard_upload(cfg.data.source)
        return freed

    def child_command(self, run_id: str, resume: bool) -> list[str]:
        """The child's argument list (no shell); tests substitute a child of their own here."""
        folder = self.run_dir(run_id)
        cfg = load_config(folder / RUN_CONFIG)
        if is_multi_process(cfg):  # several ranks through accelerate, under one launcher that Stop can signal
            return launch_command(cfg, folder, folder / RUN_CONFIG, self.python, resume)
        command = [self.python, "-m", "finetune.train", str(folder / RUN_CONFIG), "--output-dir", str(folder)]
        return command + ["--resume"] if resume else command

    def _spawn(self, run_id: str, resume: bool) -> None:
        folder, kind = self.run_dir(run_id), self.job_kind(run_id)
        command = kind.command(folder) if kind else self.child_command(run_id, resume)
        child = spawn(command, self._log_path(run_id))
        self._children[run_id] = child
        write_status(folder, pid=child.pid, pid_start=process_start(child.pid), hostname=HOSTNAME)
        reap_in_background(child, f"reap-{run_id}", lambda: self._reap(run_id, child))

    def _reap(self, run_id: str, child: subprocess.Popen) -> None:
        """Record how an ended child's run ended, and hand the device to the next job in line."""
        try:
            self._settle(run_id, ChildProcess(child, child.pid))
            # The next job in line takes the device (its start keeps the budget); with none waiting, prune now.
            if self.root.is_dir() and self.dispatch() is None:
                enforce_budget(self.root)
        except Exception:  # a full disk, a folder deleted meanwhile: the next poll settles it; log it, never die
            _log.exception("Settling run %s after its process ended failed", run_id)

    def request_stop(self, run_id: str, visitor: Visitor = LOCAL) -> dict[str, Any]:
        """Ask the run to checkpoint and stop at its next step, and return at once; if it has not ended after
        ``stop_grace`` seconds a background thread terminates, then kills, its process group. A job still
        waiting in the queue is cancelled."""
        self.require_can_act(run_id, visitor, f"stop this {self.kind_name(run_id)}")
        folder = self.run_dir(run_id)
        status = self.status(run_id)
        if status.get("state") == WAITING:
            return self.cancel(run_id, visitor)
        if status.get("state") not in ("running", "queued"):
            return status
        if not (folder / STOP_FILE).exists():  # pressing Stop again must not push the deadline back
            (folder / STOP_FILE).touch()
        if not is_remote(status):
            self._escalate_in_background(run_id)
        return status

    def stop(self, run_id: str, timeout: float = 600.0) -> dict[str, Any]:
        """request_stop, then wait until the run has ended and its process is gone (for the CLI and tests)."""
        process = self._process(run_id, read_status(self.run_dir(run_id)))
        if self.request_stop(run_id).get("state") not in ("running", "queued"):
            return self.status(run_id)
        status = self.wait(run_id, timeout=timeout)
        process.wait_for_exit(time.time() + timeout)  # the child writes its final state just before it exits
        return status

    def _escalate_in_background(self, run_id: str) -> None:
        with self._settle_lock:
            if run_id in self._stoppers and self._stoppers[run_id].is_alive():
                return
            thread = threading.Thread(target=self._escalate, args=(run_id,), name=f"stop-{run_id}", daemon=True)
            self._stoppers[run_id] = thread
            thread.start()

    def _escalate(self, run_id: str) -> None:
        """Polite STOP file, then SIGTERM, then SIGKILL to the child's process group, each after its grace."""
        folder = self.run_dir(run_id)
        process = self._process(run_id, read_status(folder))
        try:  # the STOP file's time on disk, so a restarted app keeps the original deadline
            asked = (folder / STOP_FILE).stat().st_mtime
        except OSError:
            return  # resumed meanwhile: nothing to stop
        # accelerate (torch elastic) starts each rank in a session of its own, out of the group's reach, and the
        # launcher that would end them is killed: a rank left running would hold the device (end_leftover_ranks).
        if escalate_stop(process, asked, self.stop_grace, self.term_grace,
                         still_stopping=lambda: self._still_stopping(run_id, process),
                         forced=lambda sig: self._note_forced(run_id, sig),
                         after_kill=lambda: end_leftover_ranks(folder)):
            self._settle(run_id, process)

    def _still_stopping(self, run_id: str, process: ChildProcess) -> bool:
        """The Stop still applies to this process: not resumed meanwhile (new child, STOP file removed)."""
        return self._children.get(run_id) is process.popen and (self.run_dir(run_id) / STOP_FILE).exists()

    def _note_forced(self, run_id: str, sig: signal.Signals) -> None:
        # The child is hung, so nothing else writes status.json now; the note explains the stop to the user.
        grace, run = f"{self.stop_grace:g} s", self.job_kind(run_id) is None
        at = "a step end" if run else "a model call"
        note = (f"It did not stop at {at} within {grace} of Stop, so it was terminated (SIGTERM); "
                if sig == signal.SIGTERM else
                f"It did not stop within {grace} of Stop, nor {self.term_grace:g} s after SIGTERM, so it was killed "
                "(SIGKILL); ")
        after = ("resume continues from its last complete checkpoint." if run else
                 "the units it finished are kept in the cache.")
        write_status(self.run_dir(run_id), stop_note=note + after)

    def wait(self, run_id: str, timeout: float = 600.0) -> dict[str, Any]:
        """Block until the run reaches a final state (for the CLI and tests)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = self.status(run_id)
            if status.get("state") in FINAL_STATES:
                return status
            time.sleep(0.5)
        raise TimeoutError(f"run {run_id} did not finish within {timeout:.0f} s")
