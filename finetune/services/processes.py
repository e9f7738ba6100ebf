"""The app's child processes, whatever job they run: start one in a session of its own with its output in a log,
reap it the moment it ends, tell whether a pid from disk is still that child, and end it by escalation (a polite
request first, then SIGTERM, then SIGKILL to its whole process group). Nothing here knows what a run or a queue is:
finetune/services/runs.py gives these their meaning for training runs.

    child = spawn([sys.executable, "-m", "finetune.train", ...], folder / LOG_FILE)
    reap_in_background(child, "reap-my-run", on_end)
    ChildProcess(None, pid, started).alive()   # after an app restart, from the pid and start time on disk
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from finetune.core.distributed import process_start
from finetune.core.paths import PROJECT_ROOT
from finetune.services.forkserver import ForkedChild, preloaded_module, server_for

POLL_SECONDS = 0.2  # how often the stop escalation looks at the child
KILL_WAIT_SECONDS = 30.0  # a SIGKILLed process group is gone at once; this only bounds a stuck kernel


def pid_alive(pid: int | None) -> bool:
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


@dataclass
class ChildProcess:
    """One child: the Popen when this app started it, else only its pid and start time from disk."""
    popen: subprocess.Popen | ForkedChild | None
    pid: int | None
    started: str | None = None

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        if self.started is not None and process_start(self.pid or 0) not in (None, self.started):
            return False  # the pid now belongs to a later process (the machine restarted, pids came round)
        return pid_alive(self.pid)

    def exit_code(self) -> int | None:
        return self.popen.poll() if self.popen is not None else None

    def signal_group(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the child's process group, but only while that group is still the child's: after an
        app restart the pid on disk could by now belong to an unrelated process."""
        if not self.pid:
            return
        if self.popen is None:
            if self.started is not None and process_start(self.pid) != self.started:
                return
            try:
                if os.getpgid(self.pid) != self.pid:  # not a group leader: not a child we started
                    return
            except ProcessLookupError:
                return
        try:
            os.killpg(self.pid, sig)  # the child leads its own session, so its group id is its pid
        except (ProcessLookupError, PermissionError):
            pass

    def wait_for_exit(self, deadline: float) -> bool:
        """True once the process has ended; False if it is still there at the deadline."""
        while self.alive():
            if time.time() >= deadline:
                return False
            time.sleep(POLL_SECONDS)
        return True


def tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a child's log (its last 64 KB), as a terminal would show them."""
    if not path.is_file():
        return ""
    with path.open("rb") as handle:
        handle.seek(0, os.SEEK_END)
        handle.seek(max(0, handle.tell() - 64 * 1024))
        text = handle.read().decode("utf-8", errors="replace")
    # Progress bars redraw with carriage returns; keep only what a terminal would finally show.
    return "\n".join(line.split("\r")[-1] for line in text.splitlines()[-lines:])


def spawn(command: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen | ForkedChild:
    """Start ``command`` (an argument list, no shell) in the checkout, its stdout and stderr appended to
    ``log_path``. Its own session makes the child lead a process group: Stop can end it and everything it started.
    ``python -m finetune.train`` on a machine without CUDA is forked from a server that has its libraries imported
    already (finetune/services/forkserver.py); whatever else is a fresh process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    preloaded = preloaded_module(command)
    server = server_for(env, PROJECT_ROOT) if preloaded else None
    if server is not None:
        return server.start(*preloaded, log_path=Path(log_path), cwd=PROJECT_ROOT, env=env)
    with Path(log_path).open("ab") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=PROJECT_ROOT, env=env, start_new_session=True)


def reap_in_background(child: subprocess.Popen | ForkedChild, name: str, on_end: Callable[[], None]) -> None:
    """Wait for ``child`` on a thread of its own and call ``on_end`` the moment it ends: no zombie is left until
    the app exits, and how it ended is recorded at once."""
    def reap() -> None:
        child.wait()
        on_end()

    threading.Thread(target=reap, name=name, daemon=True).start()


def escalate_stop(process: ChildProcess, asked_at: float, stop_grace: float, term_grace: float,
                  still_stopping: Callable[[], bool], forced: Callable[[signal.Signals], None],
                  after_kill: Callable[[], object] = lambda: None) -> bool:
    """End ``process``, politely asked at ``asked_at`` (a STOP file it honours): SIGTERM to its process group
    ``stop_grace`` seconds after the request, SIGKILL ``term_grace`` seconds after that. ``forced`` hears each
    signal before it is sent (to tell the user why); ``after_kill`` ends what the group's kill cannot reach.
    Returns False when the stop no longer applies (``still_stopping`` says no: resumed meanwhile), else True
    once the process has ended (or the kill's wait ran out)."""
    if process.wait_for_exit(asked_at + stop_grace):
        return True
    if not still_stopping():
        return False
    forced(signal.SIGTERM)
    # SIGCONT after SIGTERM: a stopped (SIGSTOP) process only acts on the termination once it runs again.
    process.signal_group(signal.SIGTERM)
    process.signal_group(signal.SIGCONT)
    if not process.wait_for_exit(time.time() + term_grace) and still_stopping():
        forced(signal.SIGKILL)
        process.signal_group(signal.SIGKILL)
        after_kill()
        process.wait_for_exit(time.time() + KILL_WAIT_SECONDS)
    return True
