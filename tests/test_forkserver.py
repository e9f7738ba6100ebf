"""The fork server (finetune/services/forkserver.py): training children forked from a process that has the training
libraries imported already, on a machine without CUDA. A forked run must be the same run a fresh process trains
(same losses, same adapter files), report how it ended, and get the environment it was started with."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from finetune.core.config import save_config
from finetune.core.distributed import same_process
from finetune.services import forkserver
from finetune.services.processes import spawn
from helpers import tiny_run_config, wait_until, write_jsonl

pytestmark = pytest.mark.skipif(not forkserver.enabled(), reason="forking is for machines without CUDA")


@pytest.fixture
def config_file(tmp_path, tiny_model_dir) -> Path:
    rows = [{"prompt": f"What does setting {i} control?", "completion": f"Lab note: setting {i}."} for i in range(24)]
    cfg = tiny_run_config(tiny_model_dir, write_jsonl(tmp_path / "qa.jsonl", rows), max_steps=3, learning_rate=0.05)
    save_config(cfg, tmp_path / "config.yaml")
    return tmp_path / "config.yaml"


def _train(config_file: Path, folder: Path):
    folder.mkdir(parents=True)
    return spawn([sys.executable, "-m", "finetune.train", str(config_file), "--output-dir", str(folder)],
                 folder / "train.log")


def _losses(folder: Path) -> list[float]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [row["loss"] for row in map(json.loads, lines) if "loss" in row]


def test_a_forked_run_is_the_run_a_fresh_process_trains(config_file, tmp_path, monkeypatch):
    forked = _train(config_file, tmp_path / "forked")
    assert isinstance(forked, forkserver.ForkedChild)
    server = forked.server.process
    # Its own session (Stop signals its group), a child of the server rather than of the app.
    assert os.getpgid(forked.pid) == forked.pid and _parent(forked.pid) == server.pid
    assert forked.wait() == 0
    monkeypatch.setenv(forkserver.FORKSERVER_ENV, "0")
    fresh = _train(config_file, tmp_path / "fresh")
    assert not isinstance(fresh, forkserver.ForkedChild) and fresh.wait() == 0
    assert _losses(tmp_path / "forked") == _losses(tmp_path / "fresh") and len(_losses(tmp_path / "fresh")) == 3
    adapters = [sorted(p.name for p in (tmp_path / run / "adapter").iterdir()) for run in ("forked", "fresh")]
    assert adapters[0] == adapters[1] and "adapter_model.safetensors" in adapters[0]
    assert "found in sys.modules" not in (tmp_path / "forked" / "train.log").read_text()


def test_exit_codes_come_back_and_a_killed_child_reads_killed(config_file, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: {bits: 3}\n")
    failed = _train(broken, tmp_path / "failed")
    assert failed.wait() == 2 and "bits" in (tmp_path / "failed" / "train.log").read_text()  # the CLI's user error
    running = _train(config_file, tmp_path / "killed")
    os.killpg(running.pid, signal.SIGKILL)
    assert running.wait() == -signal.SIGKILL and running.poll() == -signal.SIGKILL
    wait_until(lambda: not same_process(running.pid), "the killed child to be reaped by the server")


def test_another_environment_gets_a_server_of_its_own(config_file, tmp_path, monkeypatch):
    first = _train(config_file, tmp_path / "first")
    assert first.wait() == 0
    monkeypatch.setenv("PYTEST_CURRENT_TEST", "another test")  # changes with every test: not a reason for a server
    same = _train(config_file, tmp_path / "same")
    assert same.server is first.server and same.wait() == 0
    monkeypatch.setenv("LORA_LAB_PROBE", "seen")  # read by nothing: the server is keyed by the whole environment
    second = _train(config_file, tmp_path / "second")
    assert second.server is not first.server and second.server.env["LORA_LAB_PROBE"] == "seen"
    environ = Path(f"/proc/{second.server.process.pid}/environ").read_bytes().split(b"\0")
    assert b"LORA_LAB_PROBE=seen" in environ
    assert second.wait() == 0
    # The first server was closed: it ends once its children have (it has none left).
    wait_until(lambda: first.server.process.poll() is not None, "the first server to end")


def test_other_commands_are_fresh_processes(tmp_path):
    child = spawn([sys.executable, "-c", "print('fresh')"], tmp_path / "log")
    assert not isinstance(child, forkserver.ForkedChild) and child.wait() == 0
    assert (tmp_path / "log").read_text() == "fresh\n"


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rfind(")") + 2:].split()[1])
