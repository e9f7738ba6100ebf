"""Online preference optimization: TRL ``GRPOTrainer``. For each prompt of the preference data it samples
``preference.num_generations`` answers, scores them with the trained reward model (``preference.reward_model``)
and pushes the policy towards the answers scored above their group's mean. Same LoRA and ``adapter/`` as DPO."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.core.config import RunConfig
from finetune.core.hardware import HardwareProfile, detect
from finetune.core.metrics import MetricsCallback
from finetune.core.models import load_tokenizer, resolve_run_folder
from finetune.core.preference import PreferenceData
from finetune.core.run_folder import ADAPTER_DIR, REWARD_DIR
from finetune.stages.common import (Built, keep_adapters_in_compute_dtype, load_preference_data, preference_data_fields,
                                    record_run_info, save_default_adapter, training_args)
from finetune.stages.policy import policy_model
from finetune.stages.reward import RewardScorer

def to_grpo_config(cfg: RunConfig, profile: HardwareProfile, run_dir: Path) -> Any:
    from trl import GRPOConfig

    args = training_args(cfg, profile, run_dir, has_eval=False)  # held-out rows would need sampling too
    args.pop("max_length")  # GRPO bounds the sampled answer instead (max_completion_length)
    p = cfg.preference
    return GRPOConfig(**args, beta=p.beta, num_generations=p.num_generations,
                      max_completion_length=p.max_completion_length)


class RewardModelReward:
    """GRPO's reward function: the trained reward model's score of each sampled answer to its prompt."""

    __name__ = "reward_model"  # TRL logs each reward function under its name (rewards/reward_model/mean)

    def __init__(self, scorer: RewardScorer):
        self.scorer = scorer

    def __call__(self, prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        return self.scorer.score(list(prompts), list(completions))


def _prompts(data: PreferenceData) -> Any:
    """The prompts of the preference pairs, each once: GRPO writes its own answers."""
    from datasets import Dataset

    seen: set[str] = set()
    rows = []
    for prompt in data.train["prompt"]:
        key = repr(prompt)
        if key not in seen:
            seen.add(key)
            rows.append({"prompt": prompt})
    return Dataset.from_list(rows)


def build(cfg: RunConfig, run_dir: Path) -> Built:
    """GRPOTrainer on the preference data's prompts, rewarded by a trained reward model."""
    from trl import GRPOTrainer

    profile = detect()
    tokenizer = load_tokenizer(cfg.model)
    data = load_preference_data(cfg, "paired")
    reward_dir = resolve_run_folder(cfg.preference.reward_model, run_dir.parent, REWARD_DIR)
    reward = RewardModelReward(RewardScorer(reward_dir, profile))
    model, peft_config, start = policy_model(cfg, run_dir, profile)
    callback = MetricsCallback(run_dir, stage="grpo")
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=to_grpo_config(cfg, profile, run_dir),
                          train_dataset=_prompts(data), processing_class=tokenizer, peft_config=peft_config,
                          callbacks=[callback])
    keep_adapters_in_compute_dtype(trainer.model, profile)
    record_run_info(trainer, run_dir, profile, stage=type(trainer).__name__, started_from=start,
                    reward_model=str(reward_dir), **preference_data_fields(data))
    return Built(trainer, callback, has_eval=False)  # held-out rows would need sampling too


def save(cfg: RunConfig, trainer: Any, run_dir: Path) -> Path:
    return save_default_adapter(cfg, trainer, run_dir / ADAPTER_DIR)
