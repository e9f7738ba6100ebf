"""The RLHF stages with real TRL trainers on the CPU, on the tiny random Llama: a reward model (RewardTrainer),
DPO (DPOTrainer, fresh LoRA and continued from an SFT adapter) and KTO (KTOTrainer on thumbs). Each logs its
metrics, saves something reloadable, and runs through the same run folder / RunManager as SFT."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import preference_stage_config as stage_config, tiny_run_config, write_jsonl
from finetune.core.run_status import read_metrics, read_status
from finetune.services.runs import RunManager
from finetune.train import run


def values(rows, key):
    return [r[key] for r in rows if isinstance(r.get(key), (int, float))]


@pytest.fixture(scope="module")
def reward_run(tiny_model_dir, pairs_file, tmp_path_factory):
    """A reward model trained through the RunManager's child process: (manager, run id)."""
    manager = RunManager(tmp_path_factory.mktemp("reward") / "runs")
    run_id = manager.start(stage_config(tiny_model_dir, pairs_file, "reward"))
    manager.wait(run_id, timeout=300)
    return manager, run_id


@pytest.fixture(scope="module")
def dpo_run(tiny_model_dir, pairs_file, tmp_path_factory):
    """A DPO run in a runs folder: (manager, its config, its run folder)."""
    manager = RunManager(tmp_path_factory.mktemp("dpo") / "runs")
    cfg = stage_config(tiny_model_dir, pairs_file, "dpo", max_steps=3, eval_steps=3)
    run(cfg, manager.run_dir("dpo-test"))
    return manager, cfg, manager.run_dir("dpo-test")


def test_reward_model_through_the_run_manager(reward_run):
    """The child process (`python -m finetune.train`), metrics with held-out accuracy from step 0, a reward
    model that reloads to the same scores, and no chat adapter."""
    from finetune.services.scoring import RewardScorer

    manager, run_id = reward_run
    status = manager.status(run_id)
    assert status["state"] == "completed", manager.log_tail(run_id)
    assert status["stage"] == "reward"
    rows = read_metrics(manager.run_dir(run_id))
    assert len(values(rows, "loss")) == 4 and len(values(rows, "accuracy")) == 4
    assert [r["step"] for r in rows if "eval_accuracy" in r] == [0, 2, 4]  # before training, then every 2 steps
    assert all("eval_margin" in r for r in rows if "eval_accuracy" in r)
    folder = manager.run_dir(run_id) / "reward_model"
    assert run_id in manager.reward_models() and run_id not in manager.finished_adapters()
    # Reloaded, the reward model ranks the held-out pairs exactly as the trainer's last evaluation did.
    scorer = RewardScorer(folder)
    from finetune.core.preference import load_preferences

    held = load_preferences(scorer.cfg.data).eval
    chosen = scorer.score([r["prompt"] for r in held], [r["chosen"] for r in held])
    rejected = scorer.score([r["prompt"] for r in held], [r["rejected"] for r in held])
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(held)
    assert accuracy == pytest.approx(values(rows, "eval_accuracy")[-1])
    margin = sum(c - r for c, r in zip(chosen, rejected)) / len(held)
    # 4-bit CPU kernels round slightly differently for other batch shapes (trainer: chosen+rejected per batch).
    assert margin == pytest.approx(values(rows, "eval_margin")[-1], rel=0.03)
    a, b = scorer.rank("What does setting 3 control in LoRA?", held[0]["chosen"][0]["content"], "It depends.")
    assert a != b


@pytest.mark.trajectory
def test_dpo_logs_rising_margins_and_saves_a_chat_adapter(tiny_model_dir, dpo_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    manager, _, run_dir = dpo_run
    assert read_status(run_dir)["state"] == "completed" and read_status(run_dir)["stage"] == "dpo"
    rows = read_metrics(run_dir)
    margins = values(rows, "rewards/margins")
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies"):
        assert len(values(rows, key)) == 3, key
    assert margins[0] == pytest.approx(0.0, abs=1e-6)  # step 1: the policy is still the reference
    assert margins[-1] > margins[0]
    assert [r["step"] for r in rows if "eval_rewards/margins" in r] == [0, 3]  # measured before training too
    assert values(rows, "eval_rewards/margins")[-1] > 0  # held out: the chosen answers gained on the rejected
    assert "dpo-test" in manager.finished_adapters()
    adapter = run_dir / "adapter"
    assert not (adapter / "ref").exists()  # TRL's reference copy is not part of the result
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[5, 6, 7, 8]])
    before = base(ids).logits
    assert not torch.allclose(before, PeftModel.from_pretrained(base, adapter)(ids).logits)


