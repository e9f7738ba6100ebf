"""The RLHF loop on a learner's own votes, end to end on the tiny random Llama (issue 15):
chat (the Chat tab's engine) -> votes (the SQLite feedback store) -> collected feedback -> reward model -> DPO
from an SFT adapter, all through the RLHF tab's handlers and the run manager's child processes.

What it proves: the collected feedback is split by prompt and no held-out prompt is trained on; a learner-sized
set gets the memorisation warning and capped steps before training; step 4's comparison answers only held-out
prompts, names them, compares the policy with both the base and the adapter it started from, and gives no
"better" verdict that these few prompts cannot support. Nothing is mocked.
"""

from __future__ import annotations

import json
import shutil

import pytest

from finetune.core.config import load_config
from finetune.core.preference import held_out_prompts, prompt_key, trained_prompt_keys
from finetune.services.chat import ChatEngine, SamplingSettings
from finetune.services.feedback import FeedbackStore
from finetune.services.runs import RunManager

VOTED = 10  # about what a learner collects in a few minutes of chatting


def _form(model_dir, **extra):
    """The RLHF tab's form as a learner leaves it: defaults, except a local model and collected feedback."""
    return {"model_kind": "Local folder", "model_source": str(model_dir), "data_kind": "Collected feedback",
            "max_seq_length": 128, "lora_rank": 4, **extra}


def _chat_and_vote(engine: ChatEngine, store: FeedbackStore, run_dir, count: int) -> list[str]:
    """Ask the base and the SFT adapter side by side with the Chat tab's sampling (greedy, the random base says
    nothing), keep the turn, vote for the fine-tuned answer."""
    cfg = load_config(run_dir / "config.yaml")
    prompts = [f"Tell me about topic {i} please." for i in range(count)]
    for seed, prompt in enumerate(prompts):
        sampling = SamplingSettings(max_new_tokens=8, temperature=1.0, seed=seed)
        base, tuned = engine.answer_pair(prompt, [], [], cfg.model, "tiny-style", run_dir / "adapter", sampling)
        assert base.strip() and tuned.strip() and base != tuned, (base, tuned)
        ids = store.record_turn(model=str(cfg.model.source), adapter="tiny-style", prompt=prompt, base_history=[],
                                tuned_history=[], settings={"temperature": 0.0}, base_response=base,
                                tuned_response=tuned)
        store.add_preference(ids["tuned"], ids["base"], "first")
    return prompts


@pytest.fixture(scope="module")
def loop(style_run, tiny_model_dir, tmp_path_factory):
    from components.rlhf_runs import start_stage

    sft_dir, _ = style_run
    root = tmp_path_factory.mktemp("loop")
    manager = RunManager(root / "runs")
    shutil.copytree(sft_dir, manager.run_dir("tiny-style"))
    db = root / "feedback.db"
    store = FeedbackStore(db)
    engine = ChatEngine()
    prompts = _chat_and_vote(engine, store, manager.run_dir("tiny-style"), VOTED)
    reward_id, reward_message = start_stage(manager, db, "reward", **_form(tiny_model_dir))
    assert manager.wait(reward_id, timeout=600)["state"] == "completed", manager.log_tail(reward_id)
    policy_id, policy_message = start_stage(manager, db, "policy", **_form(
        tiny_model_dir, method="DPO", start_adapter="tiny-style", reward_run=reward_id))
    assert manager.wait(policy_id, timeout=600)["state"] == "completed", manager.log_tail(policy_id)
    return manager, engine, prompts, (reward_id, reward_message), (policy_id, policy_message)


