"""Helpers the tests share: a tiny model and run config, data files, the one waiting helper, the app served on a
loopback port, and the headless Chromium page. Fixtures live in conftest.py; tests import these from here."""

from __future__ import annotations

import contextlib
import functools
import json
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

# The app's modules (gradio, torch, transformers: ~15 s of CPU) are imported where a helper needs them, not here:
# conftest imports this module, and pytest-xdist's controller loads conftest but runs no test.
ROOT = Path(__file__).resolve().parent.parent


def save_tiny_llama(folder: Path, tokenizer_dir: Path, hidden: int = 64, intermediate: int = 128,
                    initializer_range: float = 0.02) -> Path:
    """A 2-layer random Llama with the embedded tokenizer, saved as a 'local folder' model. With the default
    initializer range its random output embeddings keep every token near-uniform (loss stays at ~10.5); a larger
    one (0.3) spreads the logits so LoRA can learn, and overfit, within a few steps."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from finetune.core.models import save_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         initializer_range=initializer_range)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
    return folder


def train_lab_note_run(folder: Path, model_dir: Path) -> Path:
    """A real 4-step QLoRA run of ``model_dir`` (4-bit base) on 24 'Lab note' rows, in ``folder / "run"``: what the
    export tests (zip, merge, GGUF) take away."""
    from finetune.train import run

    rows = [{"prompt": f"What does setting {i} control?", "completion": f"🧪 Lab note: setting {i}."}
            for i in range(24)]
    data = write_jsonl(folder / "qa.jsonl", rows)
    cfg = tiny_run_config(model_dir, data, max_steps=4, learning_rate=0.05, eval_steps=2)
    assert run(cfg, folder / "run") == 0
    return folder / "run"


def copy_run(run_dir: Path, into: Path) -> Path:
    """A copy of a finished run under ``into`` (same run folder name), for a test that writes into it; its config
    still names the same model and data file."""
    target = into / run_dir.name
    shutil.copytree(run_dir, target)
    return target


def wait_until(check: Callable[[], Any], what: str, timeout: float = 600.0, every: float = 0.1) -> Any:
    """Poll until check() is truthy and return its value. The deadline only turns a hang into a failure that says
    what never happened: it is far above the time the condition normally takes (the suite's per-test timeout is
    the last guard)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened within {timeout:.0f} s: {what}")
        time.sleep(every)


@functools.cache
def loopback_tls() -> Any:
    """One TLS context for every HTTP client of the suite. httpx builds a new one for each request it is not given
    one for (reading the whole CA bundle: ~25 ms of CPU), and gradio_client sends each call through new httpx
    clients: two contexts per call, a third of the CPU of an API-heavy test, for loopback calls that never use TLS."""
    import httpx

    return httpx.create_ssl_context()


def app_client(url: str, **options: Any) -> Any:
    """A gradio_client Client that waits for a busy app: its first request reads the API of 80-odd endpoints, and
    httpx's 5 s default timed out on a loaded 2-core machine (a test failed before it began)."""
    from gradio_client import Client

    # ssl_verify goes to each httpx call as its `verify`: a context there is used as it is (gradio_client's hint
    # says bool; it only forwards the value).
    return Client(url, verbose=False, httpx_kwargs={"timeout": 120}, ssl_verify=loopback_tls(), **options)


def wait_for_completion(client: Any, run_id: str) -> Any:
    """Poll a run through the app's API (/poll_run) until it completed; a failure ends the wait with its log."""
    def completed() -> Any:
        poll = client.predict(run_id, api_name="/poll_run")
        assert "failed" not in poll[1], poll[1] + poll[5]
        return poll if "completed" in poll[1] else None

    return wait_until(completed, f"run {run_id} completing", every=0.5)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_run_config(model_dir: Path, data_file: Path, **training):
    """A RunConfig for the tiny model: short sequences, a few steps."""
    from finetune.core.config import from_dict

    return from_dict({
        "run_name": "tiny",
        "model": {"source": str(model_dir), "bits": training.pop("bits", 4)},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
        "data": {"source": str(data_file), "max_seq_length": 128, "validation_fraction": 0.1},
        "training": {"learning_rate": 0.01, "max_steps": 3, "batch_size": 4, "eval_steps": 2,
                     "save_steps": 2, "logging_steps": 1, "warmup_ratio": 0.0, **training},
    })


