"""Benchmarks in the one device queue: a benchmark waits behind a training run and a run behind a benchmark, each
shows its place, Stop takes a waiting benchmark out of the queue and ends a running one through the queue's own
escalation, and a benchmark whose child died with the app is shown as such after a restart.

Real parts: the real RunManager and its queue, real child processes, the real harness child where a benchmark
runs. Every order is certain by construction: the job that holds the device waits on a gate file the test creates
(a run's child script waits for it; a benchmark's child is started behind a small gate script that then execs the
real benchmark child in the same process), so nothing depends on how fast this machine is.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from helpers import ROOT, tiny_run_config, wait_until
from finetune.core.run_status import read_status
from finetune.services.benchmarks import BUNDLED_TASK, BenchmarkService
from finetune.services.processes import ChildProcess, pid_alive
from finetune.services.runs import RunManager

# Waits for its gate file, then becomes the command after it (same pid, same process group).
GATE = """
import os, sys, time
from pathlib import Path

while not Path(sys.argv[1]).exists():
    time.sleep(0.05)
os.execv(sys.argv[2], sys.argv[2:])
"""

# A training run's stand-in child: running at once, completed once its gate file exists.
RUN_CHILD = """
import json, os, sys, time
from pathlib import Path

folder, gate = Path(sys.argv[1]), Path(sys.argv[2])


def write_status(**fields):  # finetune.core.run_status.write_status's contract
    status = json.loads((folder / "status.json").read_text())
    status.update(fields, updated_at=time.time())
    (folder / "status.tmp").write_text(json.dumps(status))
    os.replace(folder / "status.tmp", folder / "status.json")


write_status(state="running", started_at=time.time())
while not gate.exists():
    time.sleep(0.05)
write_status(state="completed", finished_at=time.time())
"""

# The app as a process of its own: it queues two benchmarks (the first held at its gate) and runs until killed.
APP = """
import signal, sys
from pathlib import Path

from finetune.services.benchmarks import BUNDLED_TASK, BenchmarkService
from finetune.services.runs import RunManager

runs, bench, gate_script, gate, model = sys.argv[1:6]


class Gated(BenchmarkService):
    def _child_command(self, folder):
        return [sys.executable, gate_script, gate] + super()._child_command(folder)


service = Gated(runs, bench, RunManager(runs))
plan = service.plan([BUNDLED_TASK], 10, model=model, bits=32)
print(service.start(plan), service.start(plan), flush=True)
signal.pause()
"""


class GatedRuns(RunManager):
    """The real RunManager whose training child is RUN_CHILD, held until ``gate`` exists."""

    def __init__(self, root: Path, gate: Path, **times: float):
        self.gate = gate
        super().__init__(root, **times)

    def child_command(self, run_id: str, resume: bool) -> list[str]:
        return [self.python, str(self.root.parent / "run_child.py"), str(self.run_dir(run_id)), str(self.gate)]


class GatedBenchmarks(BenchmarkService):
    """The real BenchmarkService whose real child starts only once ``gate`` exists."""

    def __init__(self, runs_root: Path, manager: RunManager, gate: Path):
        self.gate = gate  # first: registering the job kind may start a waiting job at once
        super().__init__(runs_root, runs_root.parent / "bench", manager)

    def _child_command(self, folder: Path) -> list[str]:
        return [self.manager.python, str(self.runs_root.parent / "gate.py"), str(self.gate)] + \
            super()._child_command(folder)


@pytest.fixture
def runs(tmp_path) -> Iterator[Path]:
    (tmp_path / "gate.py").write_text(GATE)
    (tmp_path / "run_child.py").write_text(RUN_CHILD)
    yield tmp_path / "runs"
    # A test that failed may leave a child at its gate: end every child this test's jobs recorded.
    for status in [*(tmp_path / "runs").glob("*/status.json"), *(tmp_path / "bench").glob("jobs/*/status.json")]:
        recorded = read_status(status.parent)
        if recorded.get("pid") and recorded.get("pid_start"):  # only while the pid is still that child's group
            ChildProcess(None, recorded["pid"], recorded["pid_start"]).signal_group(signal.SIGKILL)


def ended(service: BenchmarkService, job_id: str) -> dict:
    """The job's final status once its child is gone too."""
    wait_until(lambda: not service.running(job_id), f"benchmark {job_id} and its child ended", timeout=900)
    return service.status(job_id)


