"""Run folders on disk and the run manager that trains in a child process.

Training never runs inside the app's process: a crash, an out-of-memory error or a kill ends the child only,
and the GPU memory goes with it. The child is ``python -m finetune.train runs/<id>/config.yaml --output-dir
runs/<id>`` (an argument list, no shell), its output goes to ``runs/<id>/train.log``.

    manager = RunManager("runs")
    run_id = manager.start(cfg)          # RunInProgressError if one is already training
    manager.stop(run_id)                 # cooperative: checkpoint, status "stopped"; killed if it ignores us
    manager.resume(run_id)               # continues from the last checkpoint
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.config import ConfigError, RunConfig, load_config, save_config
from finetune.metrics import FINAL_STATES, HOSTNAME, STOP_FILE, read_metrics, read_status, write_status
from finetune.train import ADAPTER_DIR, last_checkpoint

LOG_FILE = "train.log"
REWARD_DIR = "reward_model"  # where a reward run saves (finetune/rlhf.py); not a chat adapter
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class RunError(RuntimeError):
    """A run request that cannot be carried out; the message is meant for the user."""


class RunInProgressError(RunError):
    pass


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


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); it is gone for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return True


def is_remote(status: dict[str, Any]) -> bool:
    """True for a run whose status was written on another machine (its folder was synced back here)."""
    return bool(status.get("hostname")) and status["hostname"] != HOSTNAME


def tail(path: Path, lines: int = 30) -> str:
    if not path.is_file():
        return ""
    with path.open("rb") as handle:
        handle.seek(0, os.SEEK_END)
        handle.seek(max(0, handle.tell() - 64 * 1024))
        text = handle.read().decode("utf-8", errors="replace")
    # Progress bars redraw with carriage returns; keep only what a terminal would finally show.
    return "\n".join(line.split("\r")[-1] for line in text.splitlines()[-lines:])


def check_sources(cfg: RunConfig) -> None:
    """Fail before a child starts when the model or data cannot be had (offline Hub, missing or bad file):
    ConfigError names the field, so the form shows the reason at once instead of a failed run later."""
    from finetune.data import DataError, check_file
    from finetune.data import source_kind as data_kind
    from finetune.models import ModelSourceError, require_hub, resolve_source
    from finetune.models import source_kind as model_kind

    problems: dict[str, str] = {}
    try:
        if model_kind(cfg.model.source) == "hub":
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(try_to_load_from_cache(cfg.model.source, "config.json"), str):
                require_hub(cfg.model.source, "model")
        elif model_kind(cfg.model.source) == "local":
            resolve_source(cfg.model.source)
    except ModelSourceError as error:
        problems["model.source"] = str(error)
    try:
        kind = data_kind(cfg.data.source)
        if kind == "file":
            check_file(Path(cfg.data.source).expanduser())
        elif kind == "hub":
            require_hub(cfg.data.source, "dataset")  # probes the Hub itself
    except (DataError, ModelSourceError) as error:
        problems["data.source"] = str(error)
    if problems:
        raise ConfigError(problems)


class RunManager:
    """Starts, stops, resumes and lists runs under one folder; at most one trains at a time."""

    def __init__(self, root: str | Path = "runs", python: str = sys.executable):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.python = python
        self._lock = threading.Lock()
        self._children: dict[str, subprocess.Popen] = {}

    # --- paths --------------------------------------------------------------------------------------------

    def keep_upload(self, path: str) -> str:
        """Copy an upload beside the runs: gradio's temporary copy may vanish while the child still reads it."""
        source = Path(path)
        if not source.is_file() or source.parent == self.root / "uploads":
            return path
        target = self.root / "uploads" / f"{time.strftime('%Y%m%d-%H%M%S')}-{source.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        return str(target)

    def run_dir(self, run_id: str) -> Path:
        """The run's folder; refuses ids that could point outside the runs folder."""
        if not isinstance(run_id, str) or not RUN_ID.match(run_id) or ".." in run_id:
            raise RunError(f"Invalid run id {run_id!r}: use letters, digits, '.', '_' and '-'.")
        folder = (self.root / run_id).resolve()
        if folder.parent != self.root:
            raise RunError(f"Invalid run id {run_id!r}.")
        return folder

    def new_run_id(self, cfg: RunConfig) -> str:
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", cfg.run_name or "run").strip("-.") or "run"
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_id, n = f"{base[:60]}-{stamp}", 1
        while (self.root / run_id).exists():
            n += 1
            run_id = f"{base[:60]}-{stamp}-{n}"
        return run_id

    # --- state --------------------------------------------------------------------------------------------

    def status(self, run_id: str) -> dict[str, Any]:
        """status.json, corrected when the process behind a 'running' run has died without saying so."""
        folder = self.run_dir(run_id)
        status = read_status(folder)
        if is_remote(status):  # trained elsewhere and synced back: only that machine knows if it still runs
            return status
        if status.get("state") in ("running", "queued") and not self._is_alive(run_id, status.get("pid")):
            child = self._children.get(run_id)
            code = child.poll() if child else None
            message = (f"training process ended unexpectedly (exit code {code})" if code is not None
                       else "training process is no longer running (app restarted or process killed)")
            state = "failed" if code is not None else "interrupted"
            status = write_status(folder, state=state, error=status.get("error") or message,
                                  finished_at=time.time())
        return status

    def _is_alive(self, run_id: str, pid: int | None) -> bool:
        child = self._children.get(run_id)
        if child is not None:
            return child.poll() is None
        return _pid_alive(pid)

    def active_run(self) -> str | None:
        """The run training on THIS machine, if any (a synced run from another host does not hold the device)."""
        for run_id in self.list_ids():
            status = self.status(run_id)
            if status.get("state") in ("running", "queued") and not is_remote(status):
                return run_id
        return None

    def list_ids(self) -> list[str]:
        folders = [p for p in self.root.iterdir() if p.is_dir() and (p / "status.json").is_file()]
        return [p.name for p in sorted(folders, key=lambda p: p.stat().st_mtime, reverse=True)]

    def summary(self, run_id: str) -> RunSummary:
        folder = self.run_dir(run_id)
        status = self.status(run_id)
        try:
            cfg: RunConfig | None = load_config(folder / "config.yaml")
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
                          (folder / ADAPTER_DIR / "adapter_config.json").is_file())

    def list_runs(self) -> list[RunSummary]:
        return [self.summary(run_id) for run_id in self.list_ids()]

    def finished_adapters(self) -> dict[str, Path]:
        """run id -> adapter folder, for every run that saved one: SFT, DPO and KTO runs. A reward run saves
        under reward_model/ instead, so it never shows up as something to chat with."""
        return {run_id: self.run_dir(run_id) / ADAPTER_DIR for run_id in self.list_ids()
                if (self.run_dir(run_id) / ADAPTER_DIR / "adapter_config.json").is_file()}

    def reward_models(self) -> dict[str, Path]:
        """run id -> reward model folder, for every finished reward run (they score answers, they do not chat)."""
        return {run_id: self.run_dir(run_id) / REWARD_DIR for run_id in self.list_ids()
                if (self.run_dir(run_id) / REWARD_DIR / "adapter_config.json").is_file()}

    def log_tail(self, run_id: str, lines: int = 30) -> str:
        return tail(self.run_dir(run_id) / LOG_FILE, lines)

    # --- actions ------------------------------------------------------------------------------------------

    def start(self, cfg: RunConfig, run_id: str | None = None) -> str:
        with self._lock:
            self._refuse_if_busy()
            run_id = run_id or self.new_run_id(cfg)
            folder = self.run_dir(run_id)
            folder.mkdir(parents=True, exist_ok=True)
            save_config(cfg, folder / "config.yaml")
            write_status(folder, state="queued", created_at=time.time(), step=0, error=None)
            self._spawn(run_id, resume=False)
        return run_id

    def resume(self, run_id: str) -> str:
        with self._lock:
            folder = self.run_dir(run_id)
            status = self.status(run_id)
            if status.get("state") not in ("stopped", "failed", "interrupted"):
                raise RunError(f"Run {run_id} is {status.get('state', 'unknown')}; only stopped, failed or "
                               "interrupted runs can be resumed.")
            if last_checkpoint(folder) is None:
                raise RunError(f"Run {run_id} saved no checkpoint yet, so there is nothing to resume from.")
            self._refuse_if_busy()
            (folder / STOP_FILE).unlink(missing_ok=True)
            write_status(folder, state="queued", error=None, finished_at=None)
            self._spawn(run_id, resume=True)
        return run_id

    def _refuse_if_busy(self) -> None:
        busy = self.active_run()
        if busy is not None:
            raise RunInProgressError(f"Run '{busy}' is still training; wait for it to finish or stop it first "
                                     "(one training job at a time per device).")

    def _spawn(self, run_id: str, resume: bool) -> None:
        folder = self.run_dir(run_id)
        command = [self.python, "-m", "finetune.train", str(folder / "config.yaml"), "--output-dir", str(folder)]
        if resume:
            command.append("--resume")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
        with (folder / LOG_FILE).open("ab") as log:
            child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=PROJECT_ROOT, env=env, start_new_session=True)
        self._children[run_id] = child
        write_status(folder, pid=child.pid, hostname=HOSTNAME)

    def stop(self, run_id: str, grace_seconds: float = 60.0) -> dict[str, Any]:
        """Ask the run to stop at its next step (it saves a checkpoint); kill it if it has not within the grace."""
        folder = self.run_dir(run_id)
        status = self.status(run_id)
        if status.get("state") not in ("running", "queued"):
            return status
        (folder / STOP_FILE).touch()
        deadline = time.time() + grace_seconds
        while time.time() < deadline:
            if not self._is_alive(run_id, status.get("pid")):
                break
            time.sleep(0.2)
        else:
            self._kill(run_id, status.get("pid"))
        status = read_status(folder)
        if status.get("state") not in FINAL_STATES:
            status = write_status(folder, state="stopped", finished_at=time.time())
        return status

    def request_stop(self, run_id: str) -> None:
        """Non-blocking stop: set the flag and return (the UI polls the status)."""
        (self.run_dir(run_id) / STOP_FILE).touch()

    def _kill(self, run_id: str, pid: int | None) -> None:
        child = self._children.get(run_id)
        target = child.pid if child else pid
        if not target:
            return
        try:
            os.killpg(target, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if child:
            child.wait(timeout=10)

    def wait(self, run_id: str, timeout: float = 600.0) -> dict[str, Any]:
        """Block until the run reaches a final state (for the CLI and tests)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = self.status(run_id)
            if status.get("state") in FINAL_STATES:
                return status
            time.sleep(0.5)
        raise TimeoutError(f"run {run_id} did not finish within {timeout:.0f} s")
