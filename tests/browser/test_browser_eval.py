"""The Evaluate and Quantization tabs and the course's links in a real headless Chromium, on the tiny model.

A tiny LoRA run is trained in-process before the app starts (a real TRL run into the runs folder the app serves).
Evaluate: the run is preselected, validation loss fills the table (base and adapter, adapter lower) and the bar
chart. Quantization: all seven formats fill the table and the memory/perplexity chart. The course: each step's link
jumps to its tab. Train: the LoRA aid shows the live trainable count. Screenshots go to tests/artifacts/.
"""

from __future__ import annotations

import pytest

from helpers import ARTIFACTS, browser_page, fill as _fill, served_app, UI_WAIT

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def runs_root(style_run):
    run_dir, data = style_run
    return run_dir.parent, data, run_dir.name


@pytest.fixture(scope="module")
def page(runs_root):
    with served_app(runs_root[0]) as url, browser_page(url) as page:
        yield page



def _table_rows(page, elem_id: str) -> list[str]:
    """Body rows of a gradio 6 Dataframe (an ARIA grid; the first row is the header)."""
    return page.locator(f"#{elem_id} [role=row]").all_inner_texts()[1:]


def test_course_links_and_lora_aid(page):
    from playwright.sync_api import expect

    from finetune.services.course import STEPS

    page.get_by_role("tab", name="Train").click()  # the app opens on the course ("Start here")
    expect(page.locator("#lora-aid")).to_contain_text("trainable", timeout=UI_WAIT)
    expect(page.locator("#lora-aid")).to_contain_text("(α/r)·B·A")
    expect(page.locator("#lora-aid")).to_contain_text("B starting at 0")
    for step in STEPS:  # every course step links to a tab that exists, and the link works
        page.get_by_role("tab", name="Start here").click()
        expect(page.locator(f"#course-{step.key}-text")).to_contain_text(step.title)
        page.locator(f"#course-{step.key}-tab").click()
        expect(page.locator("button[role=tab][aria-selected=true]")).to_have_text(step.tab, timeout=UI_WAIT)
    page.get_by_role("tab", name="Start here").click()
    page.locator("#course-quantization-tab").click()
    expect(page.locator("#quant-run")).to_be_visible(timeout=UI_WAIT)


def test_quantization_tab_fills_every_format(page, tiny_model_dir):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Quantization").click()
    _fill(page, "quant-source", str(tiny_model_dir))
    _fill(page, "quant-limit", "3")
    page.locator("#quant-run").click()
    expect(page.locator("#quant-status")).to_contain_text("Measured 7 format(s)", timeout=120_000)
    rows = _table_rows(page, "quant-table")
    assert len(rows) == 7, rows
    assert any("NF4 + double quant" in r for r in rows) and any("LLM.int8" in r for r in rows)
    page.locator("#quant-plot canvas, #quant-plot svg").first.wait_for(timeout=UI_WAIT)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "quantization.png"), full_page=True)


def test_evaluate_tab_shows_adapter_below_base(page, runs_root):
    from playwright.sync_api import expect

    _, data, run_id = runs_root
    page.get_by_role("tab", name="Evaluate").click()
    expect(page.locator("#eval-runs")).to_contain_text(run_id, timeout=UI_WAIT)  # preselected newest run
    _fill(page, "eval-source", str(data))
    _fill(page, "eval-split", "train")
    _fill(page, "eval-limit", "8")
    page.locator("#eval-loss-button").click()
    expect(page.locator("#eval-loss-summary")).to_contain_text("lower than its base", timeout=90_000)
    rows = _table_rows(page, "eval-loss-table")
    assert len(rows) == 2 and rows[0].startswith("base: ") and rows[1].startswith(run_id), rows
    page.locator("#eval-loss-plot canvas, #eval-loss-plot svg").first.wait_for(timeout=UI_WAIT)
    page.get_by_text("Win rate against the base (your votes)").click()
    expect(page.locator("#eval-win-note")).to_contain_text("No votes yet")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "evaluate.png"), full_page=True)
