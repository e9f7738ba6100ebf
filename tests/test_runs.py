"""The run manager with real child processes: the tiny model training, and a small script started through the
manager's own child mechanism that plays a hung child (it ignores the STOP file and SIGTERM)."""

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from finetune.core.run_folder import last_checkpoint
from finetune.core.run_status import FINAL_STATES, read_metrics, read_status, write_status
from finetune.services.admission import RunError
from finetune.services.runs import RunManager

from helpers import tiny_run_config, wait_until, write_jsonl

HUNG_CHILD = """
import json, os, signal, subprocess, sys, time
from pathlib import Path

folder, mode = Path(sys.argv[1]), sys.argv[2]


def write_status(folder, **fields):  # finetune.core.run_status.write_status's contract
    status = json.loads((folder / "status.json").read_text())
    status.update(fields, updated_at=time.time())
    (folder / "status.tmp").write_text(json.dumps(status))
    os.replace(folder / "status.tmp", folder / "status.json")


if mode == "finish":
    write_status(folder, state="running", pid=os.getpid())
    write_status(folder, state="completed", finished_at=time.time())
    sys.exit(0)
# Hung in a way no cooperative stop can reach: the STOP file is never read and SIGTERM is ignored (by the helper it
# starts too, which shares its process group), so only a kill of the whole group ends them.
signal.signal(signal.SIGTERM, signal.SIG_IGN)
helper = subprocess.Popen([sys.executable, "-c", "while True: __import__('time').sleep(1)"])
write_status(folder, state="running", pid=os.getpid(), helper_pid=helper.pid)
while True:
    time.sleep(1)
"""


def wait_for_step(manager: RunManager, run_id: str, step: int) -> None:
    def reached() -> bool:
        if any(r.get("step", 0) >= step and "loss" in r for r in read_metrics(manager.run_dir(run_id))):
            return True
        assert manager.status(run_id).get("state") in ("queued", "running"), manager.log_tail(run_id)
        return False

    wait_until(reached, f"run {run_id} reaching step {step}", every=0.2)


@pytest.fixture
def manager(tmp_path) -> RunManager:
    return RunManager(tmp_path / "runs")


def test_stop_saves_a_checkpoint_and_resume_finishes(manager, tiny_model_dir, qa_file):
    cfg = tiny_run_config(tiny_model_dir, qa_file, max_steps=400, save_steps=1000, eval_steps=0)
    run_id = manager.start(cfg)
    wait_for_step(manager, run_id, 3)
    queued = manager.start(cfg)  # one job at a time: the second waits in the queue
    assert manager.status(queued)["state"] == "waiting"
    assert manager.queue_info(queued)["position"] == 1 and manager.queue_info(queued)["ahead"] == [run_id]
    assert manager.request_stop(queued)["state"] == "cancelled"  # Stop on a waiting job takes it out
    status = manager.stop(run_id)
    assert status["state"] == "stopped"
    checkpoint = last_checkpoint(manager.run_dir(run_id))
    assert checkpoint is not None
    stopped_at = int(checkpoint.rsplit("-", 1)[1])
    assert 3 <= stopped_at < 400
    # Resume with a shorter budget so the test stays short; the step counter continues from the checkpoint.
    cfg.training.max_steps = stopped_at + 3
    from finetune.core.config import save_config

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
    from finetune.core.config import save_config
    from finetune.core.run_status import write_status

    save_config(cfg, folder / "config.yaml")
    write_status(folder, state="running", pid=2**22 + 12345)  # no such process: the app was restarted
    fresh = RunManager(manager.root)
    assert fresh.status("ghost-run")["state"] == "interrupted"
    assert fresh.active_run() is None
    summaries = fresh.list_runs()
    assert [s.run_id for s in summaries] == ["ghost-run"] and summaries[0].config == cfg


def test_a_pid_that_now_belongs_to_another_process_is_not_taken_for_the_run(manager, tiny_model_dir, qa_file):
    """After a machine restart a recorded pid can come round to an unrelated process (here: this test's own):
    the process start time recorded beside it tells them apart, so the run is marked interrupted, not running."""
    from finetune.core.config import save_config
    from finetune.core.run_status import write_status

    folder = manager.run_dir("reused-pid")
    folder.mkdir()
    save_config(tiny_run_config(tiny_model_dir, qa_file), folder / "config.yaml")
    write_status(folder, state="running", pid=os.getpid(), pid_start="1")  # alive, but started at another time
    assert RunManager(manager.root).status("reused-pid")["state"] == "interrupted"


@pytest.mark.parametrize("bad", ["../etc", "a/b", "", ".hidden", "x" * 200, "..", "run\x00"])
def test_run_ids_cannot_escape_the_runs_folder(manager, bad):
    with pytest.raises(RunError, match="Invalid run id"):
        manager.run_dir(bad)


