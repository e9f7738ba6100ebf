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

from helpers import app_client, loopback_tls, tiny_run_config, wait_until

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
    from components.train_runs import poll_run, run_history
    from finetune.core.run_status import read_status
    from finetune.services.runs import RunManager

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
    from components.train_runs import poll_run, run_history
    from finetune.core.run_status import write_status
    from finetune.services.runs import RunManager

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

    with caplog.at_level(logging.WARNING, logger="finetune.core.run_folder"):
        for _ in range(2):
            assert set(manager.list_ids()) == {"good-run", "not-json"}
            poll = poll_run(manager, "")
            assert poll[0] in ("good-run", "not-json"), poll
            assert set(run_history(manager)[0]["run id"]) == {"good-run", "not-json"}
    skipped = [r.getMessage() for r in caplog.records if r.name == "finetune.core.run_folder"]
    for name in ("linked", "dangling", "bad name!", "status-is-a-folder"):
        assert sum(message.startswith(f"Skipping {name} ") for message in skipped) == 1, skipped
    assert not any("stray.txt" in message for message in skipped)  # a plain file is simply not a run
    assert os.path.isdir(elsewhere)  # nothing was followed or removed


def _visiting(name: str):
    """A stand-in for gr.Request: what components.shared.visitor_of reads (the dev sign-in's session)."""
    from types import SimpleNamespace

    from finetune.core.access import dev_session

    return SimpleNamespace(scope={"session": {"oauth_info": dev_session(name)}}, session_hash=f"s-{name}",
                           username=None)


def test_stopping_a_comparison_reads_the_same_whether_it_is_someone_elses_or_not_there(tmp_path, monkeypatch):
    """A running comparison of alice's: bob's Stop learns neither its state nor its owner, only what a made-up id
    gets; the operator's Stop gets through."""
    from components.shared import stop_queue
    from finetune.services.compare import CompareQueue
    from finetune.services.runs import RunManager

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


def _tiny_rows_csv(path: Path, rows: int, bad_line_at: int | None = None) -> Path:
    """A CSV of short two-column rows (the shape that kept the old preview busy for minutes), optionally with one
    malformed line (three fields) at a given row."""
    lines = ["prompt,completion\n"] + [f"q{i},a{i}\n" for i in range(rows)]
    if bad_line_at is not None:
        lines[bad_line_at] = "x,y,z\n"
    path.write_text("".join(lines), encoding="utf-8")
    return path


def test_a_big_uploads_preview_reads_a_bounded_sample_while_another_visitor_is_answered(tmp_path):
    """Two visitors: one previews a 6 MB upload of 700,000 tiny rows, the other the bundled data at the same time.
    Both are answered; the big one says it read a sample and how many rows the file has about."""
    from gradio_client import handle_file

    from helpers import served_app

    big = _tiny_rows_csv(tmp_path / "tiny-rows.csv", 700_000)
    with served_app(tmp_path / "runs") as url:
        uploader, other = app_client(url), app_client(url)
        big_job = uploader.submit(data_kind="Uploaded file", data_file=handle_file(str(big)), model_kind="Local folder",
                                  model_source=str(tmp_path / "no-model"), api_name="/preview_data")
        bundled_job = other.submit(data_kind="Bundled", data_file=None, api_name="/preview_data")
        bundled_text, bundled_table = bundled_job.result()
        big_text, big_table = big_job.result()
    assert "in the source" in bundled_text and len(bundled_table["data"]) > 0, bundled_text
    assert "**Rows:** a sample, the first 2,000 of about " in big_text, big_text
    about = int(big_text.split("of about ")[1].split(" rows")[0].replace(",", ""))
    assert 350_000 < about < 1_400_000  # an estimate from the sample's bytes per row, within a factor of two
    assert "the run reads and checks all of it when it starts" in big_text
    assert [row[1:] for row in big_table["data"][:2]] == [["user", "q0"], ["assistant", "a0"]]