@pytest.mark.trajectory
def test_reward_model_scores_base_and_dpo_answers(reward_run, dpo_run):
    """The comparison behind step 4's button: greedy answers of the base model (adapter disabled) and of the DPO
    adapter from the Chat tab's engine (its one base, no second copy), each scored by the reward model, with
    the degeneration check and a paired verdict; the same answers the Chat tab gives."""
    from finetune.services.chat import ChatEngine, SamplingSettings
    from finetune.services.evaluate import Candidate, compare_policy_answers
    from finetune.services.scoring import RewardScorer

    reward_manager, reward_id = reward_run
    _, cfg, run_dir = dpo_run
    scorer = RewardScorer(reward_manager.reward_models()[reward_id])
    prompts = ["What does setting 3 control in LoRA?", "What does setting 17 control in LoRA?"]
    engine = ChatEngine()
    base, policy = Candidate("base", cfg.model), Candidate("dpo-run", cfg.model, run_dir / "adapter")
    result = compare_policy_answers(engine, scorer, policy, [base], prompts, max_new_tokens=6)
    assert len(result.answers["base"]) == len(result.answers["dpo-run"]) == 2 and engine.base_loads == 1
    greedy = SamplingSettings(max_new_tokens=6, temperature=0.0)
    assert result.answers["dpo-run"][1] == list(engine.stream(prompts[1], [], cfg.model, "dpo-run",
                                                               run_dir / "adapter", greedy))[-1].strip()
    assert result.answers["base"][0] == list(engine.stream(prompts[0], [], cfg.model, settings=greedy))[-1].strip()
    for name in ("base", "dpo-run"):
        assert result.scores[name] == pytest.approx(scorer.score(prompts, result.answers[name]), abs=1e-4)
    [verdict] = result.verdicts
    assert (verdict.model, verdict.against, verdict.prompts) == ("dpo-run", "base", 2)
    assert verdict.wins + verdict.losses + verdict.ties == 2
    assert verdict.verdict == "cannot tell"  # two prompts can never exclude 0.5
    assert {row["model"] for row in result.rows()} == {"base", "dpo-run"} and len(result.rows()) == 4


def test_dpo_continues_an_sft_adapter(tiny_model_dir, pairs_file, qa_file, tmp_path):
    from safetensors.torch import load_file

    root = tmp_path / "runs"
    assert run(tiny_run_config(tiny_model_dir, qa_file, max_steps=2, save_steps=100), root / "sft") == 0
    cfg = stage_config(tiny_model_dir, pairs_file, "dpo", validation_fraction=0.0, max_steps=2,
                       preference={"start_adapter": "sft", "beta": 0.2})
    assert run(cfg, root / "dpo") == 0, read_status(root / "dpo")
    info = json.loads((root / "dpo" / "run_info.json").read_text())
    assert info["started_from"] == str(root / "sft" / "adapter")
    sft = load_file(root / "sft" / "adapter" / "adapter_model.safetensors")
    dpo = load_file(root / "dpo" / "adapter" / "adapter_model.safetensors")
    assert sft.keys() == dpo.keys()
    # Continued, not restarted: LoRA B starts at zero in a fresh adapter, here it starts at the SFT values.
    lora_b = [k for k in sft if "lora_B" in k]
    assert all(torch.count_nonzero(sft[k]) for k in lora_b)
    assert any(not torch.equal(sft[k], dpo[k]) for k in sft)
    assert torch.allclose(torch.cat([sft[k].flatten() for k in lora_b]),
                          torch.cat([dpo[k].flatten() for k in lora_b]), atol=0.05)


def test_dpo_resumes_from_its_last_checkpoint(tiny_model_dir, pairs_file, tmp_path):
    """Resume (the Train/RLHF tabs' button, ``run(..., resume=True)``) carries a DPO run on from its checkpoint:
    the steps already done are not trained again, and the adapter is saved at the end."""
    from finetune.core.run_folder import last_checkpoint

    first = stage_config(tiny_model_dir, pairs_file, "dpo", validation_fraction=0.0, max_steps=2, save_steps=2)
    assert run(first, tmp_path) == 0, read_status(tmp_path)
    checkpoint = last_checkpoint(tmp_path)
    assert checkpoint is not None and checkpoint.endswith("checkpoint-2")
    longer = stage_config(tiny_model_dir, pairs_file, "dpo", validation_fraction=0.0, max_steps=4, save_steps=2)
    assert run(longer, tmp_path, resume=True) == 0, read_status(tmp_path)
    steps = [r["step"] for r in read_metrics(tmp_path) if "loss" in r]
    assert steps == [1, 2, 3, 4]  # 1-2 before, 3-4 after the resume, none twice
    assert last_checkpoint(tmp_path).endswith("checkpoint-4")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


