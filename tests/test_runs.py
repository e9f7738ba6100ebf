"""The run manager with real child processes training the tiny model."""

import os
import signal
import time

import pytest

from finetune.metrics import read_metrics
from finetune.runs import RunError, RunInProgressError, RunManager
from finetune.train import last_checkpoint

from conftest import tiny_run_config


def wait_for_step(manager: RunManager, run_id: str, step: int, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(r.get("step", 0) >= step and "loss" in r for r in read_metrics(manager.run_dir(run_id))):
            return
        assert manager.status(run_id).get("state") in ("queued", "running"), manager.log_tail(run_id)
        time.sleep(0.2)
    raise AssertionError(f"run never reached step {step}: {manager.log_tail(run_id)}")


@pytest.fixture
def manager(tmp_path) -> RunManager:
    return RunManager(tmp_path / "runs")


def test_stop_saves_a_checkpoint_and_resume_finishes(manager, tiny_model_dir, qa_file):
    cfg = tiny_run_config(tiny_model_dir, qa_file, max_steps=400, save_steps=1000, eval_steps=0)
    run_id = manager.start(cfg)
    wait_for_step(manager, run_id, 3)
    with pytest.raises(RunInProgressError, match="still training"):
        manager.start(cfg)  # one job at a time
    status = manager.stop(run_id)
    assert status["state"] == "stopped"
    checkpoint = last_checkpoint(manager.run_dir(run_id))
    assert checkpoint is not None
    stopped_at = int(checkpoint.rsplit("-", 1)[1])
    assert 3 <= stopped_at < 400
    # Resume with a shorter budget so the test stays short; the step counter continues from the checkpoint.
    cfg.training.max_steps = stopped_at + 3
    from finetune.config import save_config

    save_config(cfg, manager.run_dir(run_id) / "config.yaml")
    manager.resume(run_id)
    final = manager.wait(run_id, timeout=180)
    assert final["state"] == "completed", manager.log_tail(run_id)
    steps = [r["step"] for r in read_metrics(manager.run_dir(run_id)) if "loss" in r]
    assert steps[-1] == stopped_at + 3 and stopped_at + 1 in steps
    assert manager.summary(run_id).has_adapter


def test_killed_child_is_reported_failed_and_the_manager_keeps_working(manager, tiny_model_dir, qa_file):
    cfg = tiny_run_config(tiny_model_dir, qa_file, max_steps=400, save_steps=1000, eval_steps=0)
    run_id = manager.start(cfg)
    wait_for_step(manager, run_id, 2)
    os.killpg(manager.status(run_id)["pid"], signal.SIGKILL)
    status = manager.wait(run_id, timeout=30)
    assert status["state"] == "failed" and "ended unexpectedly" in status["error"]
    assert "loss" in manager.log_tail(run_id) or manager.log_tail(run_id)
    cfg.training.max_steps = 2
    second = manager.start(cfg)  # the slot is free again
    assert manager.wait(second, timeout=180)["state"] == "completed"


def test_a_run_whose_process_vanished_is_marked_interrupted(manager, tiny_model_dir, qa_file):
    cfg = tiny_run_config(tiny_model_dir, qa_file)
    folder = manager.run_dir("ghost-run")
    folder.mkdir()
    from finetune.config import save_config
    from finetune.metrics import write_status

    save_config(cfg, folder / "config.yaml")
    write_status(folder, state="running", pid=2**22 + 12345)  # no such process: the app was restarted
    fresh = RunManager(manager.root)
    assert fresh.status("ghost-run")["state"] == "interrupted"
    assert fresh.active_run() is None
    summaries = fresh.list_runs()
    assert [s.run_id for s in summaries] == ["ghost-run"] and summaries[0].config == cfg


@pytest.mark.parametrize("bad", ["../etc", "a/b", "", ".hidden", "x" * 200, "..", "run\x00"])
def test_run_ids_cannot_escape_the_runs_folder(manager, bad):
    with pytest.raises(RunError, match="Invalid run id"):
        manager.run_dir(bad)


def test_resume_refuses_runs_without_checkpoint(manager, tiny_model_dir, qa_file):
    from finetune.config import save_config
    from finetune.metrics import write_status

    folder = manager.run_dir("no-ckpt")
    folder.mkdir()
    save_config(tiny_run_config(tiny_model_dir, qa_file), folder / "config.yaml")
    write_status(folder, state="stopped")
    with pytest.raises(RunError, match="no checkpoint"):
        manager.resume("no-ckpt")
