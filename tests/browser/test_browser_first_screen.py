"""Issue 31 in a real headless Chromium at 1440x900: the Train tab's first screen holds what a learner chooses
(preset, data source, model, the product card's five hyperparameters) and Start, without scrolling; the rest of the
form is one click away in collapsed groups. A screenshot goes to tests/artifacts/train-first-screen.png."""

from __future__ import annotations

import pytest

from helpers import ARTIFACTS, browser_page, served_app, UI_WAIT

pytestmark = pytest.mark.browser

WIDTH, HEIGHT = 1440, 900
FIRST_SCREEN = ("preset", "data-kind", "model-source", "learning-rate", "lora-rank", "lora-alpha", "lora-dropout",
                "bit-width", "start-button")


def test_start_and_the_five_hyperparameters_fit_the_first_viewport(tmp_path):
    from playwright.sync_api import expect

    with served_app(tmp_path / "runs") as url, browser_page(url, width=WIDTH, height=HEIGHT) as page:
        page.get_by_role("tab", name="Train").click()
        expect(page.locator("#estimate")).to_contain_text("trainable", timeout=UI_WAIT)  # the page has settled
        assert page.evaluate("window.scrollY") == 0
        boxes = {elem: page.locator(f"#{elem}").bounding_box() for elem in FIRST_SCREEN}
        outside = {elem: box for elem, box in boxes.items()
                   if box is None or box["y"] < 0 or box["y"] + box["height"] > HEIGHT or box["x"] + box["width"] > WIDTH}
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "train-first-screen.png"))
        assert not outside, f"not inside the first {WIDTH}x{HEIGHT} viewport: {outside}"
        start = boxes["start-button"]
        print(f"Start button: top {start['y']:.0f} px, bottom {start['y'] + start['height']:.0f} px of {HEIGHT}")
        # The estimate sits beside the form, not below it.
        estimate = page.locator("#estimate").bounding_box()
        assert estimate["x"] > boxes["learning-rate"]["x"] + boxes["learning-rate"]["width"]
        assert estimate["y"] < start["y"]
        # The rest of the form is collapsed: batch size is one click away, then there.
        expect(page.locator("#batch-size")).to_have_count(0)
        page.get_by_text("Batch, epochs and sequence length").click()
        expect(page.locator("#batch-size")).to_be_visible()


def test_a_page_sends_only_the_open_tabs_timer_ticks(tmp_path):
    """An open page polls for the tab in view only: the Train tab's ticks while Train is open, then the Compare
    tab's and no more of Train's once Compare is open (each timer ticks every 2 s: over two of Compare's intervals
    Train's timer would have ticked twice). The course's timer, with none of its runs underway, is off. After a
    reload, a tab clicked at once keeps ticking."""
    import json

    with served_app(tmp_path / "runs") as url, browser_page(url, width=WIDTH, height=HEIGHT) as page:
        names = {dep["id"]: dep["api_name"] for dep in page.evaluate("() => window.gradio_config.dependencies")}

        def tick_of(api_name):
            def matches(request):
                body = request.post_data if request.method == "POST" else None
                return bool(body) and names.get(json.loads(body).get("fn_index")) == api_name
            return matches

        ticks = []
        page.on("request", lambda r: ticks.append(names.get(json.loads(r.post_data).get("fn_index")))
                if r.method == "POST" and r.url.endswith("/run/predict") else None)
        page.get_by_role("tab", name="Train").click()
        with page.expect_request(tick_of("poll_run"), timeout=UI_WAIT):
            pass
        page.get_by_role("tab", name="Compare").click()
        with page.expect_request(tick_of("compare_poll"), timeout=UI_WAIT):
            pass
        ticks.clear()
        for _ in range(2):
            with page.expect_request(tick_of("compare_poll"), timeout=UI_WAIT):
                pass
        assert ticks.count("compare_poll") == 2 and not {"poll_run", "course_poll"} & set(ticks), ticks

        # A click at once after a reload: the select the page fires for its first tab as it loads must not turn
        # the clicked tab's timer off (it did once when the server answered the switch, then when the switch
        # trusted its event).
        page.reload()
        page.get_by_role("tab", name="Train").click()
        for _ in range(3):
            with page.expect_request(tick_of("poll_run"), timeout=UI_WAIT):
                pass
