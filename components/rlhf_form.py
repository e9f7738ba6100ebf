"""The RLHF tab's form -> the RunConfig of one stage (reward, DPO, KTO, GRPO): the stage's CPU preset with the
form's values on top (forms.run_config_from_form, as every tab that starts a job), every source through the path
gate; and where step 2's preference data comes from."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from components.forms import MODEL_KINDS, PREFERENCE_DATA_KINDS, form_sections, run_config_from_form
from finetune.core import paths
from finetune.core.config import DPO_LOSSES, EMBEDDED_MODEL, KTO_LOSSES, ConfigError, RunConfig, load_config
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


# The form's keys that name a config field otherwise than "<section>_<field>" (forms.form_sections maps the rest);
# each stage also reads its own "reward_"/"policy_" learning rate and steps.
FORM_FIELDS = {"max_seq_length": "data.max_seq_length", "beta": "preference.beta", "loss_type": "preference.loss_type",
               "reward_run": "preference.reward_model", "num_generations": "preference.num_generations",
               "max_completion_length": "preference.max_completion_length", "batch_size": "training.batch_size",
               "eval_steps": "training.eval_steps", "early_stopping_patience": "training.early_stopping_patience",
               "keep": "training.keep", "report_to": "training.report_to", "processes": "training.processes"}
NOT_FIELDS = ("model_kind", "model_source", "data_kind", "data_file", "data_hub_name")  # sources: assembled here
# An empty choice means this value, or with EMPTY_IS_PRESET the preset's (it is not a value to check).
EMPTY_IS = {"data_split": "train", "data_hub_config": None, "reward_run": "", "processes": 1}
EMPTY_IS_PRESET = ("loss_type", "keep", "report_to")


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
    """The RunConfig of one stage from the shared form over the stage's preset; ConfigError lists every bad field."""
    prefix = "reward" if stage == "reward" else "policy"
    start = form.get("start_adapter") or ""
    # Gated even where this stage ignores them: no request names a path the gate has not seen.
    for value in (start, form.get("reward_run")):
        if value != BASE_CHOICE:
            paths.run_id_or_folder(value)
    base = preset(stage)
    given = {**EMPTY_IS, **{k: v for k, v in form.items() if v or k not in (*EMPTY_IS, *EMPTY_IS_PRESET)}}
    sections = form_sections(given, {**FORM_FIELDS, f"{prefix}_learning_rate": "training.learning_rate",
                                     f"{prefix}_max_steps": "training.max_steps"}, skip=NOT_FIELDS)
    model, lora, preference = sections["model"], sections["lora"], sections["preference"]
    model.update(source=form_model_source(form), bits=form.get("model_bits", 4))
    rank = lora.get("rank", base.lora.rank)
    lora["alpha"] = 2 * rank if isinstance(rank, (int, float)) and not isinstance(rank, bool) else rank
    sections["data"]["source"] = source
    preference["start_adapter"] = "" if stage == "reward" or start == BASE_CHOICE else start
    loss, allowed = preference.get("loss_type", base.preference.loss_type), {"kto": KTO_LOSSES, "dpo": DPO_LOSSES}
    if stage in allowed and loss not in allowed[stage]:
        preference["loss_type"] = "kto" if stage == "kto" else "sigmoid"
    # Past one device: data parallel only (FSDP shards an SFT run's base, not these stages').
    sections["training"]["strategy"] = "ddp" if _whole(form.get("processes")) > 1 else "single"
    preference.update(grpo_rewards_from_form(form))
    cfg = run_config_from_form(sections, base, run_name=stage, stage=stage)
    # The model, start adapter and reward model folders; form_data_source gated the data.
    paths.check_config(cfg, data=False)
    return cfg
