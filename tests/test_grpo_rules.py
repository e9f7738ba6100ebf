"""GRPO with rule rewards on the CPU (issue 33): the bundled drills and their preset, and a real GRPO run on a tiny
Llama whose held-out reward rises by the test's own measurement.

Certain by construction: the tiny model (wide random embeddings, so a few LoRA steps move it) is sampled before
training, and the rewarded text is a token its samples already contain often (so groups of answers differ and
GRPO has a signal from step one) but that none of its greedy held-out answers contains (so the held-out reward
starts at exactly 0). Any movement of the policy toward that token raises the held-out reward above 0; no single
CPU's arithmetic decides it (checked under ATEN_CPU_CAPABILITY=avx2 and =default).
"""

from __future__ import annotations

import json

import pytest
import torch

from helpers import preference_stage_config, save_tiny_llama, write_jsonl
from finetune.core.config import ConfigError, DataConfig, load_config
from finetune.core.prompt_data import check_reference_columns, load_prompt_rows
from finetune.core.rewards import parse_rules
from finetune.core.run_folder import HELD_OUT_ANSWERS
from finetune.core.run_status import read_metrics
from finetune.services.rule_verdict import held_out_verdict
from finetune.train import run

COMPLETION_TOKENS = 4


def test_bundled_drills_have_reference_answers_and_a_held_out_split():
    rows = load_prompt_rows(DataConfig(source="bundled:lab_drills", max_eval_samples=100))
    assert len(rows.train) == 240 and len(rows.held_out) == 40 and "answer" in rows.columns
    trained = {row["prompt"][-1]["content"] for row in rows.train}
    assert not trained & {row["prompt"][-1]["content"] for row in rows.held_out}
    check = parse_rules([{"kind": "numeric", "reference": "answer", "extract": "last_number"}])[0]
    assert all(check.score(f"It is {row['answer']}.", row) == 1.0 for row in rows.held_out)


def test_the_drills_preset_uses_rules_only():
    cfg = load_config("configs/grpo-drills-cpu.yaml")
    assert cfg.stage == "grpo" and not cfg.preference.reward_model and cfg.data.source == "bundled:lab_drills"
    assert [rule["kind"] for rule in cfg.preference.rewards] == ["numeric"] and cfg.preference.temperature == 0.7


GREEDY_WORD, REWARDED_WORD = " banana", " cherry"   # one token each in the embedded tokenizer
# Probabilities the two words get at every position of an answer before training (the rest share what is left):
# greedy decoding says banana everywhere; a sampled 4-token answer contains cherry with 1 - 0.7^4 = 76%.
P_GREEDY, P_REWARDED = 0.5, 0.3


@pytest.fixture(scope="module")
def two_word_model_dir(tmp_path_factory, embedded_dir):
    """A tiny random Llama whose answers are mostly 'banana' and 'cherry', with a direction the layers can move
    into to prefer cherry.

    Every input embedding carries a constant C on dimension 0, so the normalized hidden state has a steady
    component h0 there (the random rest is ~0.02). The output layer is untied: every row is ~0 except banana's
    and cherry's, which sit on dimension 0 with logits ln(p x V) (p from P_GREEDY, P_REWARDED; V tokens). Cherry's
    row also points along dimension 1, where the hidden state starts at ~0: any movement of the layers along it
    raises cherry against banana, and the 0.51-nat gap between them is what GRPO has to close. Rewarding
    'contains cherry' is then satisfiable from step one (groups are mixed), and a greedy answer contains cherry
    only once the policy has moved toward it."""
    import math

    from transformers import LlamaForCausalLM

    folder = save_tiny_llama(tmp_path_factory.mktemp("two-words"), embedded_dir)
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer_ids = [_token_id(embedded_dir, word) for word in (GREEDY_WORD, REWARDED_WORD)]
    vocabulary, hidden = model.config.vocab_size, model.config.hidden_size
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed[:, 0] = 4.0
        embed[:, 1] = 0.0
        head = torch.nn.Parameter(torch.randn(vocabulary, hidden, generator=torch.Generator().manual_seed(0)) * 0.02)
        head[:, 0] = head[:, 1] = 0.0
        h0 = _steady_component(model)
        rest = vocabulary * (1 - P_GREEDY - P_REWARDED)
        for token, p in zip(tokenizer_ids, (P_GREEDY, P_REWARDED)):
            head[token, 0] = math.log(p / (1 - P_GREEDY - P_REWARDED) * rest) / h0
        head[tokenizer_ids[1], 1] = 4.0
    model.config.tie_word_embeddings = False
    model.lm_head.weight = head
    model.save_pretrained(folder)
    return folder


