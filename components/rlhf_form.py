"""The RLHF tab's form -> the RunConfig of one stage (reward, DPO, KTO, GRPO): the stage's CPU preset with the
form's values on top, every source through the path gate; and where step 2's preference data comes from."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from components.forms import MODEL_KINDS, PREFERENCE_DATA_KINDS
from finetune.core import paths
from finetune.core.config import (DPO_LOSSES, EMBEDDED_MODEL, KTO_LOSSES, ConfigError, RunConfig, from_dict,
                                  load_config, to_dict)
from finetune.core.preference import BUNDLED_PREFERENCES, PreferenceError
from finetune.core.rewards import RuleProblems, rules_from_yaml
from finetune.core.run_folder import FEEDBACK_EXPORTS_DIR
from finetune.services.feedback_export import export_feedback
from finetune.services.runs import RunManager

BASE_CHOICE = "(base model: fresh LoRA)"
# What rewards GRPO's sampled answers (the RLHF tab's step 4); the first is the default (also for API calls).
GRPO_REWARD_KINDS = ("Reward model (RLHF: learned from votes)", "Rules (RLVR: checked answers)", "Both")


def preset(stage: str) -> RunConfig:
    """The stage's CPU preset (configs/<stage>-cpu.yaml), or the defaults when it cannot be read."""
    try:
        return load_config(paths.CONFIGS_DIR / f"{'reward' if stage == 'reward' else stage}-cpu.yaml")
    except ConfigError:
        return RunConfig(stage=stage)


def form_model_source(form: dict[str, Any]) -> str:
    """The model the form names: the embedded one, or the typed Hub id or folder (gated with the rest)."""
    if (form.get("model_kind") or MODEL_KINDS[0]) == "Embedded":
        return EMBEDDED_MODEL
    return (form.get("model_source") or "").strip()


def form_data_source(manager: RunManager, feedback_db: Path | None, stage: str, form: dict[str, Any],
                owner: str | None = None) -> str:
    """Where step 2's preferences come from; collected feedback is exported to a file first: only ``owner``'s
    (None: everyone's, for an operator or an app without sign-in), into a folder of their own."""
    kind = form.get("data_kind") or PREFERENCE_DATA_KINDS[0]
    if kind == "Collected feedback":
        if feedback_db is None:
            raise PreferenceError("This app has no feedback store configured.")
        folder = manager.root / FEEDBACK_EXPORTS_DIR / (owner or "") / time.strftime("%Y%m%d-%H%M%S")
        return str(export_feedback(feedback_db, folder, "thumbs" if stage == "kto" else "pairs", owner))
    if kind == "Uploaded file":
        path = paths.uploaded_file(form.get("data_file"))  # only a real upload; else the gate's one message
        if not path:
            raise PreferenceError("Choose a preference file to upload first (jsonl, json, csv or parquet).")
        return manager.keep_upload(path)
    if kind == "Hub dataset":
        name = paths.hub_id(form.get("data_hub_name"))
        if not name:
            raise PreferenceError("Type the name of a Hub preference dataset, e.g. trl-lib/ultrafeedback_binarized.")
        return name
    return BUNDLED_PREFERENCES


def _whole(value: Any) -> int:
    """A form number as a whole number (a bad value is left to the config's own check: 0 here)."""
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0


def uses_rules(form: dict[str, Any]) -> bool:
    return (form.get("grpo_reward") or GRPO_REWARD_KINDS[0]) != GRPO_REWARD_KINDS[0]


def grpo_rewards_from_form(form: dict[str, Any]) -> dict[str, Any]:
    """GRPO's reward terms: the reward model (the default), the rules typed as YAML, or both."""
    try:
        rules = rules_from_yaml(form.get("reward_rules")) if uses_rules(form) else []
    except RuleProblems as error:
        raise ConfigError({f"preference.{k}": v for k, v in error.problems.items()}) from None
    terms: dict[str, Any] = {"rewards": rules, "reward_model_weight": form.get("reward_model_weight", 1.0)}
    if form.get("grpo_reward") == GRPO_REWARD_KINDS[1]:
        terms["reward_model"] = ""  # rules only: no reward model is loaded
    return terms


def stage_config_from_form(stage: str, source: str, form: dict[str, Any]) -> RunConfig:
    """The RunConfig of one stage from the shared form; ConfigError lists every bad field."""
    prefix = "reward" if stage == "reward" else "policy"
    base = to_dict(preset(stage))
    rank = form.get("lora_rank", base["lora"]["rank"])
    start = form.get("start_adapter") or ""
    # Gated even where this stage ignores them: no request names a path the gate has not seen.
    for value in (start, form.get("reward_run")):
        if value != BASE_CHOICE:
            paths.run_id_or_folder(value)
    raw = {
        "run_name": stage, "stage": stage,
        "model": {**base["model"], "source": form_model_source(form), "bits": form.get("model_bits", 4)},
        "lora": {**base["lora"], "rank": rank,
                 "alpha": 2 * rank if isinstance(rank, (int, float)) and not isinstance(rank, bool) else rank},
        "data": {**base["data"], "source": source, "split": form.get("data_split") or "train",
                 "hub_config": form.get("data_hub_config") or None,
                 "skip_bad_rows": form.get("data_skip_bad_rows", base["data"]["skip_bad_rows"]),
                 "max_seq_length": form.get("max_seq_length", base["data"]["max_seq_length"])},
        "preference": {**base["preference"], "beta": form.get("beta", base["preference"]["beta"]),
                       "loss_type": form.get("loss_type") or base["preference"]["loss_type"],
                       "start_adapter": "" if stage == "reward" or start == BASE_CHOICE else start,
                       "reward_model": form.get("reward_run") or "",
                       "num_generations": form.get("num_generations", base["preference"]["num_generations"]),
                       "max_completion_length": form.get("max_completion_length",
                                                         base["preference"]["max_completion_length"]),
                       **grpo_rewards_from_form(form)},
        "training": {**base["training"],
                     "learning_rate": form.get(f"{prefix}_learning_rate", base["training"]["learning_rate"]),
                     "max_steps": form.get(f"{prefix}_max_steps", base["training"]["max_steps"]),
                     "batch_size": form.get("batch_size", base["training"]["batch_size"]),
                     "eval_steps": form.get("eval_steps", base["training"]["eval_steps"]),
                     # GRPO has no held-out set: the config refuses these there unless they are off
                     "early_stopping_patience": form.get("early_stopping_patience",
                                                         base["training"]["early_stopping_patience"]),
                     "keep": form.get("keep") or base["training"]["keep"],
                     # Past one device: data parallel only (FSDP shards an SFT run's base, not these stages').
                     "processes": form.get("processes") or 1,
                     "strategy": "ddp" if _whole(form.get("processes")) > 1 else "single"},
    }
    if stage == "kto" and raw["preference"]["loss_type"] not in KTO_LOSSES:
        raw["preference"]["loss_type"] = "kto"
    if stage == "dpo" and raw["preference"]["loss_type"] not in DPO_LOSSES:
        raw["preference"]["loss_type"] = "sigmoid"
    cfg = from_dict(raw)
    # The model, start adapter and reward model folders; form_data_source gated the data.
    paths.check_config(cfg, data=False)
    return cfg
