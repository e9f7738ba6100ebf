"""The run folder's layout, spelled in one place: every file and sub-folder name of a run and of the runs folder,
the run-id pattern, the last complete checkpoint, run_info.json, and "does this folder hold a trained adapter".

    runs/<id>/config.yaml            the run's config (the child process reads it)
             status.json             the run's state (written by finetune/core/metrics.py); it makes a folder a run
             metrics.jsonl           one JSON line per log or evaluation event
             STOP                    written by Stop: the training callback saves and ends at the next step
             train.log               the child's stdout and stderr
             run_info.json           what the run measured and chose (hardware, recipe, rows, peak memory ...)
             compare_prompt.txt      a comparison trial's prompt: the run ends with a greedy sample answer to it
             accelerate.yaml, ranks/rank-N.json   a multi-process run's launch config and its ranks' records
             tensorboard/            TensorBoard event files
             checkpoints/checkpoint-N/
             adapter/                the result of SFT, DPO, KTO and GRPO (PEFT format, plus CONFIG_COPY)
             model/                  the result of a full fine-tune (every weight)
             reward_model/           the result of a reward run (scores answers; never a chat adapter)
             initial_adapter/        a PiSSA/OLoRA run's start
             merged/, export/ (export/gguf/)   what the Export tab writes
    runs/uploads/, comparisons/, sweeps/, feedback.db, feedback-exports/, .queue.lock   beside the runs

A basic module: it imports nothing of the project, so every layer may use it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from pathlib import Path
from typing import Any

# The run manager's ids: one folder name, no separators (a run id never reaches outside the runs folder).
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")

# In a run folder.
RUN_CONFIG = "config.yaml"
STATUS_FILE = "status.json"        # its presence is what makes a folder a run
METRICS_FILE = "metrics.jsonl"
STOP_FILE = "STOP"
LOG_FILE = "train.log"
RUN_INFO_FILE = "run_info.json"
PROMPT_FILE = "compare_prompt.txt"  # a run folder holding it gets a greedy sample answer at the end of training
HELD_OUT_ANSWERS = "held_out_answers.json"  # a rule-rewarded GRPO run's greedy held-out answers, before and after
ACCELERATE_CONFIG = "accelerate.yaml"  # a multi-process run's generated launch config
RANKS_DIR = "ranks"                # ranks/rank-N.json: each process's pid and, if it failed, its error
RANK_RECORD = "rank-{rank}.json"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"  # checkpoints/checkpoint-N/ (the Trainer's own name for the checkpoint of step N)
TRAINER_STATE = "trainer_state.json"  # the Trainer writes it last into a checkpoint
ADAPTER_DIR = "adapter"
FULL_MODEL_DIR = "model"           # a full fine-tune saves the whole model here instead of an adapter
REWARD_DIR = "reward_model"        # where a reward run saves; not a chat adapter
CONFIG_COPY = "lora_lab_config.yaml"  # the run's config, saved beside its adapter / reward model
ADAPTER_CONFIG = "adapter_config.json"  # peft writes it into every adapter folder
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # and the adapter's weights beside it
MODEL_CONFIG = "config.json"         # transformers' config of a saved (merged or full) model
INITIAL_ADAPTER_DIR = "initial_adapter"  # a PiSSA/OLoRA run's start, to convert its result into a plain LoRA
MERGED_DIR = "merged"                # the Export tab's merged model
MERGE_INFO = "lora_lab_merge.json"   # in a merged folder: what it was merged into
EXPORT_DIR = "export"                # zips and GGUF files the Export tab writes
GGUF_DIR = "gguf"                    # export/gguf/: the GGUF files and their Modelfiles
TRACKER_DIRS = {"trackio": "trackio", "mlflow": "mlruns", "wandb": "wandb"}  # <runs root>/<name>: trackers' stores
TAKE_HOME_DIR = "take_home"          # export/take_home/: the run as a notebook and a script (Show the code)
BUILDING_MARKER = ".building"        # held in a folder an export is still writing: pruning leaves it alone
PARTIAL_SUFFIX = ".partial"          # a file (or folder) being written, renamed when complete

# Beside the runs, in the runs folder.
UPLOADS_DIR = "uploads"            # visitors' uploaded data files, copied in before a run starts
QUEUE_LOCK_FILE = ".queue.lock"    # the device queue's cross-process lock
COMPARE_DIR = "comparisons"
SWEEP_DIR = "sweeps"
FEEDBACK_DB = "feedback.db"
FEEDBACK_EXPORTS_DIR = "feedback-exports"


def is_run_id(text: str) -> bool:
    """Whether ``text`` names a run folder directly under the runs folder (and nothing outside it)."""
    return isinstance(text, str) and bool(RUN_ID.match(text)) and ".." not in text


def run_id_stem(name: str) -> str:
    """A run name made fit to begin a run id: each run of other characters becomes '-', at most 60 of them."""
    return (re.sub(r"[^A-Za-z0-9._-]+", "-", name or "run").strip("-.") or "run")[:60]


def rank_record(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / RANKS_DIR / RANK_RECORD.format(rank=rank)


def rank_records(run_dir: Path) -> list[Path]:
    return sorted((Path(run_dir) / RANKS_DIR).glob(RANK_RECORD.format(rank="*")))


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of each checkpoint folder of a run, complete or not, in step order."""
    found = [(p.name.removeprefix(CHECKPOINT_PREFIX), p) for p in (Path(run_dir) / CHECKPOINT_DIR).glob(
        CHECKPOINT_PREFIX + "*")]
    return sorted((int(step), folder) for step, folder in found if step.isdigit())


