"""Faults that must end in clear states (issue 32): a full disk while a run saves or its status is written, odd
entries in the runs folder.

The full disk is simulated, because this machine's disk cannot be filled safely: a patched write raises
OSError(ENOSPC). In the training child (a sitecustomize module on its PYTHONPATH) the Trainer's checkpoint save
raises it, and from then on every Path.write_text does too (the disk stays full, so the child cannot write its own
status); in the app process status writes raise it until the test "frees space". The training, the child process,
the run manager and the Train tab's handlers are real.
"""

from __future__ import annotations

import errno
import logging
import os
import pathlib
import threading
from pathlib import Path

from helpers import tiny_run_config, wait_until

FULL_DISK_CHILD = '''
import errno, os, pathlib
import transformers

def _full(self, *args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

def _save_checkpoint(self, model, trial):  # the first checkpoint fills the disk; it stays full afterwards
    pathlib.Path.write_text = _full
    _full(self)

transformers.Trainer._save_checkpoint = _save_checkpoint
'''


def _full_disk_for_status_writes(monkeypatch, root: Path) -> None:
    """In this process, a status write under ``root`` raises ENOSPC (write_status writes a temporary file)."""
    original = pathlib.Path.write_text

    def write_text(self, *args, **kwargs):
        if root in self.parents and ".tmp" in self.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", write_text)


def test_disk_full_ends_the_run_failed_and_the_views_keep_answering(tmp_path, tiny_model_dir, qa_file, monkeypatch):
    from components.train_tab import poll_run, run_history
    from finetune.metrics import read_status
    from finetune.runs import RunManager

    child_site = tmp_path / "site"
    child_site.mkdir()
    (child_site / "sitecustomize.py").write_text(FULL_DISK_CHILD, encoding="utf-8")
    monkeypatch.setenv("PYTHONPATH", str(child_site))
    escaped: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: escaped.append(args.exc_value))
    root = tmp_path / "runs"
    manager = RunManager(root)
    cfg = tiny_run_config(tiny_model_dir, qa_file, bits=32, max_steps=4, save_steps=2, eval_steps=0)
    run_id = manager.start(cfg)
    _full_disk_for_status_writes(monkeypatch, root)  # the app cannot settle the run on disk either

    poll = wait_until(lambda: (p := poll_run(manager, run_id)) and "failed" in p[1] and p, "the run failing",
                      every=0.5)
    assert "Disk full while saving" in poll[1] and "Delete" in poll[1], poll[1]
    assert read_status(root / run_id)["state"] == "running"  # nothing could be written: the view said it anyway
    table = run_history(manager)[0]
    assert table["status"].tolist() == ["failed"]
    assert escaped == []  # the watcher thread settled without raising

    monkeypatch.undo()  # space is freed: the next poll writes the final state
    poll_run(manager, run_id)
    status = read_status(root / run_id)
    assert status["state"] == "failed" and status["error"].startswith("Disk full while saving"), status
    assert not list((root / run_id).glob("status.tmp*"))  # no temporary file left behind


def test_odd_entries_in_the_runs_folder_are_skipped_and_logged_once(tmp_path, caplog):
    from components.train_tab import poll_run, run_history
    from finetune.metrics import write_status
    from finetune.runs import RunManager

    root, elsewhere = tmp_path / "runs", tmp_path / "elsewhere"
    for folder in (root / "good-run", elsewhere, root / "bad name!"):
        folder.mkdir(parents=True)
        write_status(folder, state="completed", step=3, max_steps=3)
    write_status(elsewhere, state="completed")
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)
    (root / "dangling").symlink_to(tmp_path / "nothing-here")
    (root / "stray.txt").write_text("not a run", encoding="utf-8")
    (root / "status-is-a-folder" / "status.json").mkdir(parents=True)
    (root / "not-json").mkdir()
    (root / "not-json" / "status.json").write_bytes(b"\xff\xfe not json")
    manager = RunManager(root)

    with caplog.at_level(logging.WARNING, logger="finetune.run_folder"):
        for _ in range(2):
            assert set(manager.list_ids()) == {"good-run", "not-json"}
            poll = poll_run(manager, "")
            assert poll[0] in ("good-run", "not-json"), poll
            assert set(run_history(manager)[0]["run id"]) == {"good-run", "not-json"}
    skipped = [r.getMessage() for r in caplog.records if r.name == "finetune.run_folder"]
    for name in ("linked", "dangling", "bad name!", "status-is-a-folder"):
        assert sum(message.startswith(f"Skipping {name} ") for message in skipped) == 1, skipped
    assert not any("stray.txt" in message for message in skipped)  # a plain file is simply not a run
    assert os.path.isdir(elsewhere)  # nothing was followed or removed


def _visiting(name: str):
    """A stand-in for gr.Request: what components.shared.visitor_of reads (the dev sign-in's session)."""
    from types import SimpleNamespace

    from finetune.access import dev_session

    return SimpleNamespace(scope={"session": {"oauth_info": dev_session(name)}}, session_hash=f"s-{name}",
                           username=None)


def test_stopping_a_comparison_reads_the_same_whether_it_is_someone_elses_or_not_there(tmp_path, monkeypatch):
    """A running comparison of alice's: bob's Stop learns neither its state nor its owner, only what a made-up id
    gets; the operator's Stop gets through."""
    from components.shared import stop_queue
    from finetune.compare import CompareQueue
    from finetune.runs import RunManager

    monkeypatch.setenv("LORA_LAB_SIGN_IN", "dev")
    monkeypatch.setenv("LORA_LAB_OPERATORS", "carol")
    queue = CompareQueue(RunManager(tmp_path / "runs"))
    queue._save({"id": "compare-alice", "state": "running", "stop_requested": False, "items": [], "owner": "alice"})

    refused = stop_queue(queue, "techniques", "compare-alice", _visiting("bob"))
    assert "not one of yours" in refused and "alice" not in refused.replace("compare-alice", "") and \
        "running" not in refused, refused
    assert stop_queue(queue, "techniques", "compare-nobody", _visiting("bob")) == \
        refused.replace("compare-alice", "compare-nobody")
    assert not queue.load("compare-alice")["stop_requested"]
    assert "Stop requested" in stop_queue(queue, "techniques", "compare-alice", _visiting("carol"))
    assert queue.load("compare-alice")["stop_requested"]
