"""Feedback in the real app: through its API (gradio_client) and in a real headless Chromium.

The run folder holds a real PEFT adapter on the tiny random Llama (random non-zero LoRA weights, so the two
answers differ) instead of a trained one: training is covered elsewhere and would only cost time here.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest

from helpers import (app_client, ARTIFACTS, browser_page, make_random_adapter, served_app, tiny_run_config, UI_WAIT,
                     wait_until)

RUN_ID = "feedback-run"
SECRET = "lsv2_pt_app_test_key_0042"


def _finished_run(runs_root: Path, model_dir: Path, data_file: Path) -> None:
    """A completed run folder: config.yaml, status.json and a PEFT adapter that changes the answers."""
    from finetune.core.config import save_config
    from finetune.core.run_status import write_status

    folder = runs_root / RUN_ID
    folder.mkdir(parents=True)
    save_config(tiny_run_config(model_dir, data_file, bits=32), folder / "config.yaml")
    make_random_adapter(model_dir, folder / "adapter", 1, ["q_proj", "v_proj"])
    write_status(folder, state="completed", step=3, max_steps=3, error=None)


@pytest.fixture
def langsmith():
    """The app syncs to a loopback LangSmith stand-in (tests/fake_langsmith.py). Each test has its own, and its own
    app below: the API test counts every stored answer, vote and synced item, which another test's would add to."""
    from fake_langsmith import FakeLangSmith

    fake = FakeLangSmith().start()
    env = {"LANGSMITH_API_KEY": SECRET, "LANGSMITH_ENDPOINT": fake.url, "LANGSMITH_PROJECT": "app-test"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    yield fake
    for key, value in saved.items():
        os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    fake.stop()


@pytest.fixture
def app(tmp_path_factory, tiny_model_dir, langsmith):
    root = tmp_path_factory.mktemp("feedback-runs")
    data = root.parent / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}?", "completion": f"A{i}."}) + "\n" for i in range(20)))
    _finished_run(root, tiny_model_dir, data)
    with served_app(root) as url:
        yield url, root


def _feedback_rows(root: Path, sql: str) -> list[tuple]:
    db = sqlite3.connect(root / "feedback.db")
    rows = db.execute(sql).fetchall()
    db.close()
    return rows


def test_api_stores_answers_and_feedback(app, langsmith):
    import urllib.request

    from gradio_client.exceptions import AppError

    url, root = app
    client = app_client(url)
    with pytest.raises(AppError, match="Send a prompt first"):
        client.predict("left", "", "", "both", api_name="/submit_feedback")
    left, right, box = client.predict("What is LoRA?", RUN_ID, [], [], 12, 1.0, 0.9, 0, api_name="/chat")
    assert left[-1]["role"] == "assistant" and right[-1]["role"] == "assistant" and box == ""
    stored = _feedback_rows(root, "SELECT side, adapter, prompt, response, settings FROM generations")
    assert {(side, adapter) for side, adapter, *_ in stored} == {("base", None), ("tuned", RUN_ID)}
    assert all(prompt == "What is LoRA?" and json.loads(settings)["max_new_tokens"] == 12
               for _, _, prompt, _, settings in stored)

    with pytest.raises(AppError, match="Choose which answer is better"):
        client.predict(None, "  ", "", "both", api_name="/submit_feedback")
    status, *_ = client.predict("right", "sharper", "The ideal answer.", "left", api_name="/submit_feedback")
    assert "Saved: vote, comment, corrected answer" in status and "LangSmith: on (project app-test)" in status
    events = _feedback_rows(root, "SELECT kind, value, comment, correction FROM feedback ORDER BY rowid")
    assert events == [("preference", "second", "sharper", None), ("correction", "corrected", None,
                                                                   "The ideal answer.")]
    sync, counts, recent, wins = client.predict(api_name="/feedback_summary")
    assert "1** pairwise votes" in counts and sync.startswith("LangSmith: on")
    assert wins["data"] == [[RUN_ID, 1, 0, 0, 0, 1, 1.0, "0.21-1.00",
                             "cannot tell yet (1 vote: the interval holds 0.5)"]]

    # The answers and the feedback reached LangSmith; the key appears in no page the app serves.
    tuned_id = _feedback_rows(root, "SELECT id FROM generations WHERE side = 'tuned'")[0][0]
    wait_until(lambda: len(langsmith.feedback) >= 3, "2 vote items and 1 correction reaching LangSmith")
    assert tuned_id in langsmith.runs
    assert sorted(f["key"] for f in langsmith.feedback.values()) == ["correction", "preference", "preference"]
    for path in ("", "config", "gradio_api/info"):
        assert SECRET not in urllib.request.urlopen(url + path).read().decode()


