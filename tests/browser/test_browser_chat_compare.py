"""The Chat tab in a real headless Chromium: a DPO policy compared with the SFT adapter it started from.

The runs are made by hand (the tiny Llama and random LoRA adapters, as in test_chat.py), with the configs the
RLHF tab writes: the policy's ``preference.start_adapter`` names the SFT run.
"""

from __future__ import annotations

import json
import os
import sqlite3

import pytest

from helpers import browser_page, fill, GREEDY, make_random_adapter, served_app, tiny_run_config, UI_WAIT, write_jsonl

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory, tiny_model_dir):
    from finetune.core.config import save_config

    root = tmp_path_factory.mktemp("compare-runs")
    work = tmp_path_factory.mktemp("compare-work")
    data = write_jsonl(work / "qa.jsonl", [{"prompt": f"Question {i}?", "completion": "Answer."} for i in range(10)])
    for order, (run_id, seed, stage, start) in enumerate((("sft-run", 1, "sft", ""), ("dpo-run", 2, "dpo", "sft-run"))):
        cfg = tiny_run_config(tiny_model_dir, data, bits=32)
        cfg.stage, cfg.preference.start_adapter = stage, start
        save_config(cfg, root / run_id / "config.yaml")
        make_random_adapter(tiny_model_dir, root / run_id / "adapter", seed, ["q_proj", "v_proj"])
        (root / run_id / "status.json").write_text(json.dumps({"state": "finished"}))
        os.utime(root / run_id, (1_000_000 + order, 1_000_000 + order))  # the policy is the newest run
    return root


def test_the_left_column_is_the_starting_adapter(runs_root, tiny_model_dir):
    from playwright.sync_api import expect

    from finetune.services.chat import ChatEngine
    from finetune.core.config import ModelConfig

    with served_app(runs_root) as url, browser_page(url) as page:
        page.get_by_role("tab", name="Chat").click()
        expect(page.locator("#adapter-pick input").first).to_have_value("dpo-run", timeout=UI_WAIT)
        compare = page.locator("#chat-compare")
        expect(compare).to_be_visible(timeout=UI_WAIT)  # offered: this run started from an adapter
        compare.get_by_text("Starting adapter").click()
        expect(page.locator("#base-chat")).to_contain_text("Starting adapter (sft-run)", timeout=UI_WAIT)
        page.get_by_text("Sampling (shared by both sides)").click()
        fill(page, "max-new-tokens", str(GREEDY.max_new_tokens))
        fill(page, "temperature", "0")
        fill(page, "chat-prompt", "Hello there")
        page.locator("#chat-send").click()
        expect(page.locator("#feedback-panel")).to_be_visible(timeout=120_000)  # both answers complete, stored
    with sqlite3.connect(runs_root / "feedback.db") as db:
        stored = dict(db.execute("SELECT adapter, response FROM generations").fetchall())
    cfg = ModelConfig(source=str(tiny_model_dir), bits=32)
    alone = ChatEngine()
    assert stored["sft-run"] == list(alone.stream("Hello there", [], cfg, "sft-run", runs_root / "sft-run" / "adapter",
                                                  GREEDY))[-1]
    assert stored["dpo-run"] == list(alone.stream("Hello there", [], cfg, "dpo-run", runs_root / "dpo-run" / "adapter",
                                                  GREEDY))[-1]
    assert stored["sft-run"] != stored["dpo-run"]
