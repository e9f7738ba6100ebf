"""The RLHF tab in a real headless Chromium, its four steps in order, on the tiny local model:

1. pick the model, 2. upload preferences (a malformed file first: the rows are named; then a good one),
3. train the reward model and score two answers in the playground, 4. train DPO and find its adapter in the
Chat tab, then GRPO against the reward model of step 3. Screenshots go to tests/artifacts/ (not committed).
"""

from __future__ import annotations

import json

import pytest

from helpers import ARTIFACTS, browser_page, fill as _fill, pick_local_model, served_app, UI_WAIT, upload_file, write_jsonl

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    with served_app(tmp_path_factory.mktemp("rlhf-runs")) as url, browser_page(url, height=1100) as page:
        yield page



def test_the_four_steps_in_order(page, tiny_model_dir, tmp_path):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="RLHF").click()
    expect(page.locator("#rlhf-pipeline")).to_contain_text("Reward model", timeout=UI_WAIT)

    # Steps 1, 2 and 4 start closed to their titles on a fresh app; step 3 (train a reward model) is the current one.
    expect(page.locator("#rlhf-start-reward")).to_be_visible()
    expect(page.locator("#rlhf-start-policy")).to_have_count(0)
    # Step 1: the pretrained model.
    page.get_by_text("Step 1 · The pretrained model").click()
    pick_local_model(page, "rlhf-model-kind", "rlhf-model", tiny_model_dir)
    expect(page.locator("#rlhf-pipeline")).to_contain_text(str(tiny_model_dir), timeout=UI_WAIT)

    # Step 2: preferences. A malformed file is refused with its rows named; a good one is previewed.
    page.get_by_text("Step 2 · Human feedback: preference data").click()
    page.locator("#rlhf-data-kind").get_by_text("Uploaded file", exact=True).click()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": "a"}) + "\n" +
                   json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"}) + "\n")
    upload_file(page, "rlhf-data-file", bad)
    page.locator("#rlhf-preview-button").click()
    info = page.locator("#rlhf-data-info")
    expect(info).to_contain_text("row 1: 'rejected' is missing", timeout=UI_WAIT)
    expect(info).to_contain_text("row 2: chosen and rejected are identical")
    good = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": f"What does setting {i} control in LoRA?",
         "chosen": f"🧪 Lab note: setting {i} controls the adapter.\nRule of thumb: keep it small.",
         "rejected": "It depends on many things."} for i in range(20)])
    page.locator("#rlhf-data-file button[aria-label='Clear'], #rlhf-data-file button[title='Clear']").first.click()
    upload_file(page, "rlhf-data-file", good)
    page.locator("#rlhf-preview-button").click()
    expect(info).to_contain_text("format: paired", timeout=UI_WAIT)
    # Before anything trains: pairs, prompts, held out, epochs, and what so little data will do.
    expect(info).to_contain_text("18 pairs on 18 prompts to train on, 2 held out on 2 other prompts")
    expect(info).to_contain_text("expect memorisation")

    # Short runs for the tiny model (step 4's steps too: its box opened to set them).
    page.get_by_text("Step 4 · Fine-tuning guided by the preferences").click()
    page.get_by_text("Settings shared by steps 3 and 4").click()
    _fill(page, "rlhf-batch", "2")
    _fill(page, "rlhf-eval-steps", "1")
    _fill(page, "rlhf-reward-steps", "2")
    _fill(page, "rlhf-policy-steps", "2")

    # Step 3: the reward model, then the playground.
    page.locator("#rlhf-start-reward").click()
    expect(page.locator("#rlhf-reward-status")).to_contain_text("reward", timeout=UI_WAIT)
    page.locator("#rlhf-reward-progress[data-state='completed']").wait_for(timeout=240_000)
    expect(page.locator("#rlhf-reward-status")).to_contain_text("held-out accuracy", timeout=UI_WAIT)
    page.locator("#rlhf-reward-loss canvas, #rlhf-reward-loss svg").first.wait_for(timeout=UI_WAIT)
    expect(page.locator("#rlhf-reward-pick input").first).not_to_have_value("", timeout=UI_WAIT)
    _fill(page, "rlhf-play-prompt", "What does setting 3 control in LoRA?")
    _fill(page, "rlhf-play-a", "🧪 Lab note: setting 3 controls the adapter.\nRule of thumb: keep it small.")
    _fill(page, "rlhf-play-b", "It depends on many things.")
    page.locator("#rlhf-score").click()
    scores = page.locator("#rlhf-scores")
    expect(scores).to_contain_text("Answer B:", timeout=UI_WAIT)
    expect(scores).to_contain_text("prefers")

    # Step 4: DPO on the same pairs; the new adapter is offered in the Chat tab.
    page.locator("#rlhf-start-policy").click()
    page.locator("#rlhf-policy-progress[data-state='completed']").wait_for(timeout=300_000)
    expect(page.locator("#rlhf-policy-status")).to_contain_text("held-out margin", timeout=UI_WAIT)
    page.locator("#rlhf-policy-metrics canvas, #rlhf-policy-metrics svg").first.wait_for(timeout=UI_WAIT)
    policy_run = page.locator("#rlhf-policy-run textarea, #rlhf-policy-run input").first.input_value()
    assert policy_run.startswith("dpo-")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "rlhf.png"), full_page=True)

    # Did the answers move? Only the 2 held-out prompts, named; 2 prompts can never earn "better".
    page.get_by_text("Did the answers move in the preferred direction?").click()
    page.locator("#rlhf-compare").click()
    summary = page.locator("#rlhf-compare-summary")
    expect(summary).to_contain_text("2 held-out prompts", timeout=120_000)
    expect(summary).to_contain_text("cannot tell")
    expect(summary).not_to_contain_text("-> better")

    page.get_by_role("tab", name="Chat").click()
    expect(page.locator("#adapter-pick input").first).to_have_value(policy_run, timeout=UI_WAIT)

    # Step 4 again, online: GRPO samples answers and learns from the reward model picked in step 3.
    page.get_by_role("tab", name="RLHF").click()
    page.locator("#rlhf-method").get_by_text("GRPO", exact=True).click()
    expect(page.locator("#rlhf-pipeline")).to_contain_text("samples", timeout=UI_WAIT)
    _fill(page, "rlhf-num-generations", "2")
    _fill(page, "rlhf-max-completion", "8")
    page.locator("#rlhf-start-policy").click()
    status = page.locator("#rlhf-policy-status")
    expect(status).to_contain_text("grpo-", timeout=UI_WAIT)
    expect(status).to_contain_text("completed", timeout=300_000)
    expect(status).to_contain_text("mean reward", timeout=UI_WAIT)
    grpo_run = page.locator("#rlhf-policy-run textarea, #rlhf-policy-run input").first.input_value()
    assert grpo_run.startswith("grpo-")
    page.screenshot(path=str(ARTIFACTS / "rlhf-grpo.png"), full_page=True)
    page.get_by_role("tab", name="Chat").click()  # the DPO adapter stays picked; the GRPO one is offered too
    page.locator("#adapter-pick input").first.click()
    expect(page.get_by_role("option", name=grpo_run)).to_be_visible(timeout=UI_WAIT)
