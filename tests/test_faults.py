"""Faults survived: a killed training child, the app restarted mid-run, out of GPU memory, a full disk.

The kill and restart cases are real: a tiny-model run trains in its child process and is SIGKILLed after its first
checkpoint; the app (served on loopback) keeps answering, and the run resumes from that checkpoint.
Simulated, because this machine has no GPU and a disk cannot be filled safely: the OOM case raises
torch.cuda.OutOfMemoryError from the Trainer's training step, and the disk-full case raises ENOSPC from the
Trainer's checkpoint save after it has written part of the folder, both in-process.
LangSmith down -> outbox is covered in tests/test_feedback_langsmith.py (test_feedback_waits_in_the_outbox...).
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
from pathlib import Path

import pytest
from gradio_client import handle_file

from helpers import app_client, served_app, tiny_run_config, wait_until

STEPS, SAVE_EVERY = 12, 3


def _form(model_dir: Path, data_file: Path, name: str) -> dict:
    return {"data_kind": "Uploaded file", "data_file": handle_file(str(data_file)), "run_name": name,
            "model_source": str(model_dir), "model_bits": 32, "training_max_steps": STEPS,
            "training_save_steps": SAVE_EVERY, "training_batch_size": 2, "data_max_seq_length": 128,
            "training_eval_steps": 0, "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0,
            "training_warmup_ratio": 0.0, "training_learning_rate": 0.01}


def _wait_for_checkpoint(run_dir: Path) -> Path:
    from finetune.core.run_folder import last_checkpoint

    try:
        return Path(wait_until(lambda: last_checkpoint(run_dir), f"a checkpoint in {run_dir}", every=0.05))
    except AssertionError as error:
        raise AssertionError(f"{error}; log:\n{(run_dir / 'train.log').read_text()[-2000:]}") from None


def _kill(run_dir: Path) -> int:
    from finetune.core.run_status import read_status

    pid = read_status(run_dir)["pid"]
    os.killpg(pid, signal.SIGKILL)  # the child leads its own session: this kills it and nothing else
    return pid


def _poll(client, run_id: str, words: str):
    def shown():
        result = client.predict(run_id, api_name="/poll_run")
        return result if words in result[1] else None

    return wait_until(shown, f"run {run_id} showing {words!r}", every=0.3)


def test_killed_child_fails_with_log_tail_and_the_app_keeps_serving(tmp_path, tiny_model_dir, qa_file):

    with served_app(tmp_path / "runs") as url:
        client = app_client(url)
        run_id, message = client.predict(**_form(tiny_model_dir, qa_file, "kill-me"), api_name="/start_run")
        assert "Started" in message, message
        run_dir = tmp_path / "runs" / run_id
        checkpoint = _wait_for_checkpoint(run_dir)
        _kill(run_dir)
        result = _poll(client, run_id, "failed")
        assert "training process ended unexpectedly (exit code -9)" in result[1]
        assert result[5].strip(), "the log tail is shown for a failed run"
        # The app keeps serving: history lists the failed run, and a new start is allowed (the device is free).
        history, *_ = client.predict([], api_name="/run_history")
        state = history["headers"].index("status")
        assert [row[state] for row in history["data"] if row[0] == run_id] == ["failed"]
        assert (checkpoint / "trainer_state.json").is_file()


def test_app_restart_finds_runs_and_resumes_an_interrupted_one(tmp_path, tiny_model_dir, qa_file):
    """The app goes down mid-run and the child with it (a machine restart); the next app marks the run
    interrupted, and it resumes from its last checkpoint to the end."""

    from finetune.core.run_status import read_metrics, read_status, write_status
    from finetune.services.runs import RunManager

    root = tmp_path / "runs"
    with served_app(root) as url:
        run_id, message = app_client(url).predict(**_form(tiny_model_dir, qa_file, "restart"),
                                                             api_name="/start_run")
        assert "Started" in message, message
        _wait_for_checkpoint(root / run_id)
        _kill(root / run_id)  # the machine goes down: the child dies
        # This app is still up, and its watcher records the kill at once; a machine that went down takes the app
        # with it, so nobody records the end: put status.json back as such a crash leaves it.
        wait_until(lambda: read_status(root / run_id)["state"] == "failed", "the watcher recorded the kill")
        write_status(root / run_id, state="running", error=None, finished_at=None)
    resumed_from = int(_wait_for_checkpoint(root / run_id).name.split("-")[-1])

    with served_app(root) as url:  # the restarted app
        client = app_client(url)
        result = _poll(client, run_id, "interrupted")
        assert "no longer running (app restarted or process killed)" in result[1]
        history, *_ = client.predict([], api_name="/run_history")
        assert run_id in [row[0] for row in history["data"]]
        rows_before = len(read_metrics(root / run_id))
        manager = RunManager(root)
        manager.resume(run_id)
        status = manager.wait(run_id, timeout=300)
        assert status["state"] == "completed", manager.log_tail(run_id)
        assert _poll(client, run_id, "completed")
    losses = [r for r in read_metrics(root / run_id)[rows_before:] if "loss" in r]
    # Continued from the checkpoint, not from step 0: the first loss after the resume is the step after it.
    assert losses[0]["step"] == resumed_from + 1 and losses[-1]["step"] == STEPS
    assert (root / run_id / "adapter" / "adapter_config.json").is_file()


def _live_group_members(pgid: int) -> set[int]:
    """Processes of the group that still exist and are not zombies (/proc: state, ppid, pgrp after the name)."""
    members = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[2] == str(pgid) and fields[0] != "Z":
            members.add(int(stat.parent.name))
    return members




def test_sigstopped_child_is_shown_stalled_then_stop_ends_it_and_resume_finishes(tmp_path, tiny_model_dir, qa_file):
    """A training child frozen by SIGSTOP (as a hung driver or a debugger would leave it) never reads the STOP
    file: the Train tab shows it stalled with its log, Stop terminates its process group after the grace, the run
    ends `stopped`, a new start is accepted, and resume continues from the last complete checkpoint."""
    from components.train_runs import poll_run
    from finetune.core.config import save_config
    from finetune.core.run_status import read_metrics
    from finetune.services.runs import RunManager
    from finetune.core.run_folder import last_checkpoint

    manager = RunManager(tmp_path / "runs", stop_grace=1.0, term_grace=60.0, stall_after=2.0)
    cfg = tiny_run_config(tiny_model_dir, qa_file, bits=32, max_steps=400, save_steps=2, eval_steps=0)
    run_id = manager.start(cfg)
    run_dir = manager.run_dir(run_id)
    _wait_for_checkpoint(run_dir)
    pid = manager.status(run_id)["pid"]
    os.killpg(pid, signal.SIGSTOP)

    wait_until(lambda: manager.status(run_id).get("stalled_seconds") is not None, "the run is reported stalled")
    _, text, bar, *_, log_tail, accordion = poll_run(manager, run_id)
    assert "**stalled**" in text and "data-state='stalled'" in bar and "'loss'" in log_tail and accordion.open

    manager.request_stop(run_id)
    status = wait_until(lambda: (s := manager.status(run_id))["state"] != "running" and s, "Stop ended the run")
    assert status["state"] == "stopped" and "terminated (SIGTERM)" in status["error"], status
    wait_until(lambda: not _live_group_members(pid), "the child's process group is gone")
    checkpoint = Path(last_checkpoint(run_dir))  # complete: trainer_state.json is written last
    assert (checkpoint / "trainer_state.json").is_file()

    resumed_from = int(checkpoint.name.split("-")[-1])
    cfg.training.max_steps = resumed_from + 2
    save_config(cfg, run_dir / "config.yaml")
    rows_before = len(read_metrics(run_dir))
    manager.resume(run_id)  # accepted: the killed child no longer holds the slot
    assert manager.wait(run_id, timeout=300)["state"] == "completed", manager.log_tail(run_id)
    losses = [r for r in read_metrics(run_dir)[rows_before:] if "loss" in r]
    assert losses[0]["step"] == resumed_from + 1 and losses[-1]["step"] == resumed_from + 2


@pytest.fixture
def trainer_patch(monkeypatch):
    """Patch a method of transformers.Trainer for one in-process run."""
    import transformers

    def patch(name: str, make):
        original = getattr(transformers.Trainer, name)
        monkeypatch.setattr(transformers.Trainer, name, make(original))

    return patch


def test_out_of_gpu_memory_suggests_smaller_settings(tmp_path, tiny_model_dir, qa_file, trainer_patch):
    """Simulated OOM (no GPU here): the training step raises torch.cuda.OutOfMemoryError."""
    import torch

    from components.train_runs import run_status_text
    from finetune.core.run_status import read_status
    from finetune.train import run

    def make(original):
        def training_step(self, *args, **kwargs):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return training_step

    trainer_patch("training_step", make)
    cfg = tiny_run_config(tiny_model_dir, qa_file, bits=32, max_steps=2)
    assert run(cfg, tmp_path / "oom") == 1
    status = read_status(tmp_path / "oom")
    assert status["state"] == "failed"
    for advice in ("Out of GPU memory", "smaller batch size", "shorter max sequence length", "4-bit"):
        assert advice in status["error"]
    assert "Out of GPU memory" in run_status_text("oom", status)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, tiny_model_dir, qa_file, trainer_patch):
    """Simulated ENOSPC: the second checkpoint save writes part of its folder, then the disk is 'full'."""
    from finetune.core.run_status import read_status
    from finetune.core.run_folder import CHECKPOINT_DIR, last_checkpoint
    from finetune.train import run

    run_dir, saved = tmp_path / "full", {}

    def make(original):
        def save_checkpoint(self, model, trial):
            if not saved:
                original(self, model, trial)
                first = Path(last_checkpoint(run_dir))
                saved.update(path=first, digest=_digest(first))
                return
            partial = run_dir / CHECKPOINT_DIR / f"checkpoint-{self.state.global_step}"
            partial.mkdir(parents=True)
            (partial / "adapter_model.safetensors").write_bytes(b"\0" * 100)  # cut short
            raise OSError(errno.ENOSPC, "No space left on device")
        return save_checkpoint

    trainer_patch("_save_checkpoint", make)
    cfg = tiny_run_config(tiny_model_dir, qa_file, bits=32, max_steps=4, save_steps=2, eval_steps=0)
    assert run(cfg, run_dir) == errno.ENOSPC  # the exit code tells the run manager why, even if no status was written
    status = read_status(run_dir)
    assert status["state"] == "failed" and status["error"].startswith("Disk full while saving")
    # The half-written checkpoint-4 is passed over: resume would start from the intact checkpoint-2.
    assert Path(last_checkpoint(run_dir)) == saved["path"] and saved["path"].name == "checkpoint-2"
    assert _digest(saved["path"]) == saved["digest"]
    assert (run_dir / CHECKPOINT_DIR / "checkpoint-4").is_dir()