def log_of(service: BenchmarkService, job_id: str) -> str:
    log = service.job(job_id).folder / "benchmark.log"
    return log.read_text()[-3000:] if log.is_file() else "(no log)"


def test_a_benchmark_waits_behind_a_training_run_and_shows_its_place(runs, tiny_model_dir, qa_file):
    from components.benchmark_section import poll_benchmark, stop_benchmark

    manager = GatedRuns(runs, runs.parent / "run-gate")
    run_id = manager.start(tiny_run_config(tiny_model_dir, qa_file))
    wait_until(lambda: manager.status(run_id)["state"] == "running", "the training run holds the device")
    service = BenchmarkService(runs, runs.parent / "bench", manager)
    plan = service.plan([BUNDLED_TASK], 10, model=str(tiny_model_dir), bits=32)
    first, second = service.start(plan), service.start(plan)

    assert service.status(first)["state"] == "waiting" and "pid" not in read_status(service.job(first).folder)
    assert f"**waiting**: 2nd in line behind run `{run_id}`" in poll_benchmark(service, first)[0]
    assert f"3rd in line behind run `{run_id}` and benchmark `{first}`" in poll_benchmark(service, second)[0]
    # Stop on a waiting benchmark: out of the queue, and it never started.
    assert stop_benchmark(service, second) == f"Took {second} out of the queue; it never started."
    assert service.status(second)["state"] == "cancelled" and not service.running(second)
    assert not (service.job(second).folder / "benchmark.log").exists()

    (runs.parent / "run-gate").touch()  # the run ends: the benchmark takes the device
    status = ended(service, first)
    assert status["state"] == "completed", log_of(service, first)
    assert status["dequeued_at"] >= manager.status(run_id)["finished_at"]
    assert "completed" in poll_benchmark(service, first)[0] and not poll_benchmark(service, first)[2].empty
    assert service.status(second)["state"] == "cancelled"  # a cancelled job stays out of the queue


def test_a_run_waits_behind_a_running_benchmark_whose_stop_ends_it_at_a_model_call(runs, tiny_model_dir, qa_file):
    from components.benchmark_section import stop_benchmark
    from components.shared import live_status, queue_text

    run_gate, bench_gate = runs.parent / "run-gate", runs.parent / "bench-gate"
    run_gate.touch()  # the run finishes as soon as it starts: only the queue holds it back
    manager = GatedRuns(runs, run_gate)
    service = GatedBenchmarks(runs, manager, bench_gate)
    job_id = service.start(service.plan([BUNDLED_TASK], 10, model=str(tiny_model_dir), bits=32))
    wait_until(lambda: read_status(service.job(job_id).folder).get("pid"), "the benchmark's child started")
    assert manager.active_job() == job_id and manager.active_run() is None

    run_id = manager.start(tiny_run_config(tiny_model_dir, qa_file))
    waiting = live_status(manager, run_id)
    assert waiting["state"] == "waiting" and waiting["ahead"] == [job_id] and waiting["position"] == 1
    assert "<b>waiting</b> in the queue · position 1" in queue_text(waiting)

    # Stop on a running benchmark: the STOP file, which the real child reads before its first model call.
    assert stop_benchmark(service, job_id) == f"Stopping {job_id} at its next model call."
    bench_gate.touch()
    status = ended(service, job_id)
    assert status["state"] == "stopped" and not service.job(job_id).result_path(0).exists(), log_of(service, job_id)
    run = wait_until(lambda: (s := manager.status(run_id))["state"] == "completed" and s, "the queued run ran")
    assert run["dequeued_at"] >= status["finished_at"]


