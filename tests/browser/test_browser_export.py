"""The Export tab in a real headless Chromium, and two visitors chatting at once without seeing each other.

A short real run of the tiny model is trained first (no Hub: a push with no token must fail with a message).
Screenshots go to tests/artifacts/ (not committed).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from helpers import (ARGS, ARTIFACTS, CHROMIUM, fill as _fill, patient_expect, served_app, tiny_run_config, UI_WAIT,
                     write_jsonl)

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def app_with_a_run(tmp_path_factory, tiny_model_dir):
    from finetune.core.config import save_config
    from finetune.train import run

    root = tmp_path_factory.mktemp("export-runs")
    rows = [{"prompt": f"What is knob {i}?", "completion": f"🧪 Lab note: knob {i}."} for i in range(16)]
    data = write_jsonl(root / "qa.jsonl", rows)
    cfg = tiny_run_config(tiny_model_dir, data, max_steps=3, eval_steps=2)
    save_config(cfg, root / "tiny-export" / "config.yaml")  # as the CLI and the run manager do
    assert run(cfg, root / "tiny-export") == 0
    with served_app(root) as url:
        yield url, root


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


def test_export_tab_zip_merge_card_and_push_errors(browser, app_with_a_run):
    from playwright.sync_api import expect

    url, root = app_with_a_run
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(UI_WAIT)
    patient_expect()
    page.goto(url)
    page.get_by_role("tab", name="Export").click()
    expect(page.locator("#export-run input").first).to_have_value("tiny-export", timeout=UI_WAIT)
    expect(page.locator("#export-card")).to_contain_text("final training loss", timeout=UI_WAIT)
    page.locator("#export-plot img").first.wait_for(timeout=UI_WAIT)

    page.locator("#export-zip").click()
    expect(page.locator("#export-zip-file")).to_contain_text("tiny-export-adapter", timeout=UI_WAIT)
    expect(page.locator("#export-message")).to_contain_text("PeftModel.from_pretrained")
    with page.expect_download(timeout=UI_WAIT) as download:  # the visitor's own download, through the browser
        page.locator("#export-zip-file a").first.click()
    with zipfile.ZipFile(download.value.path()) as archive:
        assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(archive.namelist())

    page.locator("#export-merge").click()
    expect(page.locator("#export-message")).to_contain_text("Validation loss on the same", timeout=UI_WAIT)
    expect(page.locator("#export-message")).to_contain_text("answers as in Chat")  # the default target
    assert (root / "tiny-export" / "merged" / "model.safetensors").is_file()

    page.get_by_text("Push to the Hugging Face Hub").click()
    _fill(page, "export-repo", "me/tiny-lora")
    page.locator("#export-push").click()  # no token typed: refused with a message, nothing sent
    expect(page.get_by_text("write token is needed").first).to_be_visible(timeout=UI_WAIT)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "export.png"), full_page=True)
    page.close()


def test_two_visitors_never_see_each_others_chat(browser, app_with_a_run):
    from playwright.sync_api import expect

    url, _ = app_with_a_run
    visitors = {}
    for word in ("alpha", "bravo"):
        context = browser.new_context(viewport={"width": 1400, "height": 1000})  # separate cookies: separate visitor
        page = context.new_page()
        page.set_default_timeout(UI_WAIT)
        page.goto(url)
        page.get_by_role("tab", name="Chat").click()
        expect(page.locator("#adapter-pick input").first).to_have_value("tiny-export", timeout=UI_WAIT)
        page.get_by_text("Sampling (shared by both sides)").click()
        _fill(page, "max-new-tokens", "8")
        _fill(page, "chat-prompt", f"Tell me about {word} please")
        visitors[word] = page
    for page in visitors.values():  # both send before either answer is finished
        page.locator("#chat-send").click()
    for word, page in visitors.items():
        for side in ("base-chat", "tuned-chat"):
            expect(page.locator(f"#{side} .bot, #{side} [data-testid='bot']").last).not_to_be_empty(timeout=UI_WAIT)
    page_text = {word: page.locator("#base-chat").inner_text() + page.locator("#tuned-chat").inner_text()
                 for word, page in visitors.items()}
    assert "alpha" in page_text["alpha"] and "bravo" not in page_text["alpha"]
    assert "bravo" in page_text["bravo"] and "alpha" not in page_text["bravo"]
    for page in visitors.values():
        page.context.close()