def _token_id(tokenizer_dir, word: str) -> int:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tokenizer_dir).encode(word, add_special_tokens=False)
    assert len(ids) == 1, f"{word!r} is {len(ids)} tokens in this tokenizer"
    return ids[0]


def _steady_component(model) -> float:
    """Dimension 0 of the final normalized hidden state, averaged over a prompt's positions."""
    ids = torch.arange(100, 140).unsqueeze(0)
    hidden = model.model(input_ids=ids).last_hidden_state
    return float(hidden[0, :, 0].mean())


def _answers(model_dir, prompts: list[str]) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    answers = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=COMPLETION_TOKENS, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)
        answers.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return answers


def test_the_two_word_model_is_built_as_described(two_word_model_dir):
    answers = _answers(two_word_model_dir, ["Tell me about drill number 3.", "Another drill?"])
    assert all(a.split() == ["banana"] * COMPLETION_TOKENS for a in answers), answers


@pytest.mark.trajectory
def test_grpo_with_a_rule_reward_raises_the_held_out_reward(two_word_model_dir, tmp_path):
    rows = [{"prompt": f"Tell me about drill number {i}.", "answer": "cherry"} for i in range(48)]
    data = write_jsonl(tmp_path / "drills.jsonl", rows)
    cfg = preference_stage_config(two_word_model_dir, data, "grpo", bits=32, batch_size=8, max_steps=10,
                                  learning_rate=0.02, preference={
                                      "num_generations": 4, "max_completion_length": COMPLETION_TOKENS,
                                      "beta": 0.001, "rewards": [
                                          {"kind": "contains", "text": REWARDED_WORD.strip(), "name": "says_it"},
                                          {"kind": "match", "reference": "answer", "extract": "answer_tag"}]})
    folder = tmp_path / "runs" / "grpo-rules"
    assert run(cfg, folder) == 0, (folder / "status.json").read_text()

    held = json.loads((folder / HELD_OUT_ANSWERS).read_text())
    assert len(held["prompts"]) >= 8  # 25% of 48 prompts, none trained on
    said = [[float(REWARDED_WORD.strip() in a) for a in held[side]["answers"]] for side in ("before", "after")]
    assert said[0] == held["before"]["scores"]["says_it"] and said[1] == held["after"]["scores"]["says_it"]
    assert sum(said[0]) == 0, held["before"]["answers"]      # by construction: greedy says banana
    assert sum(said[1]) > 0, held["after"]["answers"]        # the policy moved toward cherry

    verdict = held_out_verdict(folder)
    assert verdict.reward.before == 0 and verdict.reward.after == pytest.approx(sum(said[1]) / len(said[1]))
    logged = {key for row in read_metrics(folder) for key in row}
    assert {"rewards/says_it/mean", "rewards/match_1/mean", "frac_reward_zero_std", "completions/mean_length",
            "kl"} <= logged
    info = json.loads((folder / "run_info.json").read_text())
    assert [t["name"] for t in info["reward_terms"]] == ["says_it", "match_1"]


def test_a_rule_naming_a_missing_column_fails_before_training(two_word_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "drills.jsonl", [{"prompt": f"Drill {i}?", "answer": "1"} for i in range(12)])
    cfg = preference_stage_config(two_word_model_dir, data, "grpo", bits=32, batch_size=4, preference={
        "num_generations": 4, "rewards": [{"kind": "numeric", "reference": "solution"}]})
    with pytest.raises(ConfigError) as error:
        check_reference_columns(cfg, load_prompt_rows(cfg.data).columns)
    assert set(error.value.problems) == {"preference.rewards[0].reference"}
    assert "no column 'solution'" in error.value.problems["preference.rewards[0].reference"]


# --- the RLHF tab: form, refusals, bench, a rule-rewarded run and its verdict -----------------------------------

RULES_YAML = "- {kind: numeric, reference: answer, extract: last_number, name: right}\n- {kind: length, max_words: 3}\n"


def tab_form(model_dir, **extra) -> dict:
    from components.rlhf_form import GRPO_REWARD_KINDS

    return {"model_kind": "Local folder", "model_source": str(model_dir), "model_bits": 32, "method": "GRPO",
            "reward_run": "", "batch_size": 4, "num_generations": 2, "max_completion_length": 8,
            "policy_max_steps": 2, "grpo_reward": GRPO_REWARD_KINDS[1], "reward_rules": RULES_YAML, **extra}