@contextlib.contextmanager
def serving(page: Any, **launch: Any) -> Iterator[str]:
    """A gradio Blocks (the app, or a tab or section on its own) on a free loopback port until the block ends;
    yields its URL. The caller closes it (the app also has a feedback store to close). ``launch``: more
    demo.launch() settings (the dev sign-in's app_kwargs)."""
    from components.page_loads import REGISTRY
    from components.shared import calm_queue

    # A tab built on its own asks for its page loads like any other: the page must answer them, as the app does.
    assert not page.__dict__.get(REGISTRY), "call components.page_loads.answer_page_loads(page) inside `with page`"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # gradio's own start check gives the page one 3-second try and fails the launch ("localhost is not
    # accessible") on a loaded machine: it is turned off (_frontend=False skips only that check), and the test
    # waits for the page itself.
    calm_queue(page.queue()).launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                                    _frontend=False, **launch)
    url = f"http://127.0.0.1:{port}/"
    wait_until(lambda: _answers(url), f"the app at {url} to answer")
    yield url


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.head(url, timeout=30).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def served_app(runs_root: Path) -> Iterator[str]:
    """The real app on a free loopback port, serving until the block ends; yields its URL. With
    LORA_LAB_SIGN_IN=dev set, it has the dev sign-in (/dev-sign-in?user=NAME) as ``python app.py`` would."""
    from app import build_app, close_app
    from components.sign_in import app_kwargs

    demo = build_app(str(runs_root))
    try:
        with serving(demo, app_kwargs=app_kwargs()) as url:
            yield url
    finally:
        close_app(demo)


# --- browser tests: Debian's Chromium driven by Playwright (which never downloads a browser of its own here) ---
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "tests" / "artifacts"
# How long a browser test waits for the page to answer an action: a bound that fails instead of hanging, far above
# the usual second or two, since a loaded 2-core CI machine (two test workers, training children, Chromium) has
# answered a click after more than 30 s. Playwright's own defaults (5 s for expect, 30 s for actions) are raised to it.
UI_WAIT = 120_000  # ms
ARGS = ["--no-sandbox", "--headless=new", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]


def patient_expect() -> None:
    """Playwright's expect() waits up to UI_WAIT, not its default 5 s (a setting of the module, for every page)."""
    from playwright.sync_api import expect

    expect.set_options(timeout=UI_WAIT)


@contextlib.contextmanager
def browser_page(url: str, width: int = 1400, height: int = 1000) -> Iterator[Any]:
    """A page of a fresh headless Chromium, opened at ``url``; skips the test where chromium is not installed."""
    if not Path(CHROMIUM).is_file():
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    patient_expect()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": width, "height": height})
        page.set_default_timeout(UI_WAIT)
        page.goto(url)
        yield page
        browser.close()


def fill(page: Any, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} textarea, #{elem_id} input").first
    box.fill(value)
    box.press("Tab")  # gradio commits a textbox/number on blur


def upload_file(page: Any, elem_id: str, path: Path) -> None:
    """Upload a file into a gradio File box and wait until the upload is done (its name shows in the box).

    A narrow column may break the name before its extension ("pairs .jsonl"), so spaces are allowed there."""
    from playwright.sync_api import expect

    page.locator(f"#{elem_id} input[type=file]").set_input_files(str(path))
    shown = re.compile(re.escape(path.stem) + r"\s*" + re.escape(path.suffix))
    expect(page.locator(f"#{elem_id}")).to_contain_text(shown, timeout=30_000)


def pick_local_model(page: Any, kind_id: str, source_id: str, model_dir: Path) -> None:
    """Choose "Local folder" and type the folder. Choosing it clears the embedded model's name in the page's next
    update: a folder typed before that update lands is wiped by it, so the field is filled once it reads empty."""
    from playwright.sync_api import expect

    page.locator(f"#{kind_id}").get_by_text("Local folder", exact=True).click()
    expect(page.locator(f"#{source_id} textarea, #{source_id} input").first).to_have_value("", timeout=UI_WAIT)
    fill(page, source_id, str(model_dir))


