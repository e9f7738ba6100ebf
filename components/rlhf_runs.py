"""The RLHF tab's runs, apart from its layout: the preference data a stage will train on (preview, row counts, the
steps fitted to the data), starting the reward model and the policy, watching them (status lines, curves of loss,
accuracy and rewards), and the pipeline summary. Not a tab: components/rlhf_tab.py wires these handlers (its
api_names) to its controls."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from components.forms import PREFERENCE_DATA_KINDS
from components.rlhf_form import (BASE_CHOICE, form_data_source, form_model_source, preset, stage_config_from_form,
                                  uses_rules)
from components.rlhf_rules import DRILLS, grpo_prompt_rows, prompt_data_report, uses_drills
from components.shared import (feedback_owner, live_status, problems_markdown, progress_html, require_visible,
                               series_frame, started_message, visible_reward_models, visitor_of, watched_run)
from finetune.core import paths
from finetune.core.access import LOCAL, AccessDenied, Visitor
from finetune.core.config import ConfigError, RunConfig, from_dict, load_config, to_dict
from finetune.core.data import DataError, hub_first_rows
from finetune.core.metrics import early_stop_note
from finetune.core.models import ModelSourceError, resolve_run_folder
from finetune.core.preference import (BUNDLED_PREFERENCES, MAX_EPOCHS_SMALL_DATA, PreferenceData, convert_rows,
                                      data_size, default_steps, detect_preference_format, preference_renames,
                                      load_preferences, preview_preferences, rows_per_step, size_statement,
                                      size_warnings)
from finetune.core.run_folder import REWARD_DIR, RUN_CONFIG
from finetune.core.run_status import read_metrics, read_status, write_status
from finetune.services.admission import RunError, check_sources
from finetune.services.evaluate import judge_accuracy
from finetune.services.runs import RunManager

RLHF_COLOUR = "#7c3aed"  # the RLHF tab's progress bars, apart from the Train tab's blue
POLICY_STAGES = ("dpo", "kto", "grpo")
POLICY_METHODS = {"DPO": "dpo", "KTO": "kto", "GRPO": "grpo"}
# Plot series per chart: (metrics.jsonl key, legend label). Every series is always present (see shared.series_frame).
REWARD_LOSS = (("loss", "train loss"), ("eval_loss", "held-out loss"))
REWARD_ACCURACY = (("accuracy", "train accuracy"), ("eval_accuracy", "held-out accuracy"),
                   ("eval_margin", "held-out margin"))
POLICY_LOSS = (("loss", "train loss"), ("eval_loss", "held-out loss"))
POLICY_REWARDS = (("rewards/chosen", "rewards/chosen"), ("rewards/rejected", "rewards/rejected"),
                  ("rewards/margins", "rewards/margins"), ("rewards/accuracies", "rewards/accuracies"),
                  ("eval_rewards/margins", "held-out margins"))
# GRPO has no chosen/rejected pair: it logs the reward model's score of the answers it samples.
GRPO_REWARDS = (("reward", "mean reward of sampled answers"), ("reward_std", "spread within a prompt's answers"))


# --- starting -----------------------------------------------------------------------------------------------------

def fit_steps_to_data(cfg: RunConfig, data: PreferenceData, form: dict[str, Any]) -> tuple[RunConfig, str]:
    """Cap the preset's default steps at a few passes over small data (a number the learner typed is kept);
    returns the config and a note saying what changed, if anything."""
    steps_field, form_stage = ("reward_max_steps", "reward") if cfg.stage == "reward" else ("policy_max_steps", "dpo")
    preset_steps = preset(cfg.stage).training.max_steps
    # The form shows the DPO preset's steps for every policy method: that number is a default, not a choice.
    if form.get(steps_field) not in (None, "", preset_steps, preset(form_stage).training.max_steps):
        return cfg, ""
    steps = default_steps(preset_steps, len(data.train), rows_per_step(cfg))
    if steps == cfg.training.max_steps:
        return cfg, ""
    raw = to_dict(cfg)
    raw["training"]["max_steps"] = steps
    return from_dict(raw), (f"Steps: {steps} instead of the preset's {preset_steps}, so the run passes over the "
                            f"{len(data.train)} training rows at most {MAX_EPOCHS_SMALL_DATA} times.")


def steps_box(manager: RunManager, run_id: str | None, shown: Any = None, request: gr.Request = None) -> Any:
    """The Steps box after a start: its info says how many steps the watched run really does and why, when that
    differs from the number in the box (a start caps the preset's steps on small data: the box kept showing 30
    while the run did 2). The value stays as it is, so the next start caps again for its own data."""
    if not run_id or not manager.can_see(run_id, visitor_of(request)):
        return gr.skip()
    try:
        cfg = load_config(manager.run_dir(run_id) / RUN_CONFIG)
    except (ConfigError, RunError, OSError):
        return gr.skip()
    steps = cfg.training.max_steps
    if shown in (None, "") or int(shown) == steps:
        return gr.update(info=None)
    return gr.update(info=f"Run {run_id} does {steps} steps, not {int(shown)}: the preset's steps are capped at "
                          f"{MAX_EPOCHS_SMALL_DATA} passes over small data (the start message says how many rows). "
                          "Type another number to choose it yourself.")


def data_report(cfg: RunConfig, data: PreferenceData) -> tuple[str, list[str]]:
    """What the run will train on (rows, prompts, held out, epochs) and the warnings that follow from it."""
    size, per_step = data_size(data), rows_per_step(cfg)
    return size_statement(size, cfg.training.max_steps, per_step), size_warnings(size, cfg.training.max_steps,
                                                                                 per_step)


def start_stage(manager: RunManager, feedback_db: Path | None, stage: str, request: gr.Request = None,
                **form: Any) -> tuple[Any, str]:
    """Check the data and settings, then train the stage in a child process; returns (watched run, message)
    that states how much data there is, how many passes the steps make over it, and what that will do."""
    stage = stage if stage != "policy" else POLICY_METHODS.get(form.get("method") or "DPO", "dpo")
    source, visitor = None, visitor_of(request)
    try:
        _require_visible_runs(manager, visitor, form)
        source = DRILLS if stage == "grpo" and uses_rules(form) and uses_drills(form) else \
            form_data_source(manager, feedback_db, stage, form, feedback_owner(visitor))
        cfg = stage_config_from_form(stage, source, form)
        # GRPO on prompts with reference answers: rules checked against the data's columns now.
        data = grpo_prompt_rows(cfg) if stage == "grpo" else None
        steps_note = ""
        if data is None:  # malformed pairs are reported now, with their row numbers, not from the child's log
            data = load_preferences(cfg.data, cfg.preference.format, want="unpaired" if stage == "kto" else
                                    "paired", seed=cfg.training.seed, sample=True)
            cfg, steps_note = fit_steps_to_data(cfg, data, form)
        check_sources(cfg)  # an offline Hub model id is reported now, not by a failed run
        if stage == "grpo" and cfg.preference.reward_model:  # the reward model must exist before a child starts
            resolve_run_folder(cfg.preference.reward_model, manager.root, REWARD_DIR)
    except ConfigError as error:
        manager.discard_upload(source)  # a refused start leaves no copy of the upload behind
        return gr.skip(), problems_markdown(error)
    except (DataError, ModelSourceError, AccessDenied) as error:
        manager.discard_upload(source)
        gr.Warning(str(error))
        return gr.skip(), f"**Not started:** {error}"
    try:
        run_id = manager.start(cfg, visitor=visitor)
    except (RunError, AccessDenied) as error:  # signed out, over a limit, or the disk is full
        manager.discard_upload(source)
        gr.Warning(str(error))
        return gr.skip(), f"**Not started:** {error}"
    write_status(manager.run_dir(run_id), stage=stage)  # the child writes it too; the watcher needs it at once
    statement, warnings = data_report(cfg, data) if isinstance(data, PreferenceData) else \
        prompt_data_report(cfg, data)
    for warning in warnings:
        gr.Warning(warning)
    lines = [started_message(manager, run_id, f"{stage} run"), statement, steps_note,
             *(f"⚠️ {w}" for w in warnings)]
    return run_id, "\n\n".join(line for line in lines if line)


def _require_visible_runs(manager: RunManager, visitor: Visitor, form: dict[str, Any]) -> None:
    """A stage may start from, or train against, only runs the visitor may see (not another visitor's adapter)."""
    for key, what in (("start_adapter", "start from this adapter"), ("reward_run", "use this reward model")):
        if form.get(key) and form.get(key) != BASE_CHOICE:
            require_visible(manager, str(form[key]), visitor, what)


# --- watching -----------------------------------------------------------------------------------------------------

def runs_of_stage(manager: RunManager, stages: tuple[str, ...], visitor: Visitor = LOCAL) -> list[str]:
    """Run ids of the given stages that ``visitor`` may see, newest first (the stage is in status.json, so no
    config is parsed)."""
    return [run_id for run_id in manager.visible_ids(visitor)
            if read_status(manager.run_dir(run_id)).get("stage") in stages]


def _last(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return values[-1] if values else None


def _points(rows: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(int(r.get("step") or 0), r[key]) for r in rows
            if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]


def change_text(rows: list[dict[str, Any]], key: str, label: str) -> str:
    """'label: start (before training) → end (step n)' only when the start was measured at step 0; otherwise the
    last value and that its start was not measured. Why: a first point logged after some training shown as the
    start said 'nothing changed' (a DPO run read '0.462 → 0.462' with one evaluation, at its end)."""
    points = _points(rows, key)
    if not points:
        return ""
    (first_step, first), (last_step, last) = points[0], points[-1]
    if first_step == 0 and last_step > 0:
        return f" · {label}: {first:.3f} (before training) → {last:.3f} (step {last_step})"
    if first_step == 0:
        return f" · {label}: {first:.3f} (before training; no step measured yet)"
    return f" · {label}: {last:.3f} at step {last_step} (not measured before training)"


def stage_status_text(run_id: str, status: dict[str, Any], rows: list[dict[str, Any]], key: str, label: str) -> str:
    if not run_id:
        return "No run of this step yet."
    state = status.get("state", "unknown")
    if state == "failed":
        return f"Run `{run_id}` **failed**: {status.get('error') or 'see the log'}"
    change = change_text(rows, key, label)
    early = early_stop_note(status)  # "stopped early at step k (best: step j)"
    return f"Run `{run_id}` is **{state}**{change}" + (f" · {early}" if early else "")


def poll_rlhf(manager: RunManager, reward_id: str, policy_id: str, request: gr.Request = None) -> tuple[Any, ...]:
    """Both watched runs (of those the visitor may see), read from their folders (cheap enough for a 2 s timer)."""
    visitor = visitor_of(request)
    reward_id = watched_run(manager, runs_of_stage(manager, ("reward",), visitor), reward_id, visitor)
    policy_id = watched_run(manager, runs_of_stage(manager, POLICY_STAGES, visitor), policy_id, visitor)
    grpo = bool(policy_id) and read_status(manager.run_dir(policy_id)).get("stage") == "grpo"
    policy_view = (("reward", "mean reward", (POLICY_LOSS, GRPO_REWARDS)) if grpo else
                   ("eval_rewards/margins", "held-out margin", (POLICY_LOSS, POLICY_REWARDS)))
    outputs: list[Any] = []
    for run_id, elem, key, label, charts in (
            (reward_id, "rlhf-reward-progress", "eval_accuracy", "held-out accuracy", (REWARD_LOSS, REWARD_ACCURACY)),
            (policy_id, "rlhf-policy-progress", *policy_view)):
        status = live_status(manager, run_id) if run_id else {"state": "idle"}  # a waiting one: its place
        rows = read_metrics(manager.run_dir(run_id)) if run_id else []
        text = stage_status_text(run_id, status, rows, key, label)
        if run_id and elem == "rlhf-reward-progress" and status.get("state") == "completed":
            # The final accuracy once, with its interval and pair count, and where it started for comparison.
            before = next((value for step, value in _points(rows, key) if step == 0), None)  # measured at step 0
            text = (f"Run `{run_id}` is **completed** · {judge_accuracy(manager.run_dir(run_id)).text()}"
                    + (f" (before training: {before:.3f})" if before is not None else ""))
        outputs += [run_id, text, progress_html(elem, status, rows, colour=RLHF_COLOUR),
                    series_frame(rows, charts[0], "loss"), series_frame(rows, charts[1], "value")]
    active = manager.active_run()
    active = active if active and manager.can_see(active, visitor) else policy_id or reward_id  # no one else's log
    outputs.append(paths.for_visitors(manager.log_tail(active, 25)) if active else "")
    return tuple(outputs)


# --- data preview and the pipeline summary ------------------------------------------------------------------------

def preview_data(manager: RunManager, feedback_db: Path | None, request: gr.Request = None,
                 **form: Any) -> tuple[str, pd.DataFrame]:
    """The data's format and first rows, and before any training: how many pairs and prompts, how many held
    out, how many passes step 4's steps make over them, and the warnings that follow."""
    stage = POLICY_METHODS.get(form.get("method") or "DPO", "dpo")
    if (form.get("data_kind") or PREFERENCE_DATA_KINDS[0]) == "Hub dataset":
        return hub_preference_preview(form)
    try:
        source = form_data_source(manager, feedback_db, stage, form, feedback_owner(visitor_of(request)))
        cfg = stage_config_from_form(stage, source, form)
        fmt, count, rows = preview_preferences(cfg.data, cfg.preference.format)
        data = load_preferences(cfg.data, cfg.preference.format, want="unpaired" if stage == "kto" else "paired",
                                seed=cfg.training.seed)
        cfg, steps_note = fit_steps_to_data(cfg, data, form)
    except ConfigError as error:
        return "Preview unavailable: " + "; ".join(error.problems.values()), pd.DataFrame()
    except (DataError, ModelSourceError, OSError) as error:
        gr.Warning(str(error))
        return f"**Cannot use this data:** {error}", pd.DataFrame()
    statement, warnings = data_report(cfg, data) if isinstance(data, PreferenceData) else \
        prompt_data_report(cfg, data)
    notes = [n for n in data.notes if n not in warnings]
    sampled = (f" in a sample, the {data.sample.text()}: the run reads and checks the whole file when it starts, "
               "and the figures below are of the sample" if data.sample else "")
    lines = [f"**Source:** `{source}` · **format:** `{fmt}` · {count} rows to train on (after the held-out split)"
             f"{sampled}" + (f" · {'; '.join(notes)}" if notes else ""),
             f"**Step 4 ({stage.upper()}):** {statement}", steps_note,
             *(f"⚠️ {w}" for w in warnings)]
    return "\n\n".join(line for line in lines if line), pd.DataFrame(rows)


HUB_PREVIEW_ROWS = 5


def hub_preference_preview(form: dict[str, Any]) -> tuple[str, pd.DataFrame]:
    """A Hub preference dataset's first rows, streamed (nothing else is downloaded), read as a run would read
    them: the columns renamed, the format detected, each row converted or named with why it is unusable."""
    try:
        name = paths.hub_dataset(form.get("data_hub_name"))
        if not name:
            raise DataError("Type the name of a Hub preference dataset, e.g. trl-lib/ultrafeedback_binarized.")
        config = form.get("data_hub_config") or None
        first = hub_first_rows(name, config, form.get("data_split") or "train", HUB_PREVIEW_ROWS)
        renames = preference_renames(first[0])
        rows = [{renames.get(key, key): value for key, value in row.items()} for row in first]
        fmt = detect_preference_format(rows[0])
        converted, problems = convert_rows(rows, fmt)
    except ConfigError as error:  # the path gate
        return "Preview unavailable: " + "; ".join(error.problems.values()), pd.DataFrame()
    except DataError as error:  # offline, unknown config or split, not preference columns
        return f"**Cannot use this data:** {paths.for_visitors(str(error))}", pd.DataFrame()
    lines = [f"**Source:** `{paths.display_name(name)}`{f' ({config})' if config else ''} · **format:** `{fmt}` · "
             f"the first {len(first)} rows, streamed; row counts are known once a run loads the whole split"]
    if renames:
        lines.append("**Columns read as:** " + ", ".join(f"`{old}` → `{new}`" for old, new in renames.items()))
    if problems:
        lines.append(f"**Unusable ({len(problems)} of {len(first)}):** " + "; ".join(problems))
    return "\n\n".join(lines), pd.DataFrame([_flat_row(row) for row in converted])


def _flat_row(row: dict[str, Any]) -> dict[str, str]:
    """A converted row for the table: each message list as its text (thumbs keep their label as 👍/👎)."""
    return {key: ("👍" if value else "👎") if key == "label" else
            "\n".join(m["content"] for m in value) if isinstance(value, list) else str(value)
            for key, value in row.items()}


def pipeline_text(manager: RunManager, request: gr.Request = None, **form: Any) -> str:
    """Which data and models each step uses, as the form and the runs folder say right now."""
    model = form_model_source(form) or "(no model chosen)"
    start = form.get("start_adapter") or BASE_CHOICE
    kind = form.get("data_kind") or PREFERENCE_DATA_KINDS[0]
    data = {"Bundled pairs": BUNDLED_PREFERENCES, "Collected feedback": "the Chat tab's feedback (exported)",
            "Uploaded file": Path(str(form.get("data_file") or "(no file)")).name,
            "Hub dataset": form.get("data_hub_name") or "(no name)"}[kind]
    rewards = list(visible_reward_models(manager, visitor_of(request)))
    reward = form.get("reward_run") or (rewards[0] if rewards else None)
    method = form.get("method") or "DPO"
    learns = {"KTO": "learns from step 2's thumbs",
              "GRPO": f"samples {form.get('num_generations') or 4} answers to each prompt of step 2 and learns from "
                      "the reward model's scores of them"}.get(method, "learns from step 2's pairs")
    return "\n".join([
        f"1. **Pretrained model:** `{model}` at {form.get('model_bits', 4)}-bit",
        f"2. **Human feedback:** `{data}`",
        f"3. **Reward model:** LoRA + score head on `{model}`, trained on the pairs of step 2"
        f" · latest: `{reward or 'none yet'}`",
        f"4. **{method}:** starts from `{start}` (also the frozen reference), {learns}; judged by reward model "
        f"`{reward or 'none yet'}`; the new adapter appears in the Chat tab",
    ])