@pytest.mark.trajectory
def test_grpo_samples_answers_and_learns_from_the_reward_model(tiny_model_dir, pairs_file, reward_run, tmp_path):
    """The online stage: GRPO samples answers to the pairs' prompts, the trained reward model scores them, and a
    chat adapter comes out; the RLHF tab charts its mean reward. (On random weights the reward need not rise in
    2 steps; the CPU measurement on the embedded model is in docs/benchmarks.md.)"""
    from components.rlhf_runs import poll_rlhf

    reward_manager, reward_id = reward_run
    cfg = stage_config(tiny_model_dir, pairs_file, "grpo", validation_fraction=0.0, max_steps=2, batch_size=4,
                       preference={"reward_model": str(reward_manager.run_dir(reward_id)), "num_generations": 2,
                                   "max_completion_length": 8})
    manager = RunManager(tmp_path / "runs")
    folder = manager.run_dir("grpo-test")
    assert run(cfg, folder) == 0, read_status(folder)
    rows = read_metrics(folder)
    rewards = values(rows, "reward")
    assert len(rewards) == 2 and all(r == r for r in rewards)  # logged every step, not NaN
    assert values(rows, "rewards/reward_model/mean") == rewards  # the only reward function is the reward model
    assert (folder / "adapter" / "adapter_config.json").is_file()
    assert "grpo-test" in manager.finished_adapters()  # so the Chat tab lists it
    info = json.loads((folder / "run_info.json").read_text())
    assert info["stage"] == "GRPOTrainer" and info["reward_model"].endswith("reward_model")
    outputs = poll_rlhf(manager, "", "")
    policy_id, status, chart = outputs[5], outputs[6], outputs[9]
    assert policy_id == "grpo-test" and "mean reward" in status
    assert "mean reward of sampled answers" in set(chart["series"])


def test_grpo_without_a_reward_model_is_a_config_error(tiny_model_dir, pairs_file):
    from finetune.core.config import ConfigError

    with pytest.raises(ConfigError) as error:
        stage_config(tiny_model_dir, pairs_file, "grpo", batch_size=3, preference={"num_generations": 2})
    assert set(error.value.problems) == {"preference.reward_model", "training.batch_size"}


def test_kto_trains_on_thumbs(tiny_model_dir, tmp_path):
    thumbs = write_jsonl(tmp_path / "thumbs.jsonl", [
        {"prompt": [{"role": "user", "content": f"Question {i}?"}],
         "completion": [{"role": "assistant", "content": "🧪 Lab note: yes." if i % 2 else "No idea."}],
         "label": bool(i % 2)} for i in range(12)])
    cfg = stage_config(tiny_model_dir, thumbs, "kto", validation_fraction=0.0, max_steps=2)
    assert run(cfg, tmp_path / "kto") == 0, read_status(tmp_path / "kto")
    rows = read_metrics(tmp_path / "kto")
    assert len(values(rows, "loss")) == 2 and values(rows, "kl")
    assert (tmp_path / "kto" / "adapter" / "adapter_config.json").is_file()


def test_malformed_pairs_fail_the_run_with_the_row_named(tiny_model_dir, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "same", "rejected": "same"}] * 3)
    assert run(stage_config(tiny_model_dir, bad, "reward"), tmp_path / "run") == 1
    status = read_status(tmp_path / "run")
    assert status["state"] == "failed" and "row 1: chosen and rejected are identical" in status["error"]


def test_dpo_from_a_missing_adapter_says_so(tiny_model_dir, pairs_file, tmp_path):
    cfg = stage_config(tiny_model_dir, pairs_file, "dpo", preference={"start_adapter": "no-such-run"})
    assert run(cfg, tmp_path / "run") == 1
    assert "No adapter found for 'no-such-run'" in read_status(tmp_path / "run")["error"]


# --- the tab's form -> config, without a model -------------------------------------------------------------------

