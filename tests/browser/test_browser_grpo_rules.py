"""GRPO with rule rewards in a real headless Chromium, on the tiny local model (issue 33): a catastrophic rule is
refused with its field named, the reward bench samples and scores answers to two bundled drills, then a GRPO run
on the drills trains with rules only (no reward model) and its held-out accuracy, before and after, is shown.
Screenshots go to tests/artifacts/ (not committed)."""

from __future__ import annotations

import pytest

from helpers import ARTIFACTS, UI_WAIT, browser_page, fill, pick_local_model, served_app

pytestmark = pytest.mark.browser

RULES_ONLY = "Rules (RLVR: checked answers)"


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    with served_app(tmp_path_factory.mktemp("grpo-rules-runs")) as url, browser_page(url, height=1400) as page:
        yield page


def set_rules(page, text: str) -> None:
    editor = page.locator("#rlhf-reward-rules .cm-content").first
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.press("Delete")
    editor.type(text)


def test_bench_then_train_then_held_out_accuracy(page, tiny_model_dir):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="RLHF").click()
    page.get_by_text("Step 1 · The pretrained model").click()
    pick_local_model(page, "rlhf-model-kind", "rlhf-model", tiny_model_dir)
    expect(page.locator("#rlhf-pipeline")).to_contain_text(str(tiny_model_dir), timeout=UI_WAIT)

    page.get_by_text("Step 4 · Fine-tuning guided by the preferences").click()
    page.locator("#rlhf-method").get_by_text("GRPO", exact=True).click()
    page.get_by_text("Settings shared by steps 3 and 4").click()
    fill(page, "rlhf-batch", "4")
    fill(page, "rlhf-policy-steps", "2")
    fill(page, "rlhf-num-generations", "2")
    fill(page, "rlhf-max-completion", "8")
    page.get_by_text("GRPO rewards: the reward model, rules, or both · reward bench").click()
    page.locator("#rlhf-grpo-reward").get_by_text(RULES_ONLY, exact=True).click()

    # A catastrophic pattern is refused before anything samples or trains, with its field named.
    set_rules(page, "- {kind: format, pattern: '(a+)+$'}")
    page.locator("#rlhf-check-rules").click()
    summary = page.locator("#rlhf-bench-summary")
    expect(summary).to_contain_text("preference.rewards[0].pattern", timeout=UI_WAIT)
    expect(summary).to_contain_text("catastrophic")

    # The bench: 2 drills x 2 sampled answers, scored per term, with GRPO's advantage.
    set_rules(page, "- {kind: numeric, name: right, reference: answer, extract: last_number}")
    fill(page, "rlhf-bench-answers", "2")
    page.locator("#rlhf-bench-sample").click()
    expect(summary).to_contain_text("4 answers to 2 prompts", timeout=UI_WAIT)
    expect(summary).to_contain_text("Mean score per term: right")
    expect(page.locator("#rlhf-bench-table")).to_contain_text("advantage")
    page.locator("#rlhf-bench-rescore").click()
    expect(summary).to_contain_text("4 answers to 2 prompts", timeout=UI_WAIT)

    # Train with the rules only, on the bundled drills; the held-out accuracy before and after is shown.
    page.locator("#rlhf-start-policy").click()
    status = page.locator("#rlhf-policy-status")
    expect(status).to_contain_text("grpo-", timeout=UI_WAIT)
    page.locator("#rlhf-policy-progress[data-state='completed']").wait_for(timeout=600_000)
    verdict = page.locator("#rlhf-grpo-verdict")
    expect(verdict).to_contain_text("Held-out check on 32 prompts", timeout=UI_WAIT)
    expect(verdict).to_contain_text("accuracy (right):")
    expect(verdict).to_contain_text("Your run is RLVR")
    page.locator("#rlhf-grpo-terms canvas, #rlhf-grpo-terms svg").first.wait_for(timeout=UI_WAIT)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "rlhf-grpo-rules.png"), full_page=True)