def test_tab_form_turns_the_reward_choice_into_the_config(tiny_model_dir):
    from components.rlhf_form import GRPO_REWARD_KINDS, stage_config_from_form

    rules_only = stage_config_from_form("grpo", "bundled:lab_drills", tab_form(tiny_model_dir, reward_run="rm"))
    assert rules_only.preference.reward_model == "" and rules_only.preference.reward_weights() == {
        "right": 1.0, "length_1": 1.0}
    both = stage_config_from_form("grpo", "bundled:lab_drills", tab_form(
        tiny_model_dir, reward_run="rm", grpo_reward=GRPO_REWARD_KINDS[2], reward_model_weight=0.25))
    assert both.preference.reward_weights() == {"right": 1.0, "length_1": 1.0, "reward_model": 0.25}
    model_only = stage_config_from_form("grpo", "bundled:course_prefs", tab_form(
        tiny_model_dir, reward_run="rm", grpo_reward=GRPO_REWARD_KINDS[0]))
    assert model_only.preference.rewards == [] and model_only.preference.reward_model == "rm"
    with pytest.raises(ConfigError) as error:
        stage_config_from_form("grpo", "bundled:lab_drills", tab_form(tiny_model_dir, reward_rules="- {kind: ["))
    assert set(error.value.problems) == {"preference.rewards"} and "not valid YAML" in str(error.value)


def test_tab_refuses_bad_rules_before_starting_anything(tiny_model_dir, tmp_path):
    from components.rlhf_runs import start_stage
    from finetune.services.runs import RunManager

    manager = RunManager(tmp_path / "runs")
    _, message = start_stage(manager, None, "policy", **tab_form(
        tiny_model_dir, reward_rules="- {kind: format, pattern: '(\\d+\\s?)+$'}\n- {kind: numeric, reference: x}"))
    assert "preference.rewards[0].pattern" in message and "catastrophic" in message
    _, message = start_stage(manager, None, "policy", **tab_form(
        tiny_model_dir, reward_rules="- {kind: numeric, reference: solution}"))
    assert "preference.rewards[0].reference" in message and "no column 'solution'" in message
    from components.rlhf_rules import GRPO_DATA

    _, message = start_stage(manager, None, "policy", **tab_form(tiny_model_dir, grpo_data=GRPO_DATA[1]))
    assert "preference.rewards[0].reference" in message and "no column 'answer'" in message  # pairs: prompts only
    assert manager.list_ids() == []


def test_bench_scores_sampled_answers_and_rescores_them_without_sampling(tiny_model_dir, tmp_path):
    """Real sampling from the tiny model through the Chat tab's engine; every score checked against the rule by
    hand on the answers it sampled, then the same answers re-scored after the rules changed."""
    from components.rlhf_rules import bench_prompt_choices, bench_rescore, bench_sample
    from finetune.services.chat import ChatEngine
    from finetune.services.runs import RunManager
    from finetune.services.scoring import ScorerCache

    manager, engine, cache = RunManager(tmp_path / "runs"), ChatEngine(), ScorerCache()
    picked = bench_prompt_choices()[:2]
    form = tab_form(tiny_model_dir, bench_prompts=picked, bench_answers=3)
    summary, table, sample = bench_sample(manager, engine, cache, **form)
    assert len(table) == 6 and summary.startswith("Answers by `base`")
    first = [f"{t:.2f}" for t in table[table["prompt #"] == 1]["total"]]
    assert ("scored " + ", ".join(first)) in summary or "all scored" in summary  # the learner's own group
    references = {row["prompt"][-1]["content"]: row["answer"] for row in load_prompt_rows(
        DataConfig(source="bundled:lab_drills")).train}
    right, short = parse_rules([{"kind": "numeric", "reference": "answer", "extract": "last_number"},
                                {"kind": "length", "max_words": 3}])
    for line in table.to_dict("records"):
        row = {"answer": references[line["prompt"]]}
        assert (line["right"], line["length_1"]) == (right.score(line["answer"], row), short.score(line["answer"], row))
    _, rescored = bench_rescore(manager, cache, sample, **{**form, "reward_rules": "- {kind: contains, text: a}"})
    assert list(rescored["answer"]) == list(table["answer"])  # the same answers, not sampled again
    assert list(rescored["contains_0"]) == [float("a" in a.casefold()) for a in table["answer"]]