def test_tab_form_builds_each_stage(tiny_model_dir):
    from components.rlhf_form import BASE_CHOICE, stage_config_from_form

    form = {"model_kind": "Local folder", "model_source": str(tiny_model_dir), "model_bits": 8, "lora_rank": 6,
            "start_adapter": "sft-run", "method": "KTO", "beta": 0.3, "loss_type": "sigmoid",
            "reward_max_steps": 7, "policy_max_steps": 9, "batch_size": 2, "eval_steps": 3}
    reward = stage_config_from_form("reward", "bundled:course_prefs", form)
    assert (reward.stage, reward.training.max_steps, reward.preference.start_adapter) == ("reward", 7, "")
    assert (reward.model.bits, reward.lora.rank, reward.lora.alpha) == (8, 6, 12)
    kto = stage_config_from_form("kto", "bundled:course_prefs", form)
    assert (kto.stage, kto.training.max_steps, kto.preference.loss_type, kto.preference.beta) == ("kto", 9, "kto", 0.3)
    assert kto.preference.start_adapter == "sft-run"
    dpo = stage_config_from_form("dpo", "bundled:course_prefs", {**form, "start_adapter": BASE_CHOICE})
    assert dpo.preference.start_adapter == "" and dpo.preference.loss_type == "sigmoid"
    grpo = stage_config_from_form("grpo", "bundled:course_prefs", {**form, "method": "GRPO", "reward_run": "rm-run",
                                                              "num_generations": 2, "max_completion_length": 16})
    assert (grpo.stage, grpo.preference.reward_model, grpo.preference.num_generations,
            grpo.preference.max_completion_length, grpo.training.max_steps) == ("grpo", "rm-run", 2, 16, 9)


def test_tab_refuses_grpo_without_a_reward_model_and_starts_nothing(tiny_model_dir, tmp_path):
    from components.rlhf_runs import start_stage

    manager = RunManager(tmp_path / "runs")
    form = {"model_kind": "Local folder", "model_source": str(tiny_model_dir), "method": "GRPO", "reward_run": "",
            "batch_size": 4, "num_generations": 4}
    watched, message = start_stage(manager, None, "policy", **form)
    assert "reward_model" in message and "name a finished reward run" in message
    assert manager.list_ids() == []
    watched, message = start_stage(manager, None, "policy", **{**form, "reward_run": "no-such-run"})
    assert "Not started" in message and "No reward model found for 'no-such-run'" in message
    assert manager.list_ids() == []


def test_tab_refuses_malformed_pairs_before_starting_anything(tiny_model_dir, tmp_path, monkeypatch):
    from components.rlhf_runs import start_stage

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "uploads"))  # the path gate takes only gradio's uploads
    (tmp_path / "uploads").mkdir()
    bad = write_jsonl(tmp_path / "uploads" / "bad.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"},
                                                           {"prompt": "q", "chosen": "a"}])
    manager = RunManager(tmp_path / "runs")
    form = {"model_kind": "Local folder", "model_source": str(tiny_model_dir), "data_kind": "Uploaded file",
            "data_file": str(bad)}
    _, message = start_stage(manager, None, "reward", **form)
    assert "row 2: 'rejected' is missing or empty" in message and "Not started" in message
    _, message = start_stage(manager, None, "policy", **{**form, "data_kind": "Collected feedback"})
    assert "no feedback store" in message
    assert manager.list_ids() == []  # nothing was started


def test_step_4_comparison_uses_the_chat_models_engine(reward_run, dpo_run):
    """The RLHF tab's comparison button: its answers come from the engine the Chat tab holds (one base in memory
    however often it is clicked), scored by the picked reward model, on the policy's held-out prompts only
    (none of which the reward model or the policy trained on), each named in the summary."""
    import shutil

    from components.rlhf_playground import compare_policy
    from finetune.services.chat import ChatEngine
    from finetune.core.config import save_config
    from finetune.core.preference import held_out_prompts, trained_prompt_keys
    from finetune.services.scoring import ScorerCache

    reward_manager, reward_id = reward_run
    manager, cfg, run_dir = dpo_run
    save_config(cfg, run_dir / "config.yaml")  # what the run manager writes before a run from the app
    shutil.copytree(reward_manager.run_dir(reward_id), manager.run_dir(reward_id), dirs_exist_ok=True)
    engine, cache = ChatEngine(), ScorerCache()
    for _ in range(2):
        summary, table = compare_policy(manager, cache, engine, reward_id, "dpo-test", 2, 6)
        assert "**2 held-out prompts**" in summary and len(table) == 4  # 2 prompts x (base, policy)
    assert engine.base_loads == 1 and cache.loads == 1
    assert table["reward"].notna().all()
    trained = trained_prompt_keys(cfg.data, seed=cfg.training.seed)
    for prompt in set(table["prompt"]):
        assert prompt in summary and prompt.lower() not in trained
        assert prompt in held_out_prompts(cfg.data, seed=cfg.training.seed)
    assert "held-out accuracy" in summary and "pairs)" in summary  # the judge's accuracy, its interval and n
    assert "-> **better**" not in summary and "You asked for" not in summary
    every = held_out_prompts(cfg.data, seed=cfg.training.seed, limit=1000)
    summary, _ = compare_policy(manager, cache, engine, reward_id, "dpo-test", len(every) + 1, 2)
    assert f"You asked for {len(every) + 1} prompts; only {len(every)} held-out prompts exist" in summary
