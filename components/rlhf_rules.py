"""Step 4's rule rewards for GRPO, apart from the tab's layout: the rules box, the reward bench (sample answers,
score them per term, GRPO's advantage, groups with no learning signal, re-score without re-sampling), the data a
rule-rewarded run trains on (the bundled drills, or step 2's data), and a GRPO run's curves and held-out verdict.
Not a tab: components/rlhf_tab.py lays these out and wires them (their api_names)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from components.rlhf_form import BASE_CHOICE, GRPO_REWARD_KINDS, form_model_source, uses_rules
from components.shared import (problems_markdown, refusal, require_visible, series_frame, visible_adapters,
                               visitor_of)
from finetune.core import paths
from finetune.core.config import ConfigError, DataConfig, ModelConfig, RunConfig, from_dict, load_config
from finetune.core.data import DataError
from finetune.core.data_sources import load_raw
from finetune.core.models import ModelSourceError, resolve_run_folder
from finetune.core.prompt_data import PromptRows, check_reference_columns, is_preference_columns, load_prompt_rows
from finetune.core.rewards import RuleProblems, parse_rules, rules_from_yaml
from finetune.core.run_folder import REWARD_DIR, RUN_CONFIG
from finetune.core.run_status import read_metrics, read_status
from finetune.services.course import group_baseline_sentence, rlvr_sentence
from finetune.services.evaluate import Candidate, adapter_name
from finetune.services.reward_bench import BenchError, BenchSample, sample_bench, score_bench
from finetune.services.rule_verdict import held_out_verdict
from finetune.services.runs import RunManager

DRILLS = "bundled:lab_drills"
GRPO_DATA = ("Bundled drills (lab_drills: questions with reference answers)",
             "Step 2's data (a file with prompt and reference columns, or the prompts of pairs)")
DRILLS_PRESET = "grpo-drills-cpu"
BENCH_PROMPT_CHOICES = 40   # prompts offered in the bench's picker
# GRPO's curves: every reward term's mean is added per run (its names come from the run's config).
GRPO_HEALTH = (("frac_reward_zero_std", "groups with no signal (share)"), ("kl", "KL to the start"))
GRPO_LENGTH = (("completions/mean_length", "answer length (tokens)"),)


def drills_rules_text() -> str:
    """The drills preset's rules as the YAML the rules box shows."""
    import yaml

    try:
        rules = load_config(paths.CONFIGS_DIR / f"{DRILLS_PRESET}.yaml").preference.rewards
    except ConfigError:
        rules = []
    return yaml.safe_dump(rules, sort_keys=False, default_flow_style=None, width=200)


def uses_drills(form: dict[str, Any]) -> bool:
    return (form.get("grpo_data") or GRPO_DATA[0]) == GRPO_DATA[0]


# --- the data of a rule-rewarded run ------------------------------------------------------------------------------

def grpo_prompt_rows(cfg: RunConfig) -> PromptRows | None:
    """The prompt rows a GRPO run trains on, checked against its rules before a child starts; None for preference
    data (pairs or thumbs: the tab checks those as for DPO)."""
    if is_preference_columns(load_raw(cfg.data)[0].column_names):
        check_reference_columns(cfg, ["prompt"])  # pairs give GRPO their prompts only
        return None
    rows = load_prompt_rows(cfg.data, cfg.training.seed)
    check_reference_columns(cfg, rows.columns)
    return rows


def prompt_data_report(cfg: RunConfig, rows: PromptRows) -> tuple[str, list[str]]:
    per_step = cfg.training.batch_size // cfg.preference.num_generations
    prompts = cfg.training.max_steps * per_step
    statement = (f"**{len(rows.train)} training prompts, {len(rows.held_out)} held out** (answered before and after "
                 f"training for the verdict). {cfg.training.max_steps} steps x {per_step} prompts x "
                 f"{cfg.preference.num_generations} sampled answers = {prompts} prompts seen.")
    warnings = [] if rows.held_out else ["No held-out prompts: this run will have no before/after verdict."]
    return statement, warnings


# --- the bench ----------------------------------------------------------------------------------------------------

