"""The app in a real headless Chromium (Debian's package; Playwright downloads no browser of its own).

Train: point the form at the tiny local model, start, see the loss plot, reload mid-run and re-attach, finish.
Chat: the finished run's adapter is picked, one prompt gives two streamed answers. Screenshots go to
tests/artifacts/ (not committed).
"""

from __future__ import annotations

import pytest

from conftest import browser_page, served_app, ARTIFACTS, fill as _fill

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    with served_app(tmp_path_factory.mktemp("browser-runs")) as url:
        yield url


@pytest.fixture(scope="module")
def page(app_url):
    with browser_page(app_url) as page:
        yield page



def test_train_then_chat(page, app_url, tiny_model_dir):
    import time

    from playwright.sync_api import expect

    page.get_by_text("Local folder", exact=True).click()
    # Choosing "Local folder" clears the embedded model's name; fill only once that has happened.
    expect(page.locator("#model-source textarea, #model-source input").first).to_have_value("", timeout=10_000)
    _fill(page, "model-source", str(tiny_model_dir))
    _fill(page, "max-steps", "10")
    _fill(page, "learning-rate", "0.005")  # the tiny random model needs a high rate for a visible fall
    page.get_by_text("Advanced settings").click()
    _fill(page, "eval-steps", "3")  # a few eval points, so the eval curve is a line
    expect(page.locator("#estimate")).to_contain_text("trainable", timeout=30_000)

    clicked = time.time()
    page.locator("#start-button").click()
    expect(page.locator("#run-status")).to_contain_text("Run", timeout=30_000)
    page.locator("#train-progress[data-state='running']:not([data-points='0'])").wait_for(timeout=90_000)
    page.locator("#loss-plot canvas, #loss-plot svg").first.wait_for(timeout=10_000)
    first_point = time.time() - clicked

    # A reload mid-training re-attaches to the running job.
    assert page.locator("#train-progress").get_attribute("data-state") == "running"
    page.reload()
    expect(page.locator("#train-progress[data-state='running']")).to_be_visible(timeout=15_000)
    expect(page.locator("#watching-run textarea, #watching-run input").first).not_to_have_value("")
    # ...and the form shows the settings of the run in progress again.
    expect(page.locator("#model-source textarea, #model-source input").first).to_have_value(str(tiny_model_dir))
    page.locator("#loss-plot canvas, #loss-plot svg").first.wait_for(timeout=15_000)

    expect(page.locator("#run-status")).to_contain_text("completed", timeout=120_000)
    page.wait_for_timeout(2500)  # one more poll so the plot shows the last points
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "train.png"), full_page=True)
    print(f"\nStart -> first plotted point: {first_point:.1f} s")

    page.get_by_role("tab", name="Chat").click()
    expect(page.locator("#adapter-pick input").first).not_to_have_value("", timeout=15_000)
    page.get_by_text("Sampling (shared by both sides)").click()
    _fill(page, "max-new-tokens", "32")  # short answers keep both questions in view for the screenshot
    _fill(page, "chat-prompt", "What is a LoRA adapter?")
    page.locator("#chat-send").click()
    for side in ("base-chat", "tuned-chat"):
        bot = page.locator(f"#{side} .bot, #{side} [data-testid='bot']").last
        expect(bot).not_to_be_empty(timeout=60_000)
    page.wait_for_timeout(3000)
    page.screenshot(path=str(ARTIFACTS / "chat.png"), full_page=True)
    texts = [page.locator(f"#{side} .bot, #{side} [data-testid='bot']").last.inner_text() for side in
             ("base-chat", "tuned-chat")]
    assert all(t.strip() for t in texts), texts