_log = logging.getLogger(__name__)
_ODD_ENTRIES_LOGGED: set[tuple[str, str]] = set()


def run_folders(runs_root: Path) -> list[Path]:
    """The run folders directly under ``runs_root``: real folders (not symlinks) with a run id for a name and a
    readable status.json. Anything else there (a symlink, a stray file, a folder the app cannot read, a name
    that is no run id) is skipped and logged once, so one odd entry never breaks a listing for everyone."""
    root = Path(runs_root)
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return []
    except OSError as error:
        _log_once(root, f"the runs folder cannot be listed ({error.strerror or error})")
        return []
    folders = []
    for entry in entries:
        why = _not_a_run(entry)
        if why is None:
            folders.append(Path(entry.path))
        elif why:
            _log_once(Path(entry.path), why)
    return folders


def _not_a_run(entry: os.DirEntry) -> str | None:
    """Why ``entry`` is skipped ('' for the app's own files and folders, which say nothing odd), or None."""
    try:
        if entry.is_symlink():
            return "a symbolic link, not a run folder"
        if not entry.is_dir(follow_symlinks=False):
            return "" if entry.name.startswith(".") or entry.is_file(follow_symlinks=False) else "not a folder"
        if not is_run_id(entry.name):
            return "" if entry.name.startswith(".") else "its name is not a run id"
        status = os.stat(os.path.join(entry.path, STATUS_FILE), follow_symlinks=False)
    except FileNotFoundError:
        return ""  # uploads/, a comparison's folder, a run being created: not a run (yet)
    except OSError as error:
        return f"it cannot be read ({error.strerror or error})"
    if not stat.S_ISREG(status.st_mode):
        return "its status.json is not a plain file"
    if not os.access(entry.path, os.R_OK | os.X_OK) or not os.access(os.path.join(entry.path, STATUS_FILE), os.R_OK):
        return "it cannot be read (permission denied)"
    return None


def _log_once(path: Path, why: str) -> None:
    key = (str(path), why)
    if key not in _ODD_ENTRIES_LOGGED:
        _ODD_ENTRIES_LOGGED.add(key)
        _log.warning("Skipping %s in the runs folder: %s.", path.name, why)


def has_adapter(folder: Path) -> bool:
    """Whether ``folder`` holds a saved PEFT adapter (a chat adapter, a reward model or a checkpoint)."""
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def adapter_config(folder: Path) -> dict[str, Any]:
    """The adapter's own adapter_config.json (peft type, rank, target modules, the base it trained against)."""
    return json.loads((Path(folder) / ADAPTER_CONFIG).read_text(encoding="utf-8"))


def last_checkpoint(run_dir: Path) -> str | None:
    """The newest complete checkpoint of a run, or None."""
    # The Trainer writes trainer_state.json last: a checkpoint without it was cut short (disk full, kill
    # mid-save) and must not be resumed from; fall back to the newest complete one.
    complete = [folder for _, folder in checkpoints(run_dir) if (folder / TRAINER_STATE).is_file()]
    return str(complete[-1]) if complete else None


def read_run_info(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / RUN_INFO_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def memory_records(runs_root: Path, device: str = "cpu", limit: int = 20) -> list[tuple[float, float]]:
    """(formula GB, measured peak GB) of the newest finished runs on ``device`` under ``runs_root`` that recorded
    both: what the Train tab's memory estimate is calibrated on."""
    infos = [folder / RUN_INFO_FILE for folder in run_folders(runs_root) if (folder / RUN_INFO_FILE).is_file()]
    records = []
    for path in sorted(infos, key=modified_time, reverse=True):
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        formula, peak = info.get("memory_formula_gb"), info.get("peak_memory_mb")
        if info.get("memory_device") == device and isinstance(formula, (int, float)) \
                and isinstance(peak, (int, float)) and info.get("world_size", 1) == 1:
            records.append((float(formula), float(peak) / 1024))
        if len(records) >= limit:
            break
    return records


def modified_time(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # removed meanwhile: last
        return 0.0


def write_run_info(run_dir: Path, **info: Any) -> None:
    """Merge ``info`` into run_info.json (each stage adds what it knows when it knows it)."""
    current = read_run_info(run_dir)
    current.update(info)
    (Path(run_dir) / RUN_INFO_FILE).write_text(json.dumps(current, indent=1, default=str), encoding="utf-8")