def bench_prompt_choices() -> list[str]:
    """The first prompts of the bundled drills (the bench's picker); step 2's data is sampled as it is named."""
    try:
        rows = load_prompt_rows(DataConfig(source=DRILLS)).train
    except DataError:
        return []
    return [row["prompt"][-1]["content"] for row in rows[:BENCH_PROMPT_CHOICES]]


def _bench_rows(picked: list[str]) -> list[dict[str, Any]]:
    rows = {row["prompt"][-1]["content"]: row for row in load_prompt_rows(DataConfig(source=DRILLS)).train}
    unknown = [p for p in picked if p not in rows]
    if unknown:
        raise BenchError(f"Not a prompt of the bundled drills: {unknown[0][:80]}")
    return [rows[p] for p in picked]


def gate_sources(form: dict[str, Any]) -> None:
    """Every source the form names goes through the path gate before anything reads it, also where this handler
    ignores it (as stage_config_from_form does): a refused path gets the gate's one message, and no request learns
    whether a path it may not reach exists."""
    paths.model_source(form_model_source(form))
    for run in (form.get("start_adapter"), form.get("reward_run")):
        if run and run != BASE_CHOICE:
            paths.run_id_or_folder(run)
    paths.hub_id(form.get("data_hub_name"))
    paths.uploaded_file(form.get("data_file"))


def _rules(rules_text: str | None) -> list[Any]:
    try:
        return parse_rules(rules_from_yaml(rules_text))
    except RuleProblems as error:
        raise ConfigError({f"preference.{k}": v for k, v in error.problems.items()}) from None


def _policy(manager: RunManager, form: dict[str, Any], visitor: Any) -> Candidate:
    """The model GRPO would start from: the base, or the picked SFT adapter."""
    model = ModelConfig(source=form_model_source(form), bits=form.get("model_bits", 4))
    start = form.get("start_adapter") or BASE_CHOICE
    if start == BASE_CHOICE:
        return Candidate("base", model)
    require_visible(manager, start, visitor, "sample from this adapter")
    adapters = visible_adapters(manager, visitor)
    if start not in adapters:
        raise BenchError(f"No finished adapter '{start}' to sample from.")
    return Candidate(adapter_name(start), model, adapters[start])


def _reward_model(manager: RunManager, cache: Any, form: dict[str, Any]) -> tuple[Any, float] | None:
    weight = form.get("reward_model_weight", 1.0)
    if form.get("grpo_reward") == GRPO_REWARD_KINDS[1] or not form.get("reward_run") or not weight:
        return None
    return cache.get(resolve_run_folder(str(form["reward_run"]), manager.root, REWARD_DIR)), float(weight)


def _scored(sample: BenchSample, manager: RunManager, cache: Any, form: dict[str, Any]) -> tuple[str, pd.DataFrame]:
    rules = _rules(form.get("reward_rules")) if uses_rules(form) else []
    reward_model = _reward_model(manager, cache, form)
    if not rules and reward_model is None:
        raise BenchError("Nothing to score with: pick rules (or both) as GRPO's reward, or a reward model in step 3.")
    scores = score_bench(sample, rules, reward_model)
    first = [row for row in scores.table if row["prompt #"] == 1]
    lesson = group_baseline_sentence([row["total"] for row in first], [row["advantage"] for row in first])
    return (f"Answers by `{sample.model}`. " + scores.summary() + f"\n\n*Prompt 1:* {lesson}",
            pd.DataFrame(scores.table))


def bench_sample(manager: RunManager, engine: Any, cache: Any, request: gr.Request = None,
                 progress: gr.Progress = gr.Progress(), **form: Any) -> tuple[str, pd.DataFrame, Any]:
    """Sample N answers to each picked drill from the policy and score them; the answers are kept for re-scoring."""
    visitor = visitor_of(request)
    try:
        gate_sources(form)
        _rules(form.get("reward_rules"))  # a bad rule is named before minutes of sampling
        picked = list(form.get("bench_prompts") or [])
        count = int(form.get("bench_answers") or 0)
        rows = _bench_rows(picked)
        sample = sample_bench(engine, _policy(manager, form, visitor), rows, count,
                              int(form.get("max_completion_length") or 32),
                              on_answer=lambda done, total: progress(done / total, desc=f"answer {done} of {total}"))
        summary, table = _scored(sample, manager, cache, form)
    except ConfigError as error:
        return problems_markdown(error), pd.DataFrame(), gr.skip()
    except (BenchError, DataError, ModelSourceError, ValueError, OSError) as error:
        raise refusal(f"Reward bench: {error}") from None
    return summary, table, sample.__dict__


