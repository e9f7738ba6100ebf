"""Training children started from a process that has already imported the training libraries.

A fresh ``python -m finetune.train`` spends most of a small CPU run importing torch, transformers, peft,
bitsandbytes and datasets (about 7 of a tiny run's 8 CPU-seconds on a 2-core machine). The fork server imports them
once, then forks one child per run: the child starts where a fresh process would be after its imports, with the
same environment, folder, log and session of its own. Its exit code comes back through the server.

Only where forking is safe: without a CUDA device (a process that has touched CUDA cannot hand it to a forked
child, so on a GPU every run is a fresh process, as before) and for modules named in PRELOADED. A server serves one
environment: the libraries read some variables when they are imported (thread counts, Hub settings), so a child
whose environment differs gets a server of its own. ``LORA_LAB_FORKSERVER=0`` turns it off.

    server = server_for(env)      # None: start a fresh process instead
    child = server.start("finetune.train", [config, "--output-dir", folder], log_path, cwd, env)
    child.pid; child.poll(); child.wait()   # as subprocess.Popen's
"""

from __future__ import annotations

import gc
import json
import os
import select
import subprocess
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

from finetune.core.distributed import same_process

FORKSERVER_ENV = "LORA_LAB_FORKSERVER"
PRELOADED = ("finetune.train",)
# Variables that change from one child to the next and that no library reads at import: a server is not kept per
# value of these (pytest names the current test in one), and each child gets its own values anyway.
PER_CHILD = ("PYTEST_CURRENT_TEST",)
UNKNOWN_EXIT = -1  # the server ended before it could say how a child ended
REAP_SECONDS = 0.2


class ForkedChild:
    """A child of the fork server, with the part of subprocess.Popen's interface the app uses."""

    def __init__(self, server: ForkServer, pid: int) -> None:
        self.server, self.pid, self.returncode = server, pid, None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.server.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self.server.wait_for(self.pid, timeout)
        code = self.poll()
        if code is None:
            raise subprocess.TimeoutExpired(f"forked child {self.pid}", timeout or 0)
        return code