def test_resume_refuses_runs_without_checkpoint(manager, tiny_model_dir, qa_file):
    from finetune.core.config import save_config
    from finetune.core.run_status import write_status

    folder = manager.run_dir("no-ckpt")
    folder.mkdir()
    save_config(tiny_run_config(tiny_model_dir, qa_file), folder / "config.yaml")
    write_status(folder, state="stopped")
    with pytest.raises(RunError, match="no checkpoint"):
        manager.resume("no-ckpt")


# --- Stop that stops, reaping, refused starts -------------------------------------------------------------------



def _proc_stat(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2:].split()  # [state, ppid, pgrp, ...]


def live_group_members(pgid: int) -> set[int]:
    """Processes of the group that still exist and are not zombies (an exited grandchild may wait for init)."""
    members = set()
    for entry in Path("/proc").iterdir():
        fields = _proc_stat(int(entry.name)) if entry.name.isdigit() else None
        if fields and fields[2] == str(pgid) and fields[0] != "Z":
            members.add(int(entry.name))
    return members


def is_zombie(pid: int) -> bool:
    fields = _proc_stat(pid)
    return bool(fields) and fields[0] == "Z"


class ScriptManager(RunManager):
    """The real RunManager, whose child is the HUNG_CHILD script instead of the trainer."""

    mode = "hang"

    def child_command(self, run_id: str, resume: bool) -> list[str]:
        return [self.python, str(self.root.parent / "hung_child.py"), str(self.run_dir(run_id)), self.mode]


def started(manager: RunManager, run_id: str) -> dict[str, Any]:
    """The hung child's status once it has started its helper; fails at once if the child died instead."""
    def check() -> dict[str, Any] | None:
        status = manager.status(run_id)
        assert status["state"] in ("queued", "running"), manager.log_tail(run_id)
        return status if status.get("helper_pid") else None
    return wait_until(check, "the hung child started its helper")


@pytest.fixture
def script_root(tmp_path) -> Path:
    (tmp_path / "hung_child.py").write_text(HUNG_CHILD)
    return tmp_path / "runs"


def test_stop_kills_a_hung_child_group_even_across_an_app_restart(script_root, tiny_model_dir, qa_file):
    cfg = tiny_run_config(tiny_model_dir, qa_file)
    patient = ScriptManager(script_root, stop_grace=3600)  # an operator grace longer than the test
    run_id = patient.start(cfg)
    status = started(patient, run_id)
    pgid, helper = status["pid"], status["helper_pid"]
    assert live_group_members(pgid) == {pgid, helper}

    patient.request_stop(run_id)  # returns at once: the escalation waits in the background
    asked = patient.status(run_id)
    assert asked["state"] == "running" and asked["stop_requested_at"] > 0
    patient.request_stop(run_id)  # pressed again: the deadline stays where the first press put it
    assert patient.status(run_id)["stop_requested_at"] == asked["stop_requested_at"]
    assert live_group_members(pgid) == {pgid, helper}
    queued = patient.start(cfg)  # still training until it is stopped or killed: the next job waits
    assert patient.status(queued)["state"] == "waiting"
    patient.cancel(queued)

    # The app restarts with a short grace: the Stop begun before (STOP file, pid and hostname on disk) is carried
    # through by the new manager, which did not start the child: SIGTERM is ignored, so it ends with SIGKILL.
    restarted = ScriptManager(script_root, stop_grace=0.2, term_grace=0.2)
    final = wait_until(lambda: (s := restarted.status(run_id))["state"] != "running" and s, "the run ended")
    assert final["state"] == "stopped", final
    assert "SIGKILL" in final["error"] and "resume" in final["error"]
    wait_until(lambda: not live_group_members(pgid), "the child's whole process group is gone")
    wait_until(lambda: not is_zombie(pgid), "the killed child was reaped by the manager that started it")

    restarted.mode = "finish"
    second = restarted.start(cfg)  # the slot is free again
    finished = wait_until(lambda: (s := restarted.status(second))["state"] in FINAL_STATES and s,
                          "the second run finished")
    assert finished["state"] == "completed"


def test_a_finished_child_is_reaped(script_root, tiny_model_dir, qa_file):
    manager = ScriptManager(script_root)
    manager.mode = "finish"
    run_id = manager.start(tiny_run_config(tiny_model_dir, qa_file))
    pid = read_status(manager.run_dir(run_id))["pid"]
    wait_until(lambda: manager.status(run_id)["state"] == "completed", "the child reported completion")
    # Nobody reads the status again: the manager's own watcher waits for the child, so no zombie is left behind.
    wait_until(lambda: _proc_stat(pid) is None, f"pid {pid} is gone (a zombie would stay until the app exits)")


