"""The metric sink: progress leaves the trainer only through this callback, as files in the run folder.

- ``metrics.jsonl``: one JSON object per log or eval event, flushed per line, so a reader tailing the file
  (the Train tab) never waits for a buffer and at worst sees a partial last line, which it skips.
- ``status.json``: the run's state (queued, running, completed, failed, stopped, interrupted), replaced
  atomically so a reader never sees half a file.
- ``STOP``: a flag file the UI creates; the callback honours it at the next step end (checkpoint, then stop).
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

METRICS_FILE, STATUS_FILE, STOP_FILE = "metrics.jsonl", "status.json", "STOP"
FINAL_STATES = ("completed", "failed", "stopped", "interrupted")
# A run that logs rarely (large logging_steps, slow steps) still touches status.json this often, so the run
# manager's stall detection (LORA_LAB_STALL_SECONDS, default 600) tells a slow run from a hung one.
HEARTBEAT_SECONDS = 60.0
# Recorded with every pid: a run folder synced back from another machine carries a pid that means nothing here.
HOSTNAME = socket.gethostname()


def write_status(run_dir: str | Path, **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into status.json and write it atomically; returns the new status."""
    path = Path(run_dir) / STATUS_FILE
    status = read_status(run_dir)
    status.update(fields, updated_at=time.time())
    temporary = path.with_suffix(f".tmp{os.getpid()}")
    temporary.write_text(json.dumps(status, indent=1), encoding="utf-8")
    os.replace(temporary, path)
    return status


def read_status(run_dir: str | Path) -> dict[str, Any]:
    try:
        return json.loads((Path(run_dir) / STATUS_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


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


def _finite(value: Any) -> Any:
    """NaN and inf are not JSON; keep them readable as strings rather than crash or lie."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _number(value: Any) -> int | float | None:
    """Plain numbers as they are; numpy / torch scalars as Python floats; anything else (text, lists) None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if not callable(getattr(value, "item", None)):
        return None
    try:
        item = value.item()  # a numpy / torch scalar; a tensor of several values raises
    except (TypeError, ValueError, RuntimeError):
        return None
    return item if isinstance(item, (int, float)) and not isinstance(item, bool) else None


class MetricsCallback(TrainerCallback):
    """Appends log/eval events to metrics.jsonl, keeps status.json current and honours the STOP flag."""

    def __init__(self, run_dir: str | Path, stage: str = "sft"):
        self.run_dir = Path(run_dir)
        self.stage = stage
        self.started = time.time()
        self.last_log_time = self.started
        self.last_log_tokens = 0
        self.start_step = 0
        self.last_eval_step = -1

    # Only the main process writes: under `accelerate launch` every rank runs the callback.
    def _is_writer(self, state: TrainerState) -> bool:
        return state.is_world_process_zero

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        self.started = self.last_log_time = time.time()
        self.last_log_tokens = state.num_input_tokens_seen
        self.start_step = state.global_step
        if self._is_writer(state):
            write_status(self.run_dir, state="running", stage=self.stage, pid=os.getpid(), hostname=HOSTNAME,
                         max_steps=state.max_steps, step=state.global_step, started_at=self.started)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs and "eval_loss" in logs:  # every rank tracks this: they must agree on a final evaluate()
            self.last_eval_step = state.global_step
        if not self._is_writer(state) or not logs:
            return
        now = time.time()
        row: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4),
                               "time": now, "elapsed": round(now - self.started, 2)}
        # Every numeric metric the trainer logs (TRL's rewards/margins, accuracy, eval_* ...), whatever its type.
        row.update({key: _finite(number) for key, number in ((k, _number(v)) for k, v in logs.items())
                    if number is not None and key != "epoch"})
        if "loss" in logs:
            seconds = max(now - self.last_log_time, 1e-9)
            tokens = state.num_input_tokens_seen - self.last_log_tokens
            if tokens > 0:
                row["tokens_per_second"] = round(tokens / seconds, 1)
            self.last_log_time, self.last_log_tokens = now, state.num_input_tokens_seen
        row.update(self._eta(state, now))
        with (self.run_dir / METRICS_FILE).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
        if "eval_loss" in logs:  # the next tokens/s must not count the time spent evaluating
            self.last_log_time = time.time()
        write_status(self.run_dir, step=state.global_step, max_steps=state.max_steps, eta_seconds=row.get("eta"))

    def _eta(self, state: TrainerState, now: float) -> dict[str, float]:
        done = state.global_step - self.start_step
        if done <= 0 or not state.max_steps:
            return {}
        per_step = (now - self.started) / done
        return {"seconds_per_step": round(per_step, 3),
                "eta": round(per_step * max(state.max_steps - state.global_step, 0), 1)}

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        if (self.run_dir / STOP_FILE).exists():
            control.should_save = True
            control.should_training_stop = True
        self._heartbeat(state)

    def _heartbeat(self, state: TrainerState) -> None:
        try:
            quiet = time.time() - (self.run_dir / STATUS_FILE).stat().st_mtime
        except OSError:
            quiet = HEARTBEAT_SECONDS
        if quiet >= HEARTBEAT_SECONDS and self._is_writer(state):
            write_status(self.run_dir, step=state.global_step)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if self._is_writer(state):
            write_status(self.run_dir, step=state.global_step, finished_at=time.time())