class ForkServer:
    """One server process (``python -m finetune.services.forkserver``) and the thread that reads what it says."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.env, self._lock, self._ended = env, threading.Lock(), threading.Condition()
        self._exits: dict[int, int] = {}
        self._started: list[int] = []
        self.process = subprocess.Popen([sys.executable, "-m", "finetune.services.forkserver", *PRELOADED],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=cwd, env=env,
                                        start_new_session=True, text=True, bufsize=1)
        self.ready = json.loads(self.process.stdout.readline() or '{"ready": false}').get("ready", False)
        if self.ready:
            threading.Thread(target=self._read, name="forkserver-reader", daemon=True).start()
        else:
            self.process.wait()

    def alive(self) -> bool:
        return self.ready and self.process.poll() is None

    def start(self, module: str, args: list[str], log_path: Path, cwd: Path, env: dict[str, str]) -> ForkedChild:
        with self._lock, self._ended:
            self.process.stdin.write(json.dumps({"module": module, "args": args, "log": str(log_path),
                                                 "cwd": str(cwd), "env": env}) + "\n")
            self.process.stdin.flush()
            while not self._started and self.process.poll() is None:
                self._ended.wait(1.0)
            if not self._started:
                raise OSError("the fork server ended before it started the child")
            return ForkedChild(self, self._started.pop(0))

    def exit_code(self, pid: int) -> int | None:
        with self._ended:
            if pid in self._exits:
                return self._exits[pid]
        if self.process.poll() is not None and not same_process(pid):
            return UNKNOWN_EXIT
        return None

    def wait_for(self, pid: int, timeout: float | None) -> None:
        with self._ended:
            self._ended.wait_for(lambda: pid in self._exits or self.process.poll() is not None, timeout)

    def close(self) -> None:
        """No new children; the server ends once those it started have ended (it still reports their exits)."""
        try:
            self.process.stdin.close()
        except OSError:
            pass

    def _read(self) -> None:
        for line in self.process.stdout:
            message = json.loads(line)
            with self._ended:
                if "started" in message:
                    self._started.append(message["started"])
                else:
                    self._exits[message["exited"]] = message["code"]
                self._ended.notify_all()
        self.process.wait()  # ended: reaped, not left a zombie
        with self._ended:
            self._ended.notify_all()


_servers: dict[tuple, ForkServer] = {}
_servers_lock = threading.Lock()


def enabled() -> bool:
    if os.environ.get(FORKSERVER_ENV, "auto") == "0":
        return False
    import torch

    return not torch.cuda.is_available()


def server_for(env: dict[str, str], cwd: Path) -> ForkServer | None:
    """The running server for exactly this environment (one is started on first use), or None where children
    must be fresh processes. A server for another environment is closed: tests change the environment often,
    an app does not."""
    if not enabled():
        return None
    key = tuple(sorted((name, value) for name, value in env.items() if name not in PER_CHILD))
    with _servers_lock:
        server = _servers.get(key)
        if server is not None and server.alive():
            return server
        for old in _servers.values():
            old.close()
        _servers.clear()
        server = ForkServer(env, cwd)
        if not server.alive():
            return None
        _servers[key] = server
        return server


def preloaded_module(command: list[str]) -> tuple[str, list[str]] | None:
    """('finetune.train', its arguments) for ``[sys.executable, -m, finetune.train, ...]``, else None."""
    if len(command) >= 3 and command[0] == sys.executable and command[1] == "-m" and command[2] in PRELOADED:
        return command[2], command[3:]
    return None


# --- the server process ----------------------------------------------------------------------------------------

def _say(out: Any, message: dict[str, Any]) -> None:
    out.write(json.dumps(message) + "\n")
    out.flush()


def _become_child(request: dict[str, Any], session_made: int) -> None:
    """In the forked child: a session of its own (said on ``session_made`` once it exists, as a fresh process
    leads its group before Popen returns), the log as stdout and stderr, then the module as __main__."""
    import runpy
    import signal
    import warnings

    code = 1
    try:
        os.setsid()
        os.write(session_made, b"1")
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.closerange(3, 256)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])  # the server's, but for the per-child variables
        sys.argv = [request["module"], *request["args"]]
        # runpy's warning that the module is imported already: that is the point of the server
        warnings.filterwarnings("ignore", message=".*found in sys.modules after import of package",
                                category=RuntimeWarning)
        try:
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as done:  # sys.exit(n) as a fresh process would end; sys.exit("text") prints it, exit 1
            if done.code is None or isinstance(done.code, int):
                code = done.code or 0
            else:
                print(done.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def _fork_child(request: dict[str, Any]) -> int:
    """Fork the child for ``request`` and return its pid once it leads a session of its own."""
    readable, writable = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(readable)
        _become_child(request, writable)
    os.close(writable)
    os.read(readable, 1)  # empty if the child died before its setsid: then its exit is reported as usual
    os.close(readable)
    return pid


def _reap(out: Any, children: set[int]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        _say(out, {"exited": pid, "code": os.waitstatus_to_exitcode(status)})


def serve(modules: list[str]) -> None:
    """Import ``modules``, say whether that worked, then fork a child for each request read from stdin; report
    each child's exit. Single-threaded on purpose: only the forking thread lives on in a child."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # what the libraries print goes to stderr, never into the replies
    try:
        for module in modules:
            __import__(module)
    except BaseException:
        traceback.print_exc()
        _say(out, {"ready": False})
        return
    # The imported libraries' objects (about 600,000) leave the collector's view: a child's collections (the
    # Trainer asks for a full one as it starts) would walk them all (0.4 s each) and write into every page of the
    # memory the child shares with the server.
    gc.collect()
    gc.freeze()
    _say(out, {"ready": True})
    # Unbuffered, so readline() takes one request and leaves the next in the pipe, where select() sees it.
    requests = os.fdopen(0, "rb", buffering=0)
    children: set[int] = set()
    open_for_requests = True
    while open_for_requests or children:
        if select.select([requests] if open_for_requests else [], [], [], REAP_SECONDS)[0]:
            line = requests.readline()
            if not line:
                open_for_requests = False
            else:
                pid = _fork_child(json.loads(line))
                children.add(pid)
                _say(out, {"started": pid})
        _reap(out, children)


if __name__ == "__main__":
    serve(sys.argv[1:])