def test_a_benchmark_stuck_before_its_model_calls_is_terminated_by_the_queues_escalation(runs, tiny_model_dir):
    manager = RunManager(runs, stop_grace=0.2, term_grace=30)
    service = GatedBenchmarks(runs, manager, runs.parent / "never")  # its gate never opens: deaf to STOP
    job_id = service.start(service.plan([BUNDLED_TASK], 10, model=str(tiny_model_dir), bits=32))
    pid = wait_until(lambda: read_status(service.job(job_id).folder).get("pid"), "the benchmark's child started")
    service.request_stop(job_id)
    status = ended(service, job_id)
    assert status["state"] == "stopped" and "terminated (SIGTERM)" in status["error"]
    assert "within 0.2 s of Stop" in status["error"] and "kept in the cache" in status["error"]
    assert not pid_alive(pid) and manager.active_job() is None


def test_a_benchmark_whose_child_died_with_the_app_is_shown_so_and_the_queue_goes_on(runs, tiny_model_dir):
    from components.benchmark_section import poll_benchmark

    bench, gate = runs.parent / "bench", runs.parent / "never"
    app = subprocess.Popen([sys.executable, "-c", APP, str(runs), str(bench), str(runs.parent / "gate.py"),
                            str(gate), str(tiny_model_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        first, second = app.stdout.readline().split()
        folder = bench / "jobs" / first
        pid = wait_until(lambda: read_status(folder).get("pid"), "the first benchmark's child started")
    finally:  # the app dies, and the machine takes the child with it
        app.kill()
        app.wait()
    os.killpg(pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(pid), "the child is gone")
    assert read_status(folder)["state"] == "queued"  # what the dead app left on disk: no one settled it

    service = BenchmarkService(runs, bench, RunManager(runs))  # the app restarted, on the same folders
    status = service.status(first)
    assert status["state"] == "interrupted" and not service.running(first)
    assert "benchmark process is no longer running (app restarted or process killed)" in status["error"]
    assert "**interrupted**" in poll_benchmark(service, first)[0]
    # The job the dead app left waiting behind it is carried on by the new app's queue.
    final = ended(service, second)
    assert final["state"] == "completed", log_of(service, second)


def test_a_benchmark_is_admitted_and_owned_by_the_rules_a_run_has(runs, tiny_model_dir, qa_file, monkeypatch):
    from components.benchmark_section import queue_line
    from finetune.core.access import AccessDenied, Visitor
    from finetune.services.admission import RunLimitError

    monkeypatch.setenv("LORA_LAB_MAX_JOBS", "1")
    alice, bob = Visitor("alice", False, sign_in=True), Visitor("bob", False, sign_in=True)
    manager = GatedRuns(runs, runs.parent / "run-gate")
    run_id = manager.start(tiny_run_config(tiny_model_dir, qa_file), visitor=alice)
    service = BenchmarkService(runs, runs.parent / "bench", manager)
    plan = service.plan([BUNDLED_TASK], 10, model=str(tiny_model_dir), bits=32)

    with pytest.raises(RunLimitError, match="You already have 1 job"):  # her run counts among her jobs
        service.start(plan, alice)
    with pytest.raises(AccessDenied):
        service.start(plan, Visitor(None, False, sign_in=True))
    assert not list((runs.parent / "bench" / "jobs").iterdir())  # a refused job leaves no folder to re-attach to

    job_id = service.start(plan, bob)
    assert service.owner_of(job_id) == "bob" and service.latest_job(alice) is None
    status = service.status(job_id)
    assert queue_line(service, status, bob) == "2nd in line behind another visitor's run"  # not named to him
    assert queue_line(service, status, alice).startswith(f"2nd in line behind run `{run_id}`")
    with pytest.raises(AccessDenied):
        service.request_stop(job_id, alice)
    assert service.request_stop(job_id, bob)["state"] == "cancelled"
    (runs.parent / "run-gate").touch()