def bench_rescore(manager: RunManager, cache: Any, sample: dict[str, Any] | None, request: gr.Request = None,
                  **form: Any) -> tuple[str, pd.DataFrame]:
    """Score the answers sampled last with the rules as they are now (no new sampling)."""
    try:
        gate_sources(form)
        if not sample:
            raise refusal("Reward bench: sample answers first, then edit the rules and re-score them.")
        return _scored(BenchSample(**sample), manager, cache, form)
    except ConfigError as error:
        return problems_markdown(error), pd.DataFrame()
    except (BenchError, ModelSourceError, ValueError, OSError) as error:
        raise refusal(f"Reward bench: {error}") from None


# --- a GRPO run's curves and verdict ------------------------------------------------------------------------------

def grpo_view(manager: RunManager, run_id: str | None, request: gr.Request = None
              ) -> tuple[Any, Any, str]:
    """(per-term reward means, health curves: zero-signal share, KL and answer length, held-out verdict) of the
    watched policy run when it is a GRPO run the visitor may see."""
    if not run_id or not manager.can_see(run_id, visitor_of(request)) or \
            read_status(manager.run_dir(run_id)).get("stage") != "grpo":
        return None, None, ""
    folder = manager.run_dir(run_id)
    rows = read_metrics(folder)
    terms = sorted({key.split("/")[1] for row in rows for key in row
                    if key.startswith("rewards/") and key.endswith("/mean")})
    per_term = tuple((f"rewards/{name}/mean", name) for name in terms) + (("reward", "total (weighted)"),)
    verdict = held_out_verdict(folder)
    text = verdict.text() if verdict else _no_verdict(folder)
    if rows and terms:
        text += "\n\n" + _lesson(rows, terms, verdict)
    return (series_frame(rows, per_term, "value"), series_frame(rows, GRPO_HEALTH + GRPO_LENGTH, "value"), text)


def _lesson(rows: list[dict[str, Any]], terms: list[str], verdict: Any) -> str:
    """The run's own numbers in the course's words (RLHF vs RLVR, the group baseline)."""
    def first_last(key: str) -> tuple[float, float] | None:
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        return (values[0], values[-1]) if values else None

    moved = {name: span for name in terms if (span := first_last(f"rewards/{name}/mean")) is not None}
    accuracy = (verdict.accuracy.before, verdict.accuracy.after) if verdict and verdict.accuracy else None
    return rlvr_sentence(moved, first_last("frac_reward_zero_std"), accuracy, "reward_model" in terms)


def _no_verdict(folder: Path) -> str:
    state = read_status(folder).get("state")
    try:
        rules = load_config(folder / RUN_CONFIG).preference.rewards
    except ConfigError:
        rules = []
    if not rules:
        return "This GRPO run is rewarded by the reward model only: its verdict is the comparison below."
    if state in ("completed", "stopped"):
        return "No held-out verdict: this run's data left no held-out prompts to answer before and after."
    return "The held-out verdict appears when the run ends (its prompts are answered before and after training)."


def rules_config_check(**form: Any) -> str:
    """The rules as the config reads them, or every problem at once (before any sampling or training)."""
    try:
        gate_sources(form)
        rules = _rules(form.get("reward_rules"))
        from_dict({"stage": "grpo", "training": {"batch_size": 4},
                   "preference": {"num_generations": 4, "rewards": rules_from_yaml(form.get("reward_rules"))}})
    except ConfigError as error:
        return problems_markdown(error)
    return "Rules OK: " + "; ".join(f"`{r.name}` ({r.weight:g}): {r.describe()}" for r in rules)
