"""A Space many visitors share: the job queue (order, an app restart in the middle), owners through the real app's
API with the dev sign-in, per-visitor limits, deleting runs, the storage budget and a full disk.

The queued jobs here run a stand-in child (GATED_CHILD) through the run manager's own child mechanism: it trains
nothing and ends when the test releases it or presses Stop. The queue, the owners and the disk are what is tested;
a real training run per queued job would cost minutes (test_app_api.py queues one behind real training)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from finetune.core.access import AccessDenied, Visitor
from finetune.core.config import save_config, to_dict
from finetune.core.run_status import read_status, write_status
from finetune.core.storage import enforce_budget, folder_bytes, prunable
from finetune.services.admission import RunError
from finetune.services.compare import CompareQueue
from finetune.services.runs import RunManager

from helpers import app_client, served_app, tiny_run_config, wait_until

TESTS = Path(__file__).resolve().parent
GATED_CHILD = """
import json, os, sys, time
from pathlib import Path

folder = Path(sys.argv[1])


def write_status(**fields):  # finetune.core.run_status.write_status's contract
    status = json.loads((folder / "status.json").read_text())
    status.update(fields, updated_at=time.time())
    (folder / "status.tmp").write_text(json.dumps(status))
    os.replace(folder / "status.tmp", folder / "status.json")


started = time.time()
write_status(state="running", pid=os.getpid(), started_at=started, step=0, max_steps=1)
while not (folder / "RELEASE").exists():
    if (folder / "STOP").exists():
        write_status(state="stopped", finished_at=time.time())
        sys.exit(0)
    time.sleep(0.05)
write_status(state="completed", step=1, finished_at=time.time(), duration=round(time.time() - started, 3))
"""
ALICE = Visitor(name="alice", operator=False, sign_in=True)
BOB = Visitor(name="bob", operator=False, sign_in=True)


class GatedManager(RunManager):
    """The real RunManager whose child is GATED_CHILD instead of the trainer."""

    def child_command(self, run_id: str, resume: bool) -> list[str]:
        return [self.python, str(self.root.parent / "gated_child.py"), str(self.run_dir(run_id))]


@pytest.fixture
def root(tmp_path) -> Path:
    (tmp_path / "gated_child.py").write_text(GATED_CHILD)
    return tmp_path / "runs"


@pytest.fixture
def cfg(tiny_model_dir, qa_file):
    return tiny_run_config(tiny_model_dir, qa_file, max_steps=1)


def release(manager: RunManager, run_id: str) -> None:
    (manager.run_dir(run_id) / "RELEASE").touch()


def state_of(manager: RunManager, run_id: str) -> str:
    return manager.status(run_id).get("state", "")


# --- the queue ------------------------------------------------------------------------------------------------

def test_three_starts_run_in_order_and_an_app_restart_loses_no_queued_job(root, cfg, tmp_path):
    # The first app queues three jobs and exits (an app restart): its child keeps running, two jobs wait on disk.
    config = tmp_path / "job.yaml"
    save_config(cfg, config)
    script = (f"import sys; sys.path[:0] = [{str(TESTS)!r}, {str(TESTS.parent)!r}]\n"
              "from test_shared_space import GatedManager\nfrom finetune.core.config import load_config\n"
              f"manager = GatedManager({str(root)!r})\ncfg = load_config({str(config)!r})\n"
              "print(' '.join(manager.start(cfg, f'job-{n}') for n in (1, 2, 3)))\n")
    ids = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout.split()
    assert ids == ["job-1", "job-2", "job-3"]

    manager = GatedManager(root)  # the restarted app: it did not start job-1's child
    assert wait_until(lambda: state_of(manager, "job-1") == "running", "the first job runs")
    assert [state_of(manager, run_id) for run_id in ids[1:]] == ["waiting", "waiting"]
    second, third = manager.queue_info("job-2"), manager.queue_info("job-3")
    assert (second["position"], second["ahead"]) == (1, ["job-1"])
    assert (third["position"], third["ahead"]) == (2, ["job-1", "job-2"])
    assert third["starts_in"] is None  # nothing comparable has finished on this machine: no made-up estimate

    release(manager, "job-1")
    wait_until(lambda: state_of(manager, "job-2") == "running", "the second job starts once the first ends")
    assert state_of(manager, "job-3") == "waiting"
    # job-1 took a measured time per step; the same model's next jobs now get an expected start from it.
    assert isinstance(manager.queue_info("job-3")["starts_in"], float)
    release(manager, "job-2")
    wait_until(lambda: state_of(manager, "job-3") == "running", "the third job starts once the second ends")
    release(manager, "job-3")
    wait_until(lambda: state_of(manager, "job-3") == "completed", "the third job completes")

    started = [read_status(manager.run_dir(run_id))["started_at"] for run_id in ids]
    assert started == sorted(started) and all(state_of(manager, r) == "completed" for r in ids)


class ContendedLock:
    """The run manager's settle lock, telling the test when another thread has to wait for it."""

    def __init__(self) -> None:
        self.lock, self.contended = threading.RLock(), threading.Event()

    def __enter__(self) -> None:
        if not self.lock.acquire(blocking=False):
            self.contended.set()
            self.lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