def test_a_run_without_progress_is_shown_stalled_with_its_log_and_a_stop_that_works(script_root, tiny_model_dir,
                                                                                   qa_file):
    from components.train_runs import poll_run

    manager = ScriptManager(script_root, stop_grace=0.2, term_grace=0.2, stall_after=1.0)
    run_id = manager.start(tiny_run_config(tiny_model_dir, qa_file))
    folder = manager.run_dir(run_id)
    started(manager, run_id)
    write_status(folder, stage="reward")  # so the RLHF tab watches it too
    with (folder / "train.log").open("a") as log:
        log.write("last words of the hung child\n")
    status = wait_until(lambda: (s := manager.status(run_id)).get("stalled_seconds") is not None and s,
                        "the run is reported stalled")
    assert status["state"] == "running"
    _, text, bar, *_, log_tail, accordion = poll_run(manager, run_id)
    assert "**stalled**: no progress for" in text and "data-state='stalled'" in bar
    assert "last words of the hung child" in log_tail and accordion.open is True
    from components.rlhf_runs import poll_rlhf

    assert "data-state='stalled'" in poll_rlhf(manager, "", "")[2]  # the RLHF tab's reward-run bar
    manager.request_stop(run_id)
    wait_until(lambda: manager.status(run_id)["state"] == "stopped", "Stop ended the stalled run")
    wait_until(lambda: not live_group_members(status["pid"]), "its process group is gone")


def test_refused_starts_remove_their_upload_copies(script_root, tiny_model_dir, qa_file, monkeypatch):
    from components.train_runs import start_run

    upload_dir = script_root.parent / "gradio-uploads" / "abc123"  # gradio's upload folder for this server
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(upload_dir.parent))
    upload_dir.mkdir(parents=True)
    upload = upload_dir / "qa.jsonl"
    upload.write_bytes(qa_file.read_bytes())
    manager = ScriptManager(script_root, stop_grace=0.2, term_grace=0.2)
    kept = script_root / "uploads"
    form = {"data_kind": "Uploaded file", "data_file": str(upload), "model_source": str(tiny_model_dir),
            "model_bits": 32, "data_max_seq_length": 128, "training_max_steps": 2}

    _, message = start_run(manager, **{**form, "lora_rank": 0})  # a config problem
    assert "lora.rank" in message
    assert not kept.exists() or not list(kept.iterdir())

    busy, message = start_run(manager, **form)
    assert "Started" in message, message
    assert len(list(kept.iterdir())) == 1  # the started run's copy, which its child reads
    queued, message = start_run(manager, **form)  # a run is in progress: this one waits in the queue
    assert "Queued" in message and "2nd in line" in message, message
    assert len(list(kept.iterdir())) == 2  # the queued run reads its own copy when its turn comes
    manager.cancel(queued)
    manager.delete(queued)  # its copy goes with it: no other run uses it
    in_use = [Path(manager.summary(busy).config.data.source).name]
    assert [p.name for p in kept.iterdir()] == in_use

    # The RLHF tab's Start keeps its preference upload the same way, and removes it when refused.
    from components.rlhf_runs import start_stage

    pairs = upload_dir / "pairs.jsonl"
    write_jsonl(pairs, [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad"} for i in range(8)])
    monkeypatch.setenv("LORA_LAB_MIN_FREE", "100000TB")  # a disk too full to start anything
    _, message = start_stage(manager, None, "reward", data_kind="Uploaded file", data_file=str(pairs))
    assert "Not started" in message and "Not enough free disk to start a run" in message, message
    assert [p.name for p in kept.iterdir()] == in_use
    manager.stop(busy, timeout=60)


def test_a_run_that_logs_rarely_still_shows_life_between_logs(tmp_path, monkeypatch):
    """The trainer callback touches status.json at a step end once HEARTBEAT_SECONDS passed without a write, so
    a slow run with a large logging_steps is not reported stalled; it does not write more often than that. (The
    re-measured ETA has a write rule of its own, every ETA_WRITE_SECONDS: held off here to see the heartbeat's.)"""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from finetune.core import metrics
    from finetune.core.metrics import HEARTBEAT_SECONDS, MetricsCallback
    from finetune.core.run_status import write_status
    from finetune.core.run_folder import STATUS_FILE

    monkeypatch.setattr(metrics, "ETA_WRITE_SECONDS", float("inf"))

    write_status(tmp_path, state="running", step=6)
    callback = MetricsCallback(tmp_path)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[])
    state = TrainerState(global_step=7, max_steps=100)
    before = read_status(tmp_path)

    callback.on_step_end(args, state, TrainerControl())  # the last write is recent: nothing written
    assert read_status(tmp_path) == before

    quiet_since = time.time() - HEARTBEAT_SECONDS - 1
    os.utime(tmp_path / STATUS_FILE, (quiet_since, quiet_since))
    callback.on_step_end(args, state, TrainerControl())
    after = read_status(tmp_path)
    assert after["step"] == 7 and after["updated_at"] > quiet_since + 1


def test_a_space_visitor_sees_the_running_runs_form_without_server_paths(script_root, tiny_model_dir, qa_file,
                                                                         monkeypatch):
    """Opening the page while a run trains fills the Train form from that run's config; on a Space (local paths
    off for visitors) its model and data sources show as names, never as the server's folders."""
    import gradio as gr

    from components import train_tab
    from finetune.core.hardware import detect

    cfg = tiny_run_config(tiny_model_dir, qa_file)
    manager = ScriptManager(script_root, stop_grace=0.2, term_grace=0.2)
    with gr.Blocks():
        train_tab.build_train_tab(manager, detect())  # the real form, whose order restore_form answers in
    run_id = manager.start(cfg)
    started(manager, run_id)
    try:
        local = train_tab.restore_form(manager)
        assert str(tiny_model_dir) in local  # the operator's own app shows the folder it may use
        monkeypatch.setenv("SPACE_ID", "me/lab")
        shown = train_tab.restore_form(manager)
        assert not [value for value in shown if isinstance(value, str) and str(tiny_model_dir.parent) in value]
        assert tiny_model_dir.name in shown
    finally:
        manager.request_stop(run_id)
        wait_until(lambda: manager.status(run_id)["state"] != "running", "the run ended")


def test_the_train_form_is_not_filled_from_a_running_rlhf_stage(script_root):
    """While a reward/DPO run trains, a freshly opened page keeps the SFT form's own values: the stage's settings
    there would start an SFT run with DPO's steps and lengths."""
    import gradio as gr

    from components import train_tab
    from finetune.core.config import load_config
    from finetune.core.hardware import detect

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "reward-cpu.yaml")
    manager = ScriptManager(script_root, stop_grace=0.2, term_grace=0.2)
    with gr.Blocks():
        train_tab.build_train_tab(manager, detect())
    run_id = manager.start(cfg)
    started(manager, run_id)
    try:
        assert manager.active_run() == run_id
        assert all(value is gr.skip() or isinstance(value, dict) and value.get("__type__") == "update"
                   for value in train_tab.restore_form(manager))
    finally:
        manager.request_stop(run_id)
        wait_until(lambda: manager.status(run_id)["state"] != "running", "the run ended")