def test_starts_checks_read_the_files_beginning_and_the_training_child_checks_the_rest(tmp_path):
    """A malformed line past the part a request reads: Start's check lets the file through, the full read (what
    the training child does) refuses it with the line's number; one in the first part is refused at once."""
    import pytest

    from finetune.core.config import DataConfig
    from finetune.core.data import SAMPLE_ROWS, MalformedRowsError, check_file, prepare

    late = _tiny_rows_csv(tmp_path / "late.csv", 300_000, bad_line_at=250_000)
    assert check_file(late) == "csv"
    with pytest.raises(MalformedRowsError, match="line 250001 has 3 field"):
        prepare(DataConfig(source=str(late)))
    early = _tiny_rows_csv(tmp_path / "early.csv", 300_000, bad_line_at=SAMPLE_ROWS // 2)
    with pytest.raises(MalformedRowsError, match=f"line {SAMPLE_ROWS // 2 + 1} has 3 field"):
        check_file(early)


NOT_NUMBERS = (float("nan"), float("inf"), float("-inf"), "abc", [1, 2])


def _call_raw(url: str, api_name: str, data: list) -> tuple[str, str]:
    """One call of gradio's HTTP API with a body gradio_client cannot send (JSON's NaN and Infinity): the last
    server-sent event's kind ('complete', 'error') and data."""
    import json

    import httpx

    body = json.dumps({"data": data}, allow_nan=True)
    posted = httpx.post(f"{url}gradio_api/call{api_name}", content=body, verify=loopback_tls(),
                        headers={"Content-Type": "application/json"}, timeout=600)
    posted.raise_for_status()
    answer = httpx.get(f"{url}gradio_api/call{api_name}/{posted.json()['event_id']}", timeout=600,
                       verify=loopback_tls())
    events = [line.split(": ", 1) for line in answer.text.splitlines() if line.startswith(("event:", "data:"))]
    kinds = [value for key, value in events if key == "event"]
    payloads = [value for key, value in events if key == "data"]
    return kinds[-1], payloads[-1]


def test_every_number_field_of_every_endpoint_refuses_what_is_not_a_number_by_name(tmp_path, capfd):
    """Through the API, each named endpoint's number and slider inputs get NaN, ±inf, text and a list (the other
    inputs keep their defaults): each call is refused with the field's label (never gradio's bare 'Error'), and
    the app logs no traceback. /like_left and /like_right without a like event refuse clearly."""
    from gradio_client.exceptions import AppError

    from helpers import served_app

    with served_app(tmp_path / "runs") as url:
        client = app_client(url)
        endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
        tried = 0
        for api_name, info in endpoints.items():
            parameters = info["parameters"]
            if any(not p.get("parameter_has_default") for p in parameters):
                continue  # only endpoints whose every input has a default: the others keep theirs
            defaults = [p.get("parameter_default") for p in parameters]
            for index, parameter in enumerate(parameters):
                if parameter["component"] not in ("Number", "Slider"):
                    continue
                for value in NOT_NUMBERS:
                    kind, message = _call_raw(url, api_name, defaults[:index] + [value] + defaults[index + 1:])
                    assert kind == "error" and ": type a" in message and "number" in message, \
                        (api_name, parameter["label"], value, kind, message)
                    tried += 1
        like = [name for name in ("/like_left", "/like_right") if name in endpoints]
        for api_name in like:
            try:
                client.predict(api_name=api_name)
            except AppError as error:
                assert "press 👍 or 👎 under it" in str(error), error
            else:
                raise AssertionError(f"{api_name} accepted a call without a like event")
    assert tried >= 50, tried  # the number fields of the endpoints whose inputs all have defaults
    assert like == ["/like_left", "/like_right"]
    assert "Traceback" not in capfd.readouterr().err


# Endpoints whose valid defaults start long work (training, a comparison or sweep, measuring quantization, a
# benchmark): their starts are tested where that work is (test_train_tab, test_compare, test_quant, ...).
STARTS_LONG_WORK = {"/start_run", "/sweep_start", "/compare_start", "/quantize_compare", "/course_quantize",
                    "/course_qlora", "/course_reward", "/course_dpo", "/benchmark_start", "/rlhf_start_reward",
                    "/rlhf_start_policy", "/lab_start_run"}
TEXT_TO_ASK = {"prompt", "answer_a", "answer_b", "comment"}  # text boxes that take a question or an answer


def _valid_value(parameter: dict) -> object:
    """The parameter's documented default, else a valid value a visitor could send with nothing trained yet: the
    first of a fixed choice, 'hi' for a question or an answer, nothing for a pick or a file, '' for other text."""
    import ast

    if parameter.get("parameter_has_default"):
        return parameter.get("parameter_default")
    kind = parameter["python_type"]["type"]
    if kind.startswith("Literal[") and kind != "Literal[]":
        return ast.literal_eval(f"[{kind[len('Literal['):-1]}]")[0]
    if parameter["component"] == "Textbox":
        return "hi" if parameter["parameter_name"] in TEXT_TO_ASK else ""
    return None


def test_every_named_endpoint_with_valid_values_answers_or_refuses_in_words(tmp_path, capfd):
    """Issue 32: every named endpoint of the app, found from its API (so a new one is swept without editing the
    test), called through gradio's HTTP API with its documented defaults and valid values for the rest, on an app
    with no run yet: each answers, or refuses with a message (never gradio's bare error, whose data is null), and
    the app logs no traceback. Endpoints whose valid defaults would start long work are left out (STARTS_LONG_WORK)."""
    import json


    from helpers import served_app

    with served_app(tmp_path / "runs") as url:
        endpoints = app_client(url).view_api(return_format="dict", print_info=False)["named_endpoints"]
        answers = {}
        for api_name, info in endpoints.items():
            if api_name in STARTS_LONG_WORK:
                continue
            kind, data = _call_raw(url, api_name, [_valid_value(p) for p in info["parameters"]])
            answers[api_name] = kind
            error = json.loads(data)  # gradio's error_payload: {"error": message}, None for a bare error
            message = error.get("error") if isinstance(error, dict) else error
            assert kind == "complete" or (kind == "error" and message and message != "Error"), (api_name, kind, data)
    assert len(answers) >= 60 and set(STARTS_LONG_WORK) <= set(endpoints), (len(answers), sorted(endpoints))
    assert "complete" in answers.values() and "error" in answers.values()  # both ways were exercised
    assert "Traceback" not in capfd.readouterr().err


def test_the_dev_sign_in_on_a_space_refuses_to_start_in_one_sentence(tmp_path):
    import subprocess
    import sys

    from helpers import ROOT

    env = {**os.environ, "SPACE_ID": "someone/lora-lab", "LORA_LAB_SIGN_IN": "dev", "LORA_LAB_RUNS": str(tmp_path)}
    done = subprocess.run([sys.executable, "app.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    lines = [line for line in done.stderr.splitlines() if "LoRA Lab" in line or "Traceback" in line]
    assert done.returncode != 0 and lines == [
        "LoRA Lab did not start: LORA_LAB_SIGN_IN=dev lets anyone claim any name; it is refused on a Space. Use "
        "'huggingface' (hf_oauth: true in spaces_config.yaml)."], done.stderr
