"""The app in a real headless Chromium (Debian's package; Playwright downloads no browser of its own).

Train: point the form at the tiny local model, start, see the loss plot, reload mid-run and re-attach, finish.
Chat: the finished run's adapter is picked, one prompt gives two streamed answers. Screenshots go to
tests/artifacts/ (not committed).
"""

from __future__ import annotations

import pytest

from helpers import ARTIFACTS, browser_page, fill as _fill, served_app, UI_WAIT, upload_data_and_pick_local_model

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    with served_app(tmp_path_factory.mktemp("browser-runs")) as url:
        yield url


@pytest.fixture(scope="module")
def page(app_url):
    with browser_page(app_url) as page:
        yield page



def test_train_then_chat(page, app_url, style_model_dir, qa_file):
    from playwright.sync_api import expect

    # The course-style Q&A (every answer opens with "🧪 Lab note:"), uploaded as a learner would.
    upload_data_and_pick_local_model(page, qa_file, style_model_dir, max_steps=20)
    _fill(page, "learning-rate", "0.01")  # 20 steps at a high rate: enough for the style to show
    page.get_by_text("Advanced settings").click()
    _fill(page, "eval-steps", "5")  # a few eval points, so the eval curve is a line
    expect(page.locator("#estimate")).to_contain_text("trainable", timeout=UI_WAIT)

    page.locator("#start-button").click()
    expect(page.locator("#run-status")).to_contain_text("Run", timeout=UI_WAIT)
    page.locator("#train-progress[data-state='running']:not([data-points='0'])").wait_for(timeout=300_000)
    page.locator("#loss-plot canvas, #loss-plot svg").first.wait_for(timeout=UI_WAIT)

    # A reload mid-training re-attaches to the running job (the page opens on the course: back to the Train tab).
    page.reload()
    page.get_by_role("tab", name="Train").click()
    expect(page.locator("#train-progress[data-state='running']")).to_be_visible(timeout=UI_WAIT)
    expect(page.locator("#watching-run textarea, #watching-run input").first).not_to_have_value("")
    # ...and the form shows the settings of the run in progress again.
    expect(page.locator("#model-source textarea, #model-source input").first).to_have_value(str(style_model_dir))
    page.locator("#loss-plot canvas, #loss-plot svg").first.wait_for(timeout=UI_WAIT)

    expect(page.locator("#run-status")).to_contain_text("completed", timeout=600_000)
    # The bar and the plot have every step once the poll after the end has been drawn.
    expect(page.locator("#train-progress[data-state='completed'][data-points='20']")).to_be_visible(timeout=UI_WAIT)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "train.png"), full_page=True)

    page.get_by_role("tab", name="Chat").click()
    expect(page.locator("#adapter-pick input").first).not_to_have_value("", timeout=UI_WAIT)
    page.get_by_text("Sampling (shared by both sides)").click()
    _fill(page, "max-new-tokens", "16")  # short answers keep both questions in view for the screenshot
    _fill(page, "temperature", "0")  # greedy: the answers are the models' own, not the luck of a draw
    _fill(page, "chat-prompt", "What is a LoRA adapter?")  # not a training question
    page.locator("#chat-send").click()
    # Both answers are complete once the turn is stored and the vote is offered.
    expect(page.locator("#feedback-panel")).to_be_visible(timeout=120_000)
    page.screenshot(path=str(ARTIFACTS / "chat.png"), full_page=True)
    base, tuned = (page.locator(f"#{side} .bot, #{side} [data-testid='bot']").last.inner_text().strip()
                   for side in ("base-chat", "tuned-chat"))
    # The trained style: every training answer opens with the course's "🧪 Lab note:"; the base never says it.
    assert tuned.startswith("🧪 Lab note:"), tuned
    assert "Lab note" not in base and base != tuned, base
