"""Issue 18 in a real headless Chromium: a learner uploads a spreadsheet export (Windows-1252, semicolons, one
broken line) in the Train tab, reads in the preview how it is read and what will be skipped, is refused at Start
with the line named, ticks "Skip malformed rows", starts again, and sees the run complete with the skipped row
counted beside it in the run history. Screenshots go to tests/artifacts/ (not committed).
"""

from __future__ import annotations

import pytest

from helpers import ARTIFACTS, browser_page, served_app, spreadsheet_export, UI_WAIT, upload_data_and_pick_local_model

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    with served_app(tmp_path_factory.mktemp("browser-data-runs")) as url, browser_page(url) as page:
        yield page


def _history_cell(page, run_id: str, column: str) -> str:
    """The text of one cell of the run history (a gradio 6 Dataframe: an ARIA grid whose first row is the header):
    the row holding ``run_id``, the column headed ``column``."""
    rows = page.locator("#run-history [role=row]")
    headers = [h.strip() for h in rows.first.locator("[role=columnheader]").all_inner_texts()]
    row = rows.filter(has_text=run_id).first
    return row.locator("[role=gridcell]").nth(headers.index(column)).inner_text().strip()


def test_partly_broken_upload_previewed_refused_then_trained_with_skip(page, tmp_path, tiny_model_dir):
    from playwright.sync_api import expect

    export = spreadsheet_export(tmp_path / "export.csv")
    upload_data_and_pick_local_model(page, export, tiny_model_dir, max_steps=2)

    preview = page.locator("#data-preview")
    expect(preview).to_contain_text("encoding cp1252", timeout=UI_WAIT)
    expect(preview).to_contain_text("CSV separated by semicolons")
    expect(preview).to_contain_text("Question → question")
    expect(preview).to_contain_text("1 skipped: 1 malformed")
    expect(preview).to_contain_text("line 5 has 1 field(s)")
    expect(preview).to_contain_text("Start will refuse this file")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "data-preview.png"), full_page=True)

    page.locator("#start-button").click()
    expect(page.locator("#run-status")).to_contain_text("line 5 has 1 field(s)", timeout=UI_WAIT)

    page.get_by_text("Data details: split, format, columns").click()  # a collapsed group on the Train tab
    page.locator("#skip-bad-rows input[type=checkbox]").check()
    expect(preview).not_to_contain_text("Start will refuse this file", timeout=UI_WAIT)
    expect(preview).to_contain_text("1 skipped: 1 malformed")
    page.locator("#start-button").click()
    expect(page.locator("#run-status")).to_contain_text("completed", timeout=600_000)
    run_id = page.locator("#watching-run textarea, #watching-run input").first.input_value()
    assert run_id.startswith("run-"), run_id
    expect(page.locator("#run-history [role=row]", has_text=run_id).first).to_be_visible(timeout=UI_WAIT)
    page.screenshot(path=str(ARTIFACTS / "data-skip-history.png"), full_page=True)
    assert _history_cell(page, run_id, "status") == "completed"
    assert _history_cell(page, run_id, "rows skipped") == "1"
