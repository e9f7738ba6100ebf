"""Issue 36 in a real headless Chromium: what the page shows (a Stop for an answer being generated, the Learn
tab's lists, a comparison a second browser finds running)."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import pytest

from helpers import browser_page, fill, generation_threads, serving, SlowClock, UI_WAIT

pytestmark = pytest.mark.browser


@contextlib.contextmanager
def chat_page(manager: Any, engine: Any) -> Iterator[str]:
    """The real Chat tab (with its own engine, so the test can see its clock and lock) behind gradio's queue."""
    import gradio as gr

    from components.chat_tab import build_chat_tab
    from components.page_loads import answer_page_loads

    with gr.Blocks() as demo:
        build_chat_tab(manager, engine, None)
        answer_page_loads(demo)  # as the app does: a page load picks the newest run
    try:
        with serving(demo) as url:
            yield url
    finally:
        demo.close()


def test_stop_ends_an_answer_being_generated_and_frees_the_model(policy_runs):
    from playwright.sync_api import expect

    from helpers import wait_until
    from finetune.services.chat import ChatEngine

    clock = SlowClock(slow_from=4)  # 50 ms per token from the 4th on: a 400-token answer would take 20 s
    engine = ChatEngine(max_seconds=0, clock=clock)  # no time limit: only Stop can end it early
    with chat_page(policy_runs, engine) as url, browser_page(url) as page:
        expect(page.locator("#adapter-pick input").first).not_to_have_value("", timeout=UI_WAIT)  # newest run
        page.get_by_text("Sampling (shared by both sides)").click()
        expect(page.locator("#max-new-tokens input[type=number]")).to_have_value("64")  # the CPU's default
        fill(page, "max-new-tokens", "400")
        fill(page, "temperature", "0")
        fill(page, "chat-prompt", "Tell me a story")
        page.locator("#chat-send").click()
        wait_until(clock.generating.is_set, "the answer to start generating")
        page.locator("#chat-stop").click()
        wait_until(lambda: not generation_threads(), "generation to end after Stop")
        reads = clock.reads
        assert reads < 300  # ended long before its 400 tokens...
        # ...and the model is free for the next visitor (the handler gives its turn back as it unwinds, just after
        # the generation thread ends: asserting at once failed under the slower 'default' kernels)
        wait_until(engine.idle, "the chat model to be free after Stop")
        assert not page.locator("#feedback-panel").is_visible()  # a stopped answer is not stored for a vote
