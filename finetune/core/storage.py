"""The disk under the runs folder: how much is used, a budget that pruning keeps, and free-space checks.

On a Space the runs folder sits on persistent storage of a fixed size (20 GB for "small"), and every run leaves
checkpoints, merged models and export files behind. Two operator settings keep it from filling up:

    LORA_LAB_STORAGE_BUDGET  the most the runs folder may hold, e.g. "15GB" (default: 15 GB on a Space's /data,
                             none elsewhere; "0" = none)
    LORA_LAB_MIN_FREE        free space a run, merge or export must leave on the disk (default "1GB")

Pruning removes only what a run does not need to be used, oldest first: the checkpoints of completed runs (their
adapter is saved apart; the Evaluate tab's answers per checkpoint are then gone for that run), merged models and
export files (the Export tab makes them again), never one an export is still writing. Adapters, reward models,
full fine-tunes, the feedback database and anything of a run still training or resumable are never pruned: only
their owner's Delete removes them.

Basic module: it imports only basic modules.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from finetune.core.run_folder import (BUILDING_MARKER, CHECKPOINT_DIR, EXPORT_DIR, MERGED_DIR, PARTIAL_SUFFIX,
                                      run_folders)
from finetune.core.run_status import read_status

BUDGET_ENV = "LORA_LAB_STORAGE_BUDGET"
MIN_FREE_ENV = "LORA_LAB_MIN_FREE"
SPACE_STORAGE = Path("/data")
SPACE_BUDGET = 15 * 1024 ** 3  # of the 20 GB "small" persistent storage: room for the model caches beside
REBUILDABLE = ((CHECKPOINT_DIR, "checkpoints"), (MERGED_DIR, "merged model"), (EXPORT_DIR, "export files"))
UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1024 ** 2, "mb": 1024 ** 2, "g": 1024 ** 3, "gb": 1024 ** 3,
         "t": 1024 ** 4, "tb": 1024 ** 4}


class DiskFull(RuntimeError):
    """Not enough free disk for what was asked; the message says how much and what to do."""


# The training child's exit code when the disk filled up (errno ENOSPC): the run manager reads the cause from it,
# since a full disk may also have kept the child from writing its own status.
DISK_FULL_EXIT = errno.ENOSPC
WHAT_TO_DELETE = ("delete runs you no longer need (Train tab, run history: Delete), or the merged models and "
                  "export files of old runs (Export tab builds them again)")


def is_disk_full(error: BaseException) -> bool:
    """An OSError of a full disk (or a full quota), wherever it was raised."""
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full_message(what: str, then: str = "try again") -> str:
    """The one sentence every disk-full failure gives: what was being written and what to delete."""
    return f"Disk full while {what}: {WHAT_TO_DELETE}, then {then}."


def parse_size(text: str, setting: str) -> int:
    """'15GB', '500mb', '1.5g' or a byte count; ValueError naming the setting otherwise."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text or "")
    if not match or match.group(2).lower() not in UNITS:
        raise ValueError(f"{setting} must be a size such as '15GB' or '500MB', got {text!r}")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


def human(size: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if abs(size) < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def budget_bytes(root: Path) -> int | None:
    """The operator's storage budget for the runs folder; None = no budget."""
    raw = os.environ.get(BUDGET_ENV, "").strip()
    if raw:
        return None if raw.lower() in ("0", "none", "off") else parse_size(raw, BUDGET_ENV)
    on_space_storage = os.environ.get("SPACE_ID") and SPACE_STORAGE in Path(root).resolve().parents
    return SPACE_BUDGET if on_space_storage else None


def min_free_bytes() -> int:
    return parse_size(os.environ.get(MIN_FREE_ENV, "").strip() or "1GB", MIN_FREE_ENV)


def folder_bytes(path: Path) -> int:
    """Bytes of every file under ``path`` (links not followed); 0 for a missing path."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += (Path(folder) / name).lstat().st_size
            except OSError:  # removed while we counted
                pass
    return total


def free_bytes(path: Path) -> int:
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def require_free(path: Path, needed: int, what: str) -> None:
    """DiskFull unless ``what`` (about ``needed`` bytes) fits and still leaves the minimum free."""
    free, keep = free_bytes(path), min_free_bytes()
    if free - needed < keep:
        need = f"about {human(needed)} plus " if needed else ""
        raise DiskFull(f"Not enough free disk to {what}: {human(free)} free, and it needs {need}the {human(keep)} "
                       f"kept free ({MIN_FREE_ENV}). Delete runs you no longer need (Train tab, run history), "
                       "or ask the operator for more storage.")


@dataclass(frozen=True)
class Prunable:
    """Something pruning may remove: what it is, whose run, how big, how old."""

    path: Path
    kind: str
    run_id: str
    size: int
    modified: float


def prunable(root: Path) -> list[Prunable]:
    """What can be rebuilt, oldest first: checkpoints of completed runs, merged models, export files."""
    found = []
    for run in run_folders(Path(root)):
        state = read_status(run).get("state")
        for name, kind in REBUILDABLE:
            path = run / name
            # A stopped or failed run resumes from its checkpoints; a live one is writing them.
            if not path.exists() or (name == CHECKPOINT_DIR and state != "completed"):
                continue
            if name != CHECKPOINT_DIR and (state in ("running", "queued") or _being_written(path)):
                continue
            found.append(Prunable(path, kind, run.name, folder_bytes(path), path.stat().st_mtime))
    return sorted(found, key=lambda item: item.modified)


def _being_written(path: Path) -> bool:
    """A merge writes ``merged.partial`` beside its folder, a zip a ``.partial`` file, a GGUF build holds a
    ``.building`` lock: pruning leaves such a folder to the export still writing it."""
    if path.with_name(path.name + PARTIAL_SUFFIX).exists():
        return True
    return any(part.name == BUILDING_MARKER or part.suffix == PARTIAL_SUFFIX for part in path.rglob("*"))


@dataclass(frozen=True)
class Usage:
    used: int
    budget: int | None
    free: int

    def text(self) -> str:
        budget = f" of the {human(self.budget)} budget" if self.budget else ""
        return f"Runs use {human(self.used)}{budget}; {human(self.free)} free on the disk."


def usage(root: Path) -> Usage:
    return Usage(folder_bytes(Path(root)), budget_bytes(Path(root)), free_bytes(Path(root)))


def enforce_budget(root: Path, budget: int | None = None) -> list[Prunable]:
    """Remove rebuildable things, oldest first, until the runs folder fits its budget; returns what went."""
    budget = budget if budget is not None else budget_bytes(Path(root))
    if budget is None:
        return []
    used, removed = folder_bytes(Path(root)), []
    for item in prunable(Path(root)):
        if used <= budget:
            break
        shutil.rmtree(item.path, ignore_errors=True)
        used -= item.size
        removed.append(item)
    return removed