@pytest.mark.browser
def test_blind_arena_vote_reveals_the_models_and_pairs_export(app, tmp_path):
    from datasets import load_dataset
    from playwright.sync_api import expect

    url, root = app
    with browser_page(url, height=1100) as page:
        page.get_by_role("tab", name="Chat").click()
        expect(page.locator("#adapter-pick input").first).to_have_value(RUN_ID, timeout=UI_WAIT)
        page.locator("#arena-mode input").check()
        expect(page.locator("#base-chat")).not_to_contain_text("Base model", timeout=UI_WAIT)  # now just "A"
        expect(page.locator("#tuned-chat")).not_to_contain_text("Fine-tuned")
        page.get_by_text("Sampling (shared by both sides)").click()
        box = page.locator("#max-new-tokens input[type='number']").first
        box.fill("12")
        box.press("Tab")
        page.locator("#chat-prompt textarea").fill("Which rank should I pick?")
        page.locator("#chat-send").click()

        expect(page.locator("#feedback-panel")).to_be_visible(timeout=UI_WAIT)
        expect(page.locator("#vote")).to_contain_text("A is better")
        labels = page.locator("#base-chat, #tuned-chat").all_inner_texts()
        assert not any("Fine-tuned" in t or "Base model" in t for t in labels), labels  # still blind

        # A thumb on answer A, through the chatbot's own like button.
        page.locator("#base-chat").get_by_role("button", name="Like").last.click()
        expect(page.get_by_text("Saved 👍")).to_be_visible(timeout=UI_WAIT)

        page.locator("#vote").get_by_text("A is better").click()
        page.locator("#feedback-comment textarea").fill("A is more to the point")
        page.locator("#feedback-submit").click()
        status = page.locator("#feedback-status")
        expect(status).to_contain_text("Revealed", timeout=UI_WAIT)
        reveal = status.inner_text()
        assert "base model" in reveal and f"fine-tuned model ({RUN_ID})" in reveal
        expect(page.locator("#base-chat")).to_contain_text("A: the", timeout=UI_WAIT)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "arena.png"), full_page=True)

        page.get_by_role("tab", name="Feedback").click()
        expect(page.locator("#feedback-counts")).to_contain_text("pairwise votes", timeout=UI_WAIT)
        expect(page.locator("#win-table")).to_contain_text(RUN_ID)
        page.locator("#export-pairs").click()
        link = page.locator("#pairs-file a").first
        link.wait_for(timeout=UI_WAIT)
        with page.expect_download() as download:
            link.click()
        saved = tmp_path / "pairs.jsonl"
        download.value.save_as(saved)
        page.screenshot(path=str(ARTIFACTS / "feedback.png"), full_page=True)

    pairs = load_dataset("json", data_files=str(saved), split="train")
    arena_vote = _feedback_rows(root, "SELECT g.side, g.response FROM feedback f JOIN generations g "
                                      "ON g.id = f.generation_id WHERE f.arena = 1")
    assert len(arena_vote) == 1
    arena_pairs = [row for row in pairs if row["prompt"] == [{"role": "user", "content": "Which rank should I pick?"}]]
    # A (the answer shown first) won the vote: it is the chosen side of the exported pair.
    assert [row["chosen"] for row in arena_pairs] == [[{"role": "assistant", "content": arena_vote[0][1]}]]
    assert arena_pairs[0]["rejected"][0]["content"] != arena_vote[0][1]
    thumbs = _feedback_rows(root, "SELECT g.response FROM feedback f JOIN generations g ON g.id = f.generation_id "
                                  "WHERE f.kind = 'thumbs' AND f.value = 'up'")
    assert thumbs == [(arena_vote[0][1],)]  # the thumb was given on answer A
