"""The run's state on disk, the protocol between a training child and the app: ``status.json`` (queued, running,
completed, failed, stopped, interrupted; waiting in the device queue), merged and replaced atomically so a reader
never sees half a file, with the pid and host that stand for the run; and reading ``metrics.jsonl``, where a line
still being written is skipped. The child writes both through the metric sink (finetune/core/metrics.py); the run
manager, the queue and every view read them here, without importing the trainer's libraries."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from finetune.core.run_folder import METRICS_FILE, STATUS_FILE

FINAL_STATES = ("completed", "failed", "stopped", "interrupted", "cancelled")
WAITING = "waiting"  # in the device queue behind another job: nothing started yet ("queued" while it starts)
# Recorded with every pid: a run folder synced back from another machine carries a pid that means nothing here.
HOSTNAME = socket.gethostname()
# Set by finetune.core.distributed's launcher for the ranks of a multi-process run: the pid status.json must
# carry is the launcher's (the process the run manager watches and signals), not rank 0's.
LAUNCHER_PID_ENV = "LORA_LAB_LAUNCHER_PID"


def is_remote(status: dict[str, Any]) -> bool:
    """True for a job whose status was written on another machine (its folder was synced back here)."""
    return bool(status.get("hostname")) and status["hostname"] != HOSTNAME


def run_pid() -> int:
    """The pid that stands for this run in status.json."""
    return int(os.environ.get(LAUNCHER_PID_ENV) or os.getpid())


_STATUS_WRITES = threading.RLock()
_log = logging.getLogger(__name__)


def write_status(run_dir: str | Path, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into status.json and write it atomically; returns the new status. Threads of one process
    (the stop escalation, a page's poll settling the run, the queue) take turns, so neither loses the other's
    fields nor its temporary file."""
    path = Path(run_dir) / STATUS_FILE
    with _STATUS_WRITES:
        status = read_status(run_dir)
        status.update(fields, updated_at=time.time())
        temporary = path.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")
        try:
            temporary.write_text(json.dumps(status, indent=1), encoding="utf-8")
            os.replace(temporary, path)
        except OSError as error:  # a full disk (or a removed folder) must not raise into a view or a watcher
            _unlink_quietly(temporary)
            _log.warning("Could not write %s (%s); the previous status stays on disk.", path,
                         error.strerror or error)
            status["unsaved"] = error.strerror or str(error)
    return status


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def read_status(run_dir: str | Path) -> dict[str, Any]:
    try:
        status = json.loads((Path(run_dir) / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, unreadable, half-written or not UTF-8: no state to report
        return {}
    return status if isinstance(status, dict) else {}


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All complete JSON lines of metrics.jsonl; a line still being written is skipped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