def upload_data_and_pick_local_model(page: Any, data_file: Path, model_dir: Path, max_steps: int) -> None:
    """The Train form as a learner fills it for a small run: an uploaded data file, a model from a local folder."""
    page.get_by_role("tab", name="Train").click()  # the app opens on the course ("Start here")
    page.locator("#data-kind").get_by_text("Uploaded file", exact=True).click()
    upload_file(page, "data-file", data_file)
    pick_local_model(page, "model-kind", "model-source", model_dir)
    fill(page, "max-steps", str(max_steps))
    page.get_by_text("Batch, epochs and sequence length").click()  # a collapsed group: opened to be filled
    fill(page, "batch-size", "4")
    fill(page, "max-seq-length", "128")


# --- shared by several test files -----------------------------------------------------------------------------

def __getattr__(name: str) -> Any:
    """``GREEDY`` (the chat settings of greedy, 12-token answers) is made on first use, with the chat module."""
    if name == "GREEDY":
        from finetune.services.chat import SamplingSettings

        return SamplingSettings(max_new_tokens=12, temperature=0.0)
    raise AttributeError(name)


def make_random_adapter(model_dir: Path, folder: Path, seed: int, targets: list[str]) -> Path:
    """A LoRA adapter with random, non-zero B matrices, so it really changes the output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    peft_model.save_pretrained(folder)
    return folder


class StepClock:
    """A clock that moves one second each time it is read: generation reads it once per token, so a budget of
    N seconds allows about N tokens whatever this machine's speed (no wall-clock timing in the test)."""

    def __init__(self) -> None:
        import threading

        self.now, self.reads, self._lock = 0.0, 0, threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            self.now += 1.0
            self.reads += 1
            return self.now


class SlowClock(StepClock):
    """A step clock that, from its ``slow_from``-th read on, makes each token take 50 ms of real time: a 400-token
    answer then lasts 20 s, long enough to be seen generating, queued behind and cancelled on a busy machine
    (the test waits on conditions, it never times anything)."""

    def __init__(self, slow_from: int) -> None:
        import threading

        super().__init__()
        self.slow_from, self.generating = slow_from, threading.Event()

    def __call__(self) -> float:
        import time

        now = super().__call__()
        if self.reads >= self.slow_from:
            self.generating.set()
            time.sleep(0.05)
        return now


def generation_threads() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name == "chat-generate" and t.is_alive()]


def spreadsheet_export(path: Path, rows: int = 24) -> Path:
    """What a European spreadsheet program writes: Windows-1252, semicolons, CRLF, capitalised headers; line 5
    lost its separator."""
    lines = [f"What does setting {i} do?;It sets {i}, très simplement." for i in range(rows)]
    lines.insert(3, "a line without its separator")
    path.write_bytes(("Question;Answer\r\n" + "\r\n".join(lines) + "\r\n").encode("cp1252"))
    return path


def connection_attempts(monkeypatch) -> list[Any]:
    """Every address a socket tries to connect to from now on (refused at once: the test machine is offline).
    "Fails fast" offline means exactly this list stays empty: no try, so no timeout and no retry to wait for."""
    import socket

    attempts: list[Any] = []

    def refuse(sock: socket.socket, address: Any) -> None:
        attempts.append(address)
        raise OSError("the test refuses every connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def preference_stage_config(model_dir, data_file, stage: str, validation_fraction: float = 0.25, **training):
    """A reward/DPO/KTO/GRPO config on ``model_dir`` and ``data_file`` for short CPU runs (4-bit, rank 4, 4 steps by
    default; any training field, ``bits`` and ``preference`` can be given)."""
    from finetune.core.config import from_dict

    preference = training.pop("preference", {})
    return from_dict({
        "run_name": stage, "stage": stage,
        "model": {"source": str(model_dir), "bits": training.pop("bits", 4)},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
        "data": {"source": str(data_file), "max_seq_length": 128, "validation_fraction": validation_fraction},
        "preference": preference,
        "training": {"learning_rate": 0.01, "max_steps": 4, "batch_size": 2, "eval_steps": 2, "save_steps": 100,
                     "logging_steps": 1, "warmup_ratio": 0.0, **training},
    })