class PolledWhileSpawning(GatedManager):
    """A page polls the job's status while the manager is starting its child (after 'queued' is on disk, before
    the child is known): the poll must wait for the start, not settle a child that does not exist yet."""

    polls: list[dict]

    def child_command(self, run_id: str, resume: bool) -> list[str]:
        poll = threading.Thread(target=lambda: self.polls.append(self.status(run_id)))
        poll.start()
        wait_until(lambda: self.polls or self._settle_lock.contended.is_set(), "the poll ran or waits for the start")
        return super().child_command(run_id, resume)


def test_a_page_polling_while_a_job_starts_neither_fails_it_nor_lets_the_next_job_start(root, cfg):
    manager = PolledWhileSpawning(root)
    manager._settle_lock, manager.polls = ContendedLock(), []
    first = manager.start(cfg, "first")
    wait_until(lambda: manager.polls, "the poll made during the start answered")
    assert manager.polls[0]["state"] in ("queued", "running"), manager.polls[0]
    second = manager.start(cfg, "second")
    assert state_of(manager, second) == "waiting"  # the first job holds the device
    release(manager, first)
    wait_until(lambda: state_of(manager, first) == "completed", "the first job completes")
    assert read_status(manager.run_dir(first)).get("error") is None
    manager.request_stop(second)
    wait_until(lambda: state_of(manager, second) in ("stopped", "cancelled", "completed"), "the second job ends")


def test_a_waiting_job_is_cancelled_by_its_owner_only_and_runs_are_deleted_by_their_owner_only(root, cfg):
    manager = GatedManager(root)
    running = manager.start(cfg, visitor=ALICE)
    waiting = manager.start(cfg, visitor=ALICE)
    wait_until(lambda: state_of(manager, running) == "running", "alice's first job runs")

    with pytest.raises(AccessDenied, match=f"run {waiting} is not one of yours"):  # no owner named
        manager.request_stop(waiting, BOB)
    with pytest.raises(AccessDenied, match=f"run {running} is not one of yours"):
        manager.delete(running, BOB)
    with pytest.raises(AccessDenied, match="run no-such-run is not one of yours"):  # the same words: nothing to probe
        manager.delete("no-such-run", BOB)
    with pytest.raises(RunError, match="stop it first"):
        manager.delete(running, ALICE)
    assert manager.request_stop(waiting, ALICE)["state"] == "cancelled"  # Stop on a waiting job: out of the queue

    manager.stop(running, timeout=60)
    assert state_of(manager, running) == "stopped"
    folder = manager.run_dir(running)
    assert manager.delete(running, ALICE) > 0 and not folder.exists()
    assert manager.delete(waiting, Visitor(name="carol", operator=True, sign_in=True)) >= 0  # an operator may


def test_a_comparison_whose_waiting_run_is_deleted_ends_instead_of_waiting_forever(root, cfg):
    manager = GatedManager(root)
    busy = manager.start(cfg, "busy", visitor=ALICE)
    queue = CompareQueue(manager, poll_seconds=0.05)
    comparison = queue.enqueue([{"technique": "lora", "config": to_dict(cfg)}], {}, ALICE)
    waiting = wait_until(lambda: queue.load(comparison)["items"][0]["run_id"], "the comparison's run is queued")
    assert state_of(manager, waiting) == "waiting"
    manager.delete(waiting, ALICE)  # the Train tab's Delete offers every run of hers, a waiting one too
    ended = wait_until(lambda: (s := queue.load(comparison))["state"] != "running" and s, "the comparison ended")
    assert ended["items"][0]["state"] == "cancelled" and "deleted" in ended["items"][0]["error"]
    release(manager, busy)