def test_a_learner_sized_feedback_set_is_warned_about_before_training(loop):
    manager, _, _, (reward_id, reward_message), (policy_id, policy_message) = loop
    for message in (reward_message, policy_message):
        assert "**8 pairs** on **8 prompts** to train on, **2** held out on **2** other prompts" in message
        assert "expect memorisation" in message and "too few for a dependable verdict" in message
    # The preset's 30 steps would be 15 epochs over 8 pairs (issue 15); the default is capped at 3 epochs.
    assert "Steps: 6 instead of the preset's 30" in policy_message and "3.0 epochs" in policy_message
    for run_id in (reward_id, policy_id):
        assert load_config(manager.run_dir(run_id) / "config.yaml").training.max_steps == 6
        info = json.loads((manager.run_dir(run_id) / "run_info.json").read_text())
        assert (info["train_rows"], info["eval_rows"]) == (8, 2)
        assert any("expect memorisation" in note for note in info["data_notes"])  # in the run's own record too


def test_no_held_out_prompt_was_trained_on(loop):
    manager, _, prompts, (reward_id, _), (policy_id, _) = loop
    info = json.loads((manager.run_dir(policy_id) / "run_info.json").read_text())
    assert info["started_from"] == str(manager.run_dir("tiny-style") / "adapter")
    keys = {prompt_key([{"role": "user", "content": p}]) for p in prompts}
    for run_id in (reward_id, policy_id):
        cfg = load_config(manager.run_dir(run_id) / "config.yaml")
        trained = trained_prompt_keys(cfg.data, cfg.preference.format, cfg.training.seed)
        held = held_out_prompts(cfg.data, cfg.preference.format, cfg.training.seed)
        assert len(held) == 2 and len(trained) == 8 and trained | {prompt_key([{"role": "user", "content": h}])
                                                                    for h in held} == keys
        assert not {prompt_key([{"role": "user", "content": h}]) for h in held} & trained
        # What the trainer actually saw: the exported file minus the held-out prompts.
        exported = [json.loads(line) for line in open(cfg.data.source, encoding="utf-8")]
        assert len(exported) == VOTED


@pytest.mark.trajectory
def test_step_4_compares_with_base_and_start_on_held_out_prompts_without_a_false_verdict(loop):
    from components.rlhf_playground import compare_policy
    from finetune.services.scoring import ScorerCache

    manager, engine, _, (reward_id, _), (policy_id, _) = loop
    cfg = load_config(manager.run_dir(policy_id) / "config.yaml")
    held = held_out_prompts(cfg.data, cfg.preference.format, cfg.training.seed)
    summary, table = compare_policy(manager, ScorerCache(), engine, reward_id, policy_id, 4, 6)
    assert set(table["prompt"]) == set(held) and all(prompt in summary for prompt in held)
    assert set(table["model"]) == {"tiny-style", policy_id, next(m for m in table["model"] if m.startswith("base"))}
    assert f"`{policy_id}` vs `tiny-style`" in summary and f"`{policy_id}` vs `base" in summary
    assert "2 pairs)" in summary  # the judge's held-out accuracy rests on 2 pairs, and says so
    assert "-> **better**" not in summary and summary.count("**cannot tell**") == 2
    assert "degenerate" in table.columns and table["tokens"].ge(0).all()


def test_too_few_prompts_get_no_held_out_data_and_no_verdict(tiny_model_dir, tmp_path):
    """Three voted prompts: nothing can be held out, and the tab says so before any training."""
    from components.rlhf_runs import preview_data

    store = FeedbackStore(tmp_path / "feedback.db")
    for i in range(3):
        ids = store.record_turn(model="m", adapter="a", prompt=f"Question {i}?", base_history=[], tuned_history=[],
                                settings={}, base_response="No idea.", tuned_response=f"🧪 Lab note: answer {i}.")
        store.add_preference(ids["tuned"], ids["base"], "first")
    info, table = preview_data(RunManager(tmp_path / "runs"), tmp_path / "feedback.db", **_form(tiny_model_dir))
    assert "**3 pairs** on **3 prompts**" in info and "No held-out data: no verdict" in info
    assert "expect memorisation" in info and len(table) == 3