def test_tab_trains_a_rule_rewarded_run_on_the_drills_and_shows_its_verdict(tiny_model_dir, tmp_path):
    from components.rlhf_rules import grpo_view
    from components.rlhf_runs import start_stage
    from finetune.services.runs import RunManager

    manager = RunManager(tmp_path / "runs")
    run_id, message = start_stage(manager, None, "policy", **tab_form(tiny_model_dir))
    assert run_id.startswith("grpo") and "240 training prompts, 32 held out" in message, message
    manager.wait(run_id, timeout=600)
    assert manager.status(run_id)["state"] == "completed", manager.log_tail(run_id, 20)
    terms, health, verdict = grpo_view(manager, run_id)
    assert {"right", "length_1", "total (weighted)"} <= set(terms["series"])
    assert {"groups with no signal (share)", "KL to the start", "answer length (tokens)"} <= set(health["series"])
    held = json.loads((manager.run_dir(run_id) / HELD_OUT_ANSWERS).read_text())
    accuracy = [sum(held[side]["scores"]["right"]) / 32 for side in ("before", "after")]
    assert f"accuracy (right): {accuracy[0]:.0%}" in verdict and f"-> {accuracy[1]:.0%}" in verdict
    means = [r["rewards/right/mean"] for r in read_metrics(manager.run_dir(run_id)) if "rewards/right/mean" in r]
    assert "Your run is RLVR" in verdict and f"right {means[0]:.2f} → {means[-1]:.2f}" in verdict
    assert f"Held-out accuracy {accuracy[0]:.0%} → {accuracy[1]:.0%}" in verdict


def test_an_allowed_python_reward_is_loaded_with_trls_signature(tmp_path, monkeypatch):
    from finetune.core.config import PYTHON_REWARDS_ENV
    from finetune.stages.grpo import python_reward

    (tmp_path / "my_reward.py").write_text(
        "def score(prompts, completions, answer, **_):\n"
        "    return [float(a in c[0]['content']) for c, a in zip(completions, answer)]\n")
    spec = f"{tmp_path / 'my_reward.py'}:score"
    monkeypatch.setenv(PYTHON_REWARDS_ENV, "1")
    function = python_reward(spec)
    assert function.__name__ == "python_reward"
    assert function(prompts=["q", "q"], completions=[[{"content": "it is 4"}], [{"content": "5"}]],
                    answer=["4", "4"]) == [1.0, 0.0]
    monkeypatch.setenv("SPACE_ID", "someone/lora-lab")  # a Space, as the app detects one
    with pytest.raises(ConfigError, match="Space refuses it"):
        python_reward(spec)


def test_bad_bench_and_rule_requests_through_the_api(tmp_path):
    """Through the app's API (gradio_client): every refusal says what to change, and nothing starts."""
    from gradio_client.exceptions import AppError

    from components.rlhf_form import GRPO_REWARD_KINDS
    from components.rlhf_rules import bench_prompt_choices
    from helpers import app_client, served_app

    rules_only = {"grpo_reward": GRPO_REWARD_KINDS[1], "data_file": None, "data_hub_name": None, "reward_run": None}
    with served_app(tmp_path / "runs") as url:
        client = app_client(url)
        message = client.predict(**rules_only, reward_rules="- {kind: format, pattern: '(x|y*)*'}",
                                 api_name="/rlhf_check_rules")
        assert "preference.rewards[0].pattern" in message and "catastrophic" in message
        with pytest.raises(AppError, match="at most 24 per request"):
            client.predict(**rules_only, reward_rules=RULES_YAML, bench_prompts=bench_prompt_choices()[:5],
                           bench_answers=5, api_name="/rlhf_bench_sample")
        with pytest.raises(AppError, match="sample answers first"):
            client.predict(**rules_only, reward_rules=RULES_YAML, api_name="/rlhf_bench_rescore")
        _, message = client.predict(**rules_only, method="GRPO", reward_rules="- {kind: numeric, reference: sol}",
                                    api_name="/rlhf_start_policy")
        assert "preference.rewards[0].reference" in message and "no column 'sol'" in message
        _, message = client.predict(**rules_only, method="GRPO", reward_rules="- {kind: length, max_words: 3, "
                                    "weight: 0}", api_name="/rlhf_start_policy")
        assert "preference.rewards" in message and "sum to zero" in message
    assert not [p for p in (tmp_path / "runs").iterdir() if (p / "status.json").is_file()]


def test_the_run_history_says_what_a_grpo_run_was_rewarded_for(tiny_model_dir):
    """The rules live in the run's config; the history shows them, with their weights, beside the run's result."""
    from components.rlhf_form import GRPO_REWARD_KINDS, stage_config_from_form
    from components.train_runs import reward_text

    both = stage_config_from_form("grpo", "bundled:lab_drills", tab_form(
        tiny_model_dir, reward_run="rm", grpo_reward=GRPO_REWARD_KINDS[2], reward_model_weight=0.25))
    text = reward_text(both)
    rules = parse_rules(both.preference.rewards)
    for rule in rules:
        assert f"{rule.name} ×{rule.weight:g} ({rule.describe()})" in text
    assert text.endswith("reward_model ×0.25 (`rm`)") and text.count(" + ") == len(rules)
    assert reward_text(stage_config_from_form("dpo", "bundled:course_prefs", tab_form(tiny_model_dir))) == ""
