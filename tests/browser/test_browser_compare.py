"""The Compare tab in a real headless Chromium: a two-technique comparison on the tiny model fills the table,
the loss curves and the memory vs validation-loss scatter; a reload re-attaches to it. Screenshot in
tests/artifacts/compare.png (not committed)."""

from __future__ import annotations

import pytest

from helpers import ARTIFACTS, browser_page, fill as _fill, served_app, UI_WAIT
from finetune.services.compare import DEFAULT_TECHNIQUES, TECHNIQUES

pytestmark = pytest.mark.browser
CHOSEN = ("ia3", "qlora4")



def test_two_technique_comparison(tmp_path, tiny_model_dir, qa_file):
    from playwright.sync_api import expect

    with served_app(tmp_path / "runs") as url, browser_page(url, width=1500, height=1100) as page:
        page.get_by_role("tab", name="Compare").click()
        for key in DEFAULT_TECHNIQUES:  # untick the default set down to the two chosen techniques
            if key not in CHOSEN:
                page.locator("#compare-techniques").get_by_text(TECHNIQUES[key].label, exact=True).click()
        _fill(page, "compare-model", str(tiny_model_dir))
        _fill(page, "compare-data", str(qa_file))
        _fill(page, "compare-steps", "2")
        _fill(page, "compare-seq", "64")
        _fill(page, "compare-samples", "40")
        _fill(page, "compare-lr", "0.01")
        page.locator("#compare-start").click()
        expect(page.locator("#compare-message")).to_contain_text("Started comparison", timeout=UI_WAIT)
        page.locator("#compare-progress[data-state='running']").wait_for(timeout=UI_WAIT)

        page.reload()  # re-attaches to the comparison in progress
        page.get_by_role("tab", name="Compare").click()
        page.locator("#compare-progress[data-state='completed']").wait_for(timeout=240_000)
        table = page.locator("#compare-table")
        for key in CHOSEN:
            expect(table).to_contain_text(TECHNIQUES[key].label)
        expect(table).to_contain_text("completed")
        # A drawn chart (vega-embed), not the empty-plot placeholder icon.
        page.locator("#compare-loss-plot .vega-embed").first.wait_for(timeout=UI_WAIT)
        page.locator("#compare-scatter .vega-embed").first.wait_for(timeout=UI_WAIT)
        for what in ("trainable parameters", "peak memory", "validation loss"):
            expect(page.locator("#compare-notes")).to_contain_text(what)
        expect(page.locator("#compare-words")).to_contain_text("QLoRA")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "compare.png"), full_page=True)
        notes = page.locator("#compare-notes").inner_text()
    # IA3 trains fewer parameters than LoRA, whatever the bit width: the notes list it first.
    assert notes.index(TECHNIQUES["ia3"].label) < notes.index(TECHNIQUES["qlora4"].label)