def test_stop_on_a_waiting_resume_leaves_the_run_stopped_and_resumable(root, cfg):
    from components.shared import stop_run

    manager = GatedManager(root)
    busy = manager.start(cfg, "busy", visitor=ALICE)
    trained = manager.run_dir("trained")
    (trained / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    (trained / "checkpoints" / "checkpoint-3" / "trainer_state.json").write_text("{}")
    save_config(cfg, trained / "config.yaml")
    write_status(trained, state="stopped", step=3, owner="alice")
    manager.resume("trained", ALICE)
    assert state_of(manager, "trained") == "waiting"
    after = manager.request_stop("trained", ALICE)  # Stop on the waiting resume: it leaves the queue
    assert after["state"] == "stopped" and "resume" in after["error"] and "never started" not in after["error"]
    manager.resume("trained", ALICE)  # its checkpoints are still there: it can be resumed again
    assert state_of(manager, "trained") == "waiting"
    assert "resume was cancelled" in stop_run(manager, "trained")  # what the Stop button says (sign-in off)
    assert state_of(manager, "trained") == "stopped"
    release(manager, busy)


def test_per_visitor_limits_refuse_with_the_setting_to_change(root, cfg, monkeypatch):
    monkeypatch.setenv("LORA_LAB_SIGN_IN", "dev")
    monkeypatch.setenv("LORA_LAB_MAX_JOBS", "1")
    monkeypatch.setenv("LORA_LAB_MAX_STEPS", "5")
    manager = GatedManager(root)
    first = manager.start(cfg, visitor=ALICE)
    with pytest.raises(RunError, match="You already have 1 job.*LORA_LAB_MAX_JOBS"):
        manager.start(cfg, visitor=ALICE)
    cfg.training.max_steps = 50
    with pytest.raises(RunError, match="50 steps is more than the 5.*LORA_LAB_MAX_STEPS"):
        manager.start(cfg, visitor=BOB)
    cfg.training.max_steps = -1  # by epochs: the step count is unknown, so a step limit cannot be checked
    with pytest.raises(RunError, match="set Max steps"):
        manager.start(cfg, visitor=BOB)
    with pytest.raises(AccessDenied, match="Sign in"):
        manager.start(cfg, visitor=Visitor(name=None, operator=False, sign_in=True))
    operator = Visitor(name="carol", operator=True, sign_in=True)
    assert manager.start(cfg, visitor=operator)  # operators are not limited; it waits behind alice's job
    assert [r for r in manager.list_ids() if manager.owner_of(r) == "alice"] == [first]
    for run_id in manager.list_ids():
        manager.request_stop(run_id)
        (manager.run_dir(run_id) / "RELEASE").touch()


# --- the disk ---------------------------------------------------------------------------------------------------

def _finished_run(root: Path, name: str, state: str, age: float, **parts: int) -> Path:
    """A run folder as training and the Export tab leave it: parts are subfolders with a file of that many bytes."""
    folder = root / name
    for part, size in parts.items():
        (folder / part).mkdir(parents=True)
        (folder / part / "weights.bin").write_bytes(b"\0" * size)
    write_status(folder, state=state, owner="alice")
    stamp = time.time() - age
    for path in [folder, *folder.rglob("*")]:
        os.utime(path, (stamp, stamp))
    return folder


def test_pruning_under_a_small_budget_keeps_adapters_resumable_runs_and_the_feedback_db(tmp_path):
    root, mb = tmp_path / "runs", 1024 * 1024
    old = _finished_run(root, "old", "completed", 300, checkpoints=3 * mb, merged=2 * mb, adapter=mb)
    new = _finished_run(root, "new", "completed", 100, checkpoints=3 * mb, export=mb, adapter=mb)
    paused = _finished_run(root, "paused", "stopped", 400, checkpoints=3 * mb, adapter=mb)
    (root / "feedback.db").write_bytes(b"\0" * mb)
    kinds = {(item.run_id, item.kind) for item in prunable(root)}
    assert kinds == {("old", "checkpoints"), ("old", "merged model"), ("new", "checkpoints"),
                     ("new", "export files")}  # the stopped run resumes from its checkpoints: not prunable

    removed = enforce_budget(root, budget=12 * mb)  # 16 MB held: at least 4 MB of rebuildable things must go
    assert [(item.run_id, item.kind) for item in removed] == [("old", "checkpoints"), ("old", "merged model")]
    assert folder_bytes(root) <= 12 * mb
    assert not (old / "checkpoints").exists() and not (old / "merged").exists()
    assert (new / "checkpoints").exists() and (paused / "checkpoints").exists()
    for kept in (old / "adapter", new / "adapter", paused / "adapter", root / "feedback.db"):
        assert kept.exists(), kept

    enforce_budget(root, budget=1)  # an impossible budget: only rebuildable things ever go
    assert all((run / "adapter").exists() for run in (old, new, paused)) and (root / "feedback.db").exists()
    assert (paused / "checkpoints").exists()


def test_a_start_prunes_to_the_budget_and_a_full_disk_is_refused_before_anything_is_kept(root, cfg, monkeypatch):
    manager = GatedManager(root)
    old = _finished_run(root, "old", "completed", 300, checkpoints=2 * 1024 * 1024, adapter=1024)
    monkeypatch.setenv("LORA_LAB_STORAGE_BUDGET", "1MB")
    run_id = manager.start(cfg)
    assert not (old / "checkpoints").exists() and (old / "adapter").exists()
    manager.stop(run_id, timeout=60)

    monkeypatch.setenv("LORA_LAB_MIN_FREE", "100000TB")  # a disk with less free than the operator's minimum
    before = set(manager.list_ids())
    with pytest.raises(RunError, match="Not enough free disk to start a run.*LORA_LAB_MIN_FREE"):
        manager.start(cfg)
    assert set(manager.list_ids()) == before


# --- two visitors through the real app ------------------------------------------------------------------------

@pytest.fixture
def shared_app(root, monkeypatch):
    monkeypatch.setenv("LORA_LAB_SIGN_IN", "dev")
    monkeypatch.setenv("LORA_LAB_OPERATORS", "carol")
    with served_app(root) as url:
        yield url


def signed_in(url: str, user: str | None):
    """A gradio_client for one visitor: the session cookie the dev sign-in gives (none: signed out)."""
    if user is None:
        return app_client(url)
    answer = httpx.get(f"{url}dev-sign-in?user={user}", follow_redirects=False)
    assert answer.status_code == 303
    return app_client(url, headers={"Cookie": f"session={answer.cookies['session']}"})


def test_a_visitor_cannot_stop_resume_delete_or_see_another_visitors_run(shared_app, root, cfg):
    alice, bob, carol = (signed_in(shared_app, name) for name in ("alice", "bob", "carol"))
    jobs = GatedManager(root)  # alice's job, started as the app would for her (a stand-in child: see the top)
    run_id = jobs.start(cfg, visitor=ALICE)
    wait_until(lambda: state_of(jobs, run_id) == "running", "alice's job runs")

    refused = bob.predict(run_id, api_name="/stop_run")
    assert "not one of yours" in refused and "alice" not in refused and state_of(jobs, run_id) == "running"
    assert bob.predict("no-such-run", api_name="/stop_run") == refused.replace(run_id, "no-such-run")
    watched, text, *_ = bob.predict(run_id, api_name="/poll_run")
    assert watched == "" and "No runs yet" in text  # not even its progress or log
    table, *_ = bob.predict(None, api_name="/run_history")
    assert run_id not in str(table)
    watched, text, *_ = alice.predict("", api_name="/poll_run")
    assert watched == run_id and "running" in text  # her own live job re-attaches on her page

    assert "Stop requested" in alice.predict(run_id, api_name="/stop_run")
    wait_until(lambda: state_of(jobs, run_id) == "stopped", "alice's stop ends it")
    for api in ("/resume_run", "/ask_delete", "/delete_run"):
        answer = bob.predict(run_id, api_name=api)
        assert "not one of yours" in str(answer) and "alice" not in str(answer), (api, answer)
        assert str(bob.predict("no-such-run", api_name=api)) == str(answer).replace(run_id, "no-such-run"), api
    assert jobs.run_dir(run_id).is_dir()

    table, *_ = carol.predict(None, api_name="/run_history")  # the operator sees every run, with its owner
    assert run_id in str(table) and "alice" in str(table)
    signed_out = signed_in(shared_app, None)
    _, message = signed_out.predict(data_file=None, api_name="/start_run")
    assert "Not started" in message and "Sign in" in message
    assert "Deleted" in str(alice.predict(run_id, api_name="/delete_run"))
    assert not jobs.run_dir(run_id).exists()


# --- who is who ------------------------------------------------------------------------------------------------

def test_sign_in_settings_and_sessions(monkeypatch):
    from finetune.core.access import LOCAL, dev_session, sign_in_mode, visitor_from_session

    for name in ("LORA_LAB_SIGN_IN", "SPACE_ID", "OAUTH_CLIENT_ID"):
        monkeypatch.delenv(name, raising=False)
    assert sign_in_mode() == "off" and visitor_from_session(dev_session("alice")) == LOCAL  # python app.py
    monkeypatch.setenv("SPACE_ID", "someone/lora-lab")
    assert sign_in_mode() == "off"  # a Space without hf_oauth: no sign-in to use
    monkeypatch.setenv("OAUTH_CLIENT_ID", "abc")  # Spaces sets it when the front matter says hf_oauth: true
    assert sign_in_mode() == "huggingface"
    monkeypatch.setenv("LORA_LAB_SIGN_IN", "dev")
    with pytest.raises(ValueError, match="refused on a Space"):  # anyone could claim any name there
        sign_in_mode()
    monkeypatch.delenv("SPACE_ID")
    monkeypatch.setenv("LORA_LAB_OPERATORS", "Carol, dave")
    carol = visitor_from_session(dev_session("carol"))
    assert carol.name == "carol" and carol.operator and carol.token == "dev-token-carol"
    assert "dev-token" not in repr(carol)  # a token never reaches a log line
    expired = {**dev_session("alice"), "expires_at": time.time() - 1}
    assert visitor_from_session(expired).name is None and visitor_from_session(None).name is None
    with pytest.raises(ValueError):
        dev_session("../etc")


def test_on_a_space_the_page_gets_gradios_sign_in_with_hugging_face(tmp_path, monkeypatch):
    """On a Space with hf_oauth: true, Spaces sets SPACE_ID and the OAuth client settings; they are set here by hand
    (Spaces sign-in cannot run on this machine), and no sign-in is completed. The page must carry gradio's
    LoginButton, so gradio adds its real OAuth routes, and never the dev stand-in."""
    import gradio.oauth

    from app import build_app
    from components.sign_in import app_kwargs

    monkeypatch.delenv("LORA_LAB_SIGN_IN", raising=False)
    monkeypatch.setenv("SPACE_ID", "someone/lora-lab")
    monkeypatch.setenv("SYSTEM", "spaces")
    monkeypatch.setenv("OAUTH_CLIENT_ID", "client-id")
    for name, value in (("OAUTH_CLIENT_ID", "client-id"), ("OAUTH_CLIENT_SECRET", "secret"),
                        ("OAUTH_SCOPES", "openid profile write-repos manage-repos"),
                        ("OPENID_PROVIDER_URL", "https://huggingface.co")):
        monkeypatch.setattr(gradio.oauth, name, value)  # gradio read them from the environment at import
    demo = build_app(str(tmp_path / "runs"))
    try:
        routes = {getattr(route, "path", "") for route in demo.app.routes}
        assert demo.expects_oauth and {"/login/huggingface", "/login/callback"} <= routes
        assert app_kwargs() == {} and "/dev-sign-in" not in routes
    finally:
        demo.feedback_store.close()


def test_the_train_tab_shows_a_waiting_jobs_place_and_its_cancel(root, cfg):
    from components.train_runs import poll_run

    manager = GatedManager(root)
    first, second = manager.start(cfg), manager.start(cfg)
    wait_until(lambda: state_of(manager, first) == "running", "the first job runs")
    watched, text, bar, *_ = poll_run(manager, second)
    assert watched == second and "**waiting** in the job queue: 2nd in line" in text
    assert "data-state='waiting'" in bar and "no time estimate" in bar
    manager.request_stop(second)
    watched, text, *_ = poll_run(manager, second)
    assert watched == first  # a live run is shown while there is one
    release(manager, first)
    wait_until(lambda: state_of(manager, first) == "completed", "the first job completes")
    assert "was **cancelled** while it waited" in poll_run(manager, second)[1]


def test_the_rlhf_tab_shows_a_waiting_stages_place_in_the_queue(root, cfg):
    from components.rlhf_runs import poll_rlhf

    manager = GatedManager(root)
    first, second = manager.start(cfg), manager.start(cfg)
    write_status(manager.run_dir(second), stage="reward")  # what the RLHF tab's start records at once
    wait_until(lambda: state_of(manager, first) == "running", "the first job runs")
    watched, _, bar, *_ = poll_rlhf(manager, "", "")
    assert watched == second and "data-state='waiting'" in bar
    assert "2nd in line" in bar and "starts when the job ahead finishes" in bar, bar  # not "starting"
    manager.request_stop(second)
    release(manager, first)
    wait_until(lambda: state_of(manager, first) == "completed", "the first job completes")


def test_the_expected_start_is_the_running_jobs_eta_and_none_while_an_evaluation_is_untimed(root, cfg):
    manager = GatedManager(root)
    first, second = manager.start(cfg), manager.start(cfg)
    wait_until(lambda: state_of(manager, first) == "running", "the first job runs")
    folder = manager.run_dir(first)
    write_status(folder, eta_seconds=42.0, evals_untimed=1)  # as the trainer writes it before its first evaluation
    assert manager.queue_info(second)["starts_in"] is None  # its ETA leaves the evaluation out: no number
    write_status(folder, eta_seconds=42.0, evals_untimed=0)
    assert manager.queue_info(second)["starts_in"] == 42.0
    release(manager, first)
    wait_until(lambda: state_of(manager, second) == "running", "the second job starts")
    release(manager, second)


class BrokenJobManager(GatedManager):
    """A job named 'broken' cannot be started (its child cannot be spawned); every other one runs GATED_CHILD."""

    def child_command(self, run_id: str, resume: bool) -> list[str]:
        if run_id.startswith("broken"):
            raise OSError("no such interpreter")
        return super().child_command(run_id, resume)


def test_a_job_that_cannot_start_fails_with_its_reason_and_the_next_one_starts(root, cfg):
    manager = BrokenJobManager(root)
    first = manager.start(cfg, "first")
    manager.start(cfg, "broken")
    manager.start(cfg, "third")
    wait_until(lambda: state_of(manager, first) == "running", "the first job runs")
    release(manager, first)
    wait_until(lambda: state_of(manager, "third") == "running", "the job after the broken one starts")
    broken = manager.status("broken")
    assert broken["state"] == "failed" and "could not start: OSError: no such interpreter" in broken["error"]
    release(manager, "third")


def test_two_managers_on_one_folder_start_a_waiting_job_once(root, cfg):
    """Two app processes (or the app and the CLI) on one runs folder: the queue's file lock lets one start it."""
    from concurrent.futures import ThreadPoolExecutor

    managers = [GatedManager(root) for _ in range(2)]  # both up before the job is queued, as two processes
    folder = root / "job"
    folder.mkdir(parents=True)
    save_config(cfg, folder / "config.yaml")
    write_status(folder, state="waiting", enqueued_at=time.time(), step=0)
    with ThreadPoolExecutor(2) as pool:
        started = list(pool.map(lambda m: m.dispatch(), managers))
    assert started.count("job") == 1 and read_status(folder)["state"] in ("queued", "running")
    release(managers[0], "job")
    wait_until(lambda: read_status(folder)["state"] == "completed", "the one job completes")


def test_a_job_being_started_is_not_taken_for_dead_before_its_pid_is_on_disk(root, cfg):
    manager = GatedManager(root)
    folder = root / "starting"
    folder.mkdir(parents=True)
    write_status(folder, state="queued", dequeued_at=time.time())  # another process is spawning its child
    assert manager.status("starting")["state"] == "queued" and manager.active_run() == "starting"
    write_status(folder, dequeued_at=time.time() - 3600)  # an hour later still no pid: that start died
    assert manager.status("starting")["state"] == "interrupted"


def test_pruning_leaves_what_an_export_is_still_writing(tmp_path):
    root, mb = tmp_path / "runs", 1024 * 1024
    run = _finished_run(root, "run", "completed", 300, merged=2 * mb, export=2 * mb, adapter=mb)
    (run / "merged.partial").mkdir()  # a merge replacing merged/ is under way
    (run / "export" / "run-adapter.zip.partial").write_bytes(b"\0")  # and a zip is being written
    assert enforce_budget(root, budget=1) == [] and (run / "merged").exists() and (run / "export").exists()
