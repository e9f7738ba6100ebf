"""`python app.py` itself, as an operator starts it: the environment it reads (port, host, runs folder, feedback
database), the production queue, and a readable app log. Started as a child process and answered over HTTP."""

import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from helpers import app_client, wait_until

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture
def served_app(tmp_path):
    port, log = free_port(), tmp_path / "app.log"
    env = {**os.environ, "LORA_LAB_PORT": str(port), "LORA_LAB_HOST": "127.0.0.1",
           "LORA_LAB_RUNS": str(tmp_path / "my-runs"), "LORA_LAB_FEEDBACK_DB": str(tmp_path / "votes.db")}
    with open(log, "w") as out:
        child = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        def up() -> bool:  # the server answers, or the child has died
            assert child.poll() is None, f"app.py exited with {child.returncode}:\n{log.read_text()}"
            return answers(url)

        wait_until(up, "app.py answering", every=0.5)
        yield url, tmp_path, log
    finally:
        child.terminate()
        child.wait()


def test_app_main_serves_with_the_environment_it_is_given(served_app):
    url, tmp_path, log = served_app
    client = app_client(url)
    # The runs folder and the feedback database are where the environment said, not ./runs.
    assert (tmp_path / "votes.db").is_file()
    assert (tmp_path / "my-runs").is_dir()
    # A handler runs through the production queue and answers.
    assert "Example" in client.predict("smollm2-135m-instruct", 8, 16, "all-linear", 4, "nf4", True,
                                    "paged_adamw_8bit", "default", api_name="/lora_aid")
    # An expected refusal reaches the client as its message and the log as one line, not a traceback.
    with pytest.raises(Exception, match="Pick a finished run first"):
        client.predict(None, api_name="/export_zip")
    text = log.read_text()
    assert "refused:" in text and "Traceback" not in text
    assert "kernels-community" not in text  # a known, harmless library message stays out of the log


def test_the_queue_idles_at_lora_labs_intervals_and_gradio_reads_them():
    """gradio's queue looks for work every 1 ms when it has none (an idle app used ~5% of a core); calm_queue sets
    the two intervals it reads (bench/idle_app.py measures the CPU it saves). Were they renamed in a gradio release,
    setting them would silently do nothing: the queue's own loops must read them."""
    import inspect

    import gradio as gr
    from gradio.queueing import Queue

    from components.shared import PROGRESS_IDLE_SECONDS, QUEUE_IDLE_SECONDS, calm_queue

    with gr.Blocks() as page:
        gr.Textbox()
    queue = page.queue()._queue
    assert (queue.sleep_when_free, queue.progress_update_sleep_when_free) < (QUEUE_IDLE_SECONDS, PROGRESS_IDLE_SECONDS)
    calm_queue(page)
    assert (queue.sleep_when_free, queue.progress_update_sleep_when_free) == (QUEUE_IDLE_SECONDS, PROGRESS_IDLE_SECONDS)
    assert "asyncio.sleep(self.sleep_when_free)" in inspect.getsource(Queue.start_processing)
    assert "asyncio.sleep(self.progress_update_sleep_when_free)" in inspect.getsource(Queue.start_progress_updates)


def test_timers_tick_only_on_the_open_tab_and_one_event_answers_a_page_load(tmp_path, monkeypatch, caplog):
    """Selecting any tab runs one browser-side switch over every timer of the app (runs, sweeps, comparisons,
    benchmarks, RLHF, the course), each named by the label of the tab it sits in. (What the switch does in a page,
    that only the open tab's timers tick, reloads and quick clicks included, is in
    tests/browser/test_browser_first_screen.py.) Every tab's page-load handler is in one load event: a tab that
    called page.load itself would bring back the per-event cost (bench/page_load.py)."""
    import json
    import logging

    import gradio as gr

    from app import build_app, close_app
    from components.shared import timers_in

    demo = build_app(str(tmp_path / "runs"))
    try:
        tabs = [block for block in demo.blocks.values() if isinstance(block, gr.Tab)]
        everyone = [block for block in demo.blocks.values() if isinstance(block, gr.Timer)]
        assert len(tabs) == 9 and len(everyone) >= 6
        owners = [next(tab.label for tab in tabs if timer in timers_in(tab)) for timer in everyone]
        assert sorted(set(owners)) == ["Compare", "Evaluate", "RLHF", "Start here", "Train"]
        switches = {fn.js for fn in demo.fns.values() if fn.fn is None and fn.outputs == everyone
                    and [target[1] for target in fn.targets] == ["select"]}
        assert len(switches) == 1  # the same switch on every tab
        switch = switches.pop()
        assert json.dumps(owners) in switch and "aria-selected" in switch
        assert sum(fn.fn is None and fn.outputs == everyone for fn in demo.fns.values()) == len(tabs)
        loads = [fn for fn in demo.fns.values() if any(target[1] == "load" for target in fn.targets)]
        assert len(loads) == 1 and len(loads[0].outputs) > 100
        # Every handler answers a first visit's page (the form's values as built), none fails (a failure would only
        # be logged and warned of, the others' components filled).
        warned: list[str] = []
        monkeypatch.setattr(gr, "Warning", warned.append)
        with caplog.at_level(logging.ERROR, logger="lora_lab"):
            answers = loads[0].fn(*[block.value for block in loads[0].inputs], None)
        assert not warned and not caplog.records, (warned, caplog.text)
        skipped = [answer for answer in answers if isinstance(answer, dict) and answer == gr.skip()]
        # (The Train form's 56 fields stay as built on a first visit: no run of the visitor's to restore.)
        assert len(answers) == len(loads[0].outputs) and len(answers) - len(skipped) > 50
    finally:
        close_app(demo)


def test_known_library_noise_is_dropped_or_said_once(caplog):
    """The messages finetune.core.noise names: the int8 cast note once (it came 4,200 times from one measurement),
    the deprecation warnings peft triggers on every forward not at all; anything else still gets through."""
    import logging
    import warnings

    from finetune.core.noise import OncePerMessage, quiet_known_noise

    quiet_known_noise()
    quiet_known_noise()  # entry points may call it twice: still one filter
    cast = logging.getLogger("bitsandbytes.autograd._functions")
    once = [f for f in cast.filters if isinstance(f, OncePerMessage)]
    assert len(once) == 1
    once[0].seen.clear()  # an earlier test in this process may have said it already: start this one afresh
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            cast.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", "torch.float32")
        cast.warning("some other bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == [
        "MatMul8bitLt: inputs will be cast from torch.float32 to float16 during quantization",
        "some other bitsandbytes warning"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FutureWarning)  # pytest.ini ignores FutureWarning: show them here...
        quiet_known_noise()  # ...except the known ones, whose filters go in front again
        warnings.warn("MatmulLtState.CxB is deprecated and will be removed in the next release.", FutureWarning)
        warnings.warn("something else changed", FutureWarning)
    assert [str(w.message) for w in caught] == ["something else changed"]


def test_library_progress_bars_stay_out_of_the_logs():
    """A terminal progress bar redraws with carriage returns; in app.log or train.log it became one line of many
    kilobytes ("Loading weights: ...%|"). The entry points turn them off before the libraries load."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("DISABLE_PROGRESS_BARS")}
    code = ("from finetune.core.noise import quiet_known_noise; quiet_known_noise(); import datasets, transformers; "
            "print(transformers.utils.logging.is_progress_bar_enabled(), "
            "datasets.utils.logging.is_progress_bar_enabled())")
    shown = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                           cwd=Path(__file__).resolve().parent.parent).stdout.split()
    assert shown == ["False", "False"]