HUNG_RANKS_CHILD = """
import json, os, signal, subprocess, sys, time
from pathlib import Path

folder = Path(sys.argv[1])
# Like accelerate's launch (torch elastic): each rank leads its own session, outside the launcher's process group,
# and records itself in ranks/rank-N.json; here every process is hung and ignores SIGTERM.
signal.signal(signal.SIGTERM, signal.SIG_IGN)
(folder / "ranks").mkdir(exist_ok=True)
for rank in (0, 1):
    hung = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                             "signal.SIG_IGN); time.sleep(3600)"], start_new_session=True)
    stat = Path(f"/proc/{hung.pid}/stat").read_text()
    started = stat[stat.rfind(")") + 2:].split()[19]
    (folder / "ranks" / f"rank-{rank}.json").write_text(json.dumps({"rank": rank, "pid": hung.pid,
                                                                     "pid_start": started}))
status = json.loads((folder / "status.json").read_text())
status.update(state="running", pid=os.getpid(), ranks_started=True)
(folder / "status.tmp").write_text(json.dumps(status))
os.replace(folder / "status.tmp", folder / "status.json")
while True:
    time.sleep(1)
"""


class HungRanksManager(RunManager):
    def child_command(self, run_id: str, resume: bool) -> list[str]:
        return [self.python, str(self.root.parent / "hung_ranks.py"), str(self.run_dir(run_id))]


def test_a_stop_that_ends_in_sigkill_also_ends_ranks_in_sessions_of_their_own(tmp_path, tiny_model_dir, qa_file):
    (tmp_path / "hung_ranks.py").write_text(HUNG_RANKS_CHILD)
    manager = HungRanksManager(tmp_path / "runs", stop_grace=0.2, term_grace=0.2)
    run_id = manager.start(tiny_run_config(tiny_model_dir, qa_file))
    wait_until(lambda: manager.status(run_id).get("ranks_started"), "the hung ranks started")
    ranks = [json.loads(p.read_text())["pid"] for p in (manager.run_dir(run_id) / "ranks").glob("rank-*.json")]
    try:
        manager.request_stop(run_id)
        final = wait_until(lambda: (s := manager.status(run_id))["state"] in FINAL_STATES and s, "the run ended")
        assert final["state"] == "stopped" and "SIGKILL" in final["error"]
        wait_until(lambda: not any(_proc_stat(pid) and not is_zombie(pid) for pid in ranks),
                   "no rank outlives the killed launcher (it would hold the device for the next job)", timeout=30)
    finally:
        for pid in ranks:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
