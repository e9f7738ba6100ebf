"""The RLHF tab: the four steps in order — a pretrained model, human feedback, a reward model, and fine-tuning
guided by the preferences — each showing which data and models it uses.

Steps 3 and 4 train through the same RunManager as SFT (a child process, metrics.jsonl, Stop, history). The
tab watches the newest reward run and the newest DPO/KTO/GRPO run with a ``gr.Timer``; the new adapter lands in
``runs/<id>/adapter`` and so appears in the Chat tab, where new feedback closes the loop.

Handlers take the form as keyword arguments (``inputs_kwargs``), so ``gradio_client`` can call e.g.
``client.predict(model_source="...", reward_max_steps=3, api_name="/rlhf_start_reward")``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from components.rlhf_form import (BASE_CHOICE, DATA_KINDS, MODEL_KINDS, config_from_form, data_source, model_source,
                                  preset)
from components.shared import (PREVIEW_SLOT, bind, feedback_owner, list_hub_options, live_status, on_page_load,
                               problems_markdown, progress_html, refusal, require_visible, series_frame,
                               started_message, stop_run, visible_adapters, visible_reward_models, visitor_of,
                               watched_run)
from finetune.core import paths
from finetune.core.access import LOCAL, AccessDenied, Visitor
from finetune.core.config import (DPO_LOSSES, EMBEDDED_MODEL, KEEP_CHOICES, KTO_LOSSES, ConfigError, RunConfig,
                                  field_help, from_dict, load_config, to_dict)
from finetune.core.data import DataError, hub_first_rows
from finetune.core.distributed import offers_processes
from finetune.core.metrics import early_stop_note, read_metrics, read_status, write_status
from finetune.core.models import ModelSourceError, resolve_run_folder
from finetune.core.preference import (BUNDLED_PREFERENCES, MAX_EPOCHS_SMALL_DATA, PreferenceData, convert_rows,
                                      data_size, default_steps, detect_preference_format, held_out_prompts,
                                      preference_renames, load_preferences, preview_preferences, rows_per_step,
                                      size_statement, size_warnings)
from finetune.core.run_folder import ADAPTER_DIR, REWARD_DIR, RUN_CONFIG
from finetune.services.admission import RunError, check_sources
from finetune.services.chat import ChatEngine, normalize_history
from finetune.services.evaluate import (NO_HELD_OUT, Candidate, adapter_name, compare_policy_answers, judge_accuracy,
                                        model_label, start_run_dir, trained_prompts)
from finetune.services.feedback import FeedbackStore
from finetune.services.runs import RunManager
from finetune.services.scoring import ScorerCache

POLL_SECONDS = 2.0
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


# --- starting and stopping ---------------------------------------------------------------------------------------

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
        source = data_source(manager, feedback_db, stage, form, feedback_owner(visitor))
        cfg = config_from_form(stage, source, form)
        # Malformed pairs are reported now, with their row numbers, rather than from the child's log.
        data = load_preferences(cfg.data, cfg.preference.format, want="unpaired" if stage == "kto" else "paired",
                                seed=cfg.training.seed, sample=True)
        cfg, steps_note = fit_steps_to_data(cfg, data, form)
        check_sources(cfg)  # an offline Hub model id is reported now, not by a failed run
        if stage == "grpo":  # the reward model it trains against must exist before a child starts
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
    statement, warnings = data_report(cfg, data)
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


# --- watching --------------------------------------------------------------------------------------------------

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


# --- the playground and the comparison ---------------------------------------------------------------------------

def reward_choices(manager: RunManager, current: str | None = None, visitor: Visitor = LOCAL) -> Any:
    ids = list(visible_reward_models(manager, visitor))
    return gr.Dropdown(choices=ids, value=current if current in ids else (ids[0] if ids else None))


def start_choices(manager: RunManager, current: str | None = None, visitor: Visitor = LOCAL) -> Any:
    """SFT adapters to start DPO/KTO from (preference-tuned ones too: the loop may go round again)."""
    ids = [BASE_CHOICE] + list(visible_adapters(manager, visitor))
    return gr.Dropdown(choices=ids, value=current if current in ids else BASE_CHOICE)


def _reward_folder(manager: RunManager, run_id: str | None, visitor: Visitor) -> Path:
    try:
        require_visible(manager, run_id, visitor, "use this reward model")
    except AccessDenied as error:
        raise refusal(str(error)) from None
    models = manager.reward_models()
    if not run_id or run_id not in models:
        try:
            paths.run_id_or_folder(run_id)  # a path gets the gate's one message; a name, the hint below
        except paths.PathRefused as error:
            raise refusal(str(error)) from None
        raise refusal("Pick a finished reward model first (train one in step 3).")
    return models[run_id]


def score_answers(manager: RunManager, cache: ScorerCache, reward_run: str | None, prompt: str, answer_a: str,
                  answer_b: str, request: gr.Request = None) -> str:
    """Score one or two answers to a prompt with the reward model; with two, say which it prefers."""
    if not (prompt or "").strip():
        raise refusal("Type a prompt first.")
    answers = [a for a in (answer_a, answer_b) if (a or "").strip()]
    if not answers:
        raise refusal("Type at least one answer to score.")
    folder = _reward_folder(manager, reward_run, visitor_of(request))  # its own clear gr.Error when none is picked
    try:
        scorer = cache.get(folder)
        scores = scorer.score([prompt] * len(answers), answers)
    except (ModelSourceError, ConfigError, OSError, ValueError) as error:
        raise gr.Error(f"Could not score: {error}") from None
    lines = [f"**Answer {name}:** reward {score:+.3f}" for name, score in zip("AB", scores)]
    if len(scores) == 2:
        better = "A" if scores[0] > scores[1] else "B" if scores[1] > scores[0] else None
        lines.append(f"The reward model prefers **answer {better}** (margin {abs(scores[0] - scores[1]):.3f})."
                     if better else "The reward model scores both answers the same.")
    return "  \n".join(lines)


def last_chat_turn(feedback_db: Path | None, base_chat: list[dict[str, Any]] | None,
                   tuned_chat: list[dict[str, Any]] | None, request: gr.Request = None) -> tuple[str, str, str]:
    """The Chat tab's last turn as (prompt, base answer, fine-tuned answer) for the playground: this browser
    session's newest stored turn (an arena toggle empties the chats, and an arena shows the sides in random
    order), else what the chats show (an app without a feedback store)."""
    stored = _stored_last_turn(feedback_db, getattr(request, "session_hash", None))
    if stored is not None:
        return stored["prompt"], stored["base"], stored["tuned"]
    base, tuned = normalize_history(base_chat), normalize_history(tuned_chat)
    if len(base) < 2 or len(tuned) < 2 or base[-1]["role"] != "assistant":
        raise refusal("No chat turn yet: ask both models something in the Chat tab first.")
    return base[-2]["content"], base[-1]["content"], tuned[-1]["content"]


def _stored_last_turn(feedback_db: Path | None, session: str | None) -> dict[str, str] | None:
    if feedback_db is None or not feedback_db.is_file() or session is None:
        return None
    store = FeedbackStore(feedback_db)
    try:
        return store.last_turn(session)
    finally:
        store.close()


COMPARE_COLUMNS = ["prompt", "model", "answer", "reward", "tokens", "distinct-2", "repeated 3-grams", "degenerate"]


def _comparison_prompts(manager: RunManager, reward_run: str, policy_dir: Path, cfg: RunConfig, limit: int
                        ) -> tuple[list[str], Path | None]:
    """The policy's held-out prompts that neither the policy, its starting adapter nor the reward model trained
    on; and the starting adapter's run folder."""
    start_dir = start_run_dir(policy_dir)
    excluded = trained_prompts(manager.run_dir(reward_run))
    if start_dir is not None:
        excluded |= trained_prompts(start_dir)
    return held_out_prompts(cfg.data, cfg.preference.format, cfg.training.seed, limit, excluded), start_dir


def compare_policy(manager: RunManager, cache: ScorerCache, engine: ChatEngine, reward_run: str | None,
                   policy_run: str | None, prompts: float, max_new_tokens: float, request: gr.Request = None,
                   progress: gr.Progress = gr.Progress()) -> tuple[str, pd.DataFrame]:
    """Greedy answers of the base model, of the adapter the policy started from and of the policy on held-out
    prompts, scored by the reward model, checked for degeneration, with a paired verdict against each."""
    visitor = visitor_of(request)
    adapters = visible_adapters(manager, visitor)
    if not policy_run or policy_run not in adapters:
        raise refusal("No finished DPO/KTO/GRPO run to compare yet (step 4).")
    folder = _reward_folder(manager, reward_run, visitor)
    try:
        policy_dir = manager.run_dir(policy_run)
        cfg = load_config(policy_dir / RUN_CONFIG)
        questions, start_dir = _comparison_prompts(manager, str(reward_run), policy_dir, cfg, max(1, int(prompts)))
        if not questions:
            return (f"**{NO_HELD_OUT.capitalize()}.** Every prompt of `{policy_run}`'s data was trained on by it, "
                    "its starting adapter or the reward model, so no comparison here could tell whether the "
                    "tuning generalises. Collect feedback on more prompts."), pd.DataFrame(columns=COMPARE_COLUMNS)
        others = [Candidate(model_label(cfg.model), cfg.model)]
        if start_dir is not None:
            others.append(Candidate(adapter_name(start_dir.name), cfg.model, start_dir / ADAPTER_DIR))
        policy = Candidate(adapter_name(policy_run), cfg.model, adapters[policy_run])
        judge = judge_accuracy(manager.run_dir(str(reward_run)))
        result = compare_policy_answers(
            engine, cache.get(folder), policy, others, questions, int(max_new_tokens), judge,
            lambda done, total: progress(done / total, desc=f"answer {done} of {total}"))
    except (DataError, ModelSourceError, ConfigError, OSError, ValueError, RuntimeError) as error:
        raise gr.Error(f"Could not compare: {error}") from None
    summary = _comparison_summary(result, judge, reward_run)
    if len(questions) < int(prompts):  # say why fewer prompts than asked: only these were held out
        summary = (f"You asked for {int(prompts)} prompts; only {len(questions)} held-out prompts exist that none "
                   f"of these models trained on.\n\n{summary}")
    return summary, pd.DataFrame(result.rows(), columns=COMPARE_COLUMNS)


def _comparison_summary(result: Any, judge: Any, reward_run: str | None) -> str:
    named = "\n".join(f"{i}. {prompt}" for i, prompt in enumerate(result.prompts, start=1))
    degenerate = " · ".join(f"`{name}` {sum(bool(r['degenerate']) for r in result.rows() if r['model'] == name)} "
                            f"of {len(result.prompts)}" for name in result.models)
    verdicts = "\n".join(f"- {v.text()}" for v in result.verdicts)
    return (f"**{len(result.prompts)} held-out prompts** (none trained on by the policy, its starting adapter or "
            f"the reward model):\n{named}\n\n**Judge:** reward model `{reward_run}`, {judge.text()}.\n\n"
            f"**Degenerate answers:** {degenerate}\n\n**Verdicts** (paired reward wins, ties count half, 95% "
            f"Wilson interval):\n{verdicts}")


# --- data preview and the pipeline summary ------------------------------------------------------------------------

def preview_data(manager: RunManager, feedback_db: Path | None, request: gr.Request = None,
                 **form: Any) -> tuple[str, pd.DataFrame]:
    """The data's format and first rows, and before any training: how many pairs and prompts, how many held
    out, how many passes step 4's steps make over them, and the warnings that follow."""
    stage = POLICY_METHODS.get(form.get("method") or "DPO", "dpo")
    if (form.get("data_kind") or DATA_KINDS[0]) == "Hub dataset":
        return hub_preference_preview(form)
    try:
        source = data_source(manager, feedback_db, stage, form, feedback_owner(visitor_of(request)))
        cfg = config_from_form(stage, source, form)
        fmt, count, rows = preview_preferences(cfg.data, cfg.preference.format)
        data = load_preferences(cfg.data, cfg.preference.format, want="unpaired" if stage == "kto" else "paired",
                                seed=cfg.training.seed)
        cfg, steps_note = fit_steps_to_data(cfg, data, form)
    except ConfigError as error:
        return "Preview unavailable: " + "; ".join(error.problems.values()), pd.DataFrame()
    except (DataError, ModelSourceError, OSError) as error:
        gr.Warning(str(error))
        return f"**Cannot use this data:** {error}", pd.DataFrame()
    statement, warnings = data_report(cfg, data)
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
    model = model_source(form) or "(no model chosen)"
    start = form.get("start_adapter") or BASE_CHOICE
    kind = form.get("data_kind") or DATA_KINDS[0]
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


# --- layout --------------------------------------------------------------------------------------------------------

def _info(section: str, name: str) -> str:
    return field_help(section, name)


STEP_TITLES = {1: "Step 1 · The pretrained model", 2: "Step 2 · Human feedback: preference data",
               3: "Step 3 · A reward model trained on the feedback", 4: "Step 4 · Fine-tuning guided by the preferences"}


def _step_box(number: int, boxes: list[Any]) -> Any:
    """A step's accordion, closed to its title (the pipeline above sums up every step) except the current one:
    step 3 until a reward model exists, then step 4 (``open_current_step`` says which on each page load)."""
    box = gr.Accordion(STEP_TITLES[number], open=number == 3, elem_id=f"rlhf-step-{number}")
    boxes.append(box)
    return box


def current_step(manager: RunManager, visitor: Visitor) -> int:
    """The step a visitor is at: 3 (train a reward model) until one of theirs exists, then 4."""
    return 4 if visible_reward_models(manager, visitor) else 3


def open_current_step(manager: RunManager, request: gr.Request = None) -> tuple[Any, ...]:
    current = current_step(manager, visitor_of(request))
    return tuple(gr.Accordion(open=number == current) for number in STEP_TITLES)


def _step1(form: dict[str, Any], boxes: list[Any]) -> None:
    with _step_box(1, boxes):
        gr.Markdown("The model whose answers people rated. DPO/KTO/GRPO can start from an SFT adapter of it.")
        with gr.Row():
            form["model_kind"] = gr.Radio(list(MODEL_KINDS), value="Embedded", label="Model source",
                                          elem_id="rlhf-model-kind")
            form["model_source"] = gr.Textbox(value=EMBEDDED_MODEL, label="Model", elem_id="rlhf-model",
                                              info=_info("model", "source"))
            form["model_bits"] = gr.Radio([4, 8, 16, 32], value=4, label="Bit width", info=_info("model", "bits"))
        with gr.Row():
            form["start_adapter"] = gr.Dropdown([BASE_CHOICE], value=BASE_CHOICE, label="Start DPO/KTO/GRPO from",
                                                info=_info("preference", "start_adapter"), elem_id="rlhf-start",
                                                allow_custom_value=True)


def _step2(form: dict[str, Any], boxes: list[Any]) -> dict[str, Any]:
    view: dict[str, Any] = {}
    with _step_box(2, boxes):
        gr.Markdown("Pairs (prompt, chosen, rejected) teach the reward model and DPO; thumbs (prompt, completion, "
                    "label) teach KTO. The bundled set has 150 course-style pairs and 24 held-out ones.")
        with gr.Row():
            form["data_kind"] = gr.Radio(list(DATA_KINDS), value=DATA_KINDS[0], label="Preferences from",
                                         elem_id="rlhf-data-kind")
            form["data_file"] = gr.File(label="Preference file", type="filepath", elem_id="rlhf-data-file",
                                        file_types=[".jsonl", ".json", ".csv", ".tsv", ".parquet"])
            form["data_hub_name"] = gr.Textbox(label="Hub dataset", placeholder="trl-lib/ultrafeedback_binarized")
            # Dropdowns that accept typed values: the Hub's lists once listed, any name while offline.
            form["data_hub_config"] = gr.Dropdown([], value="", label="Hub config (subset)",
                                                  info=_info("data", "hub_config"), allow_custom_value=True)
            form["data_split"] = gr.Dropdown(["train"], value="train", label="Split", info=_info("data", "split"),
                                             allow_custom_value=True)
        with gr.Row():
            form["data_skip_bad_rows"] = gr.Checkbox(False, label="Skip malformed rows",
                                                     info=_info("data", "skip_bad_rows"), elem_id="rlhf-skip-bad-rows")
            view["hub_list"] = gr.Button("List configs/splits", size="sm", elem_id="rlhf-hub-list")
            view["hub_info"] = gr.Markdown(elem_id="rlhf-hub-info")
        view["preview"] = gr.Button("Check and preview the data", size="sm", elem_id="rlhf-preview-button")
        view["info"] = gr.Markdown(elem_id="rlhf-data-info")
        view["table"] = gr.Dataframe(pd.DataFrame(), interactive=False, wrap=True, max_height=260)
    return view


def _plots(prefix: str, first_title: str, second_title: str) -> dict[str, Any]:
    view: dict[str, Any] = {}
    view["watching"] = gr.Textbox(label="Watching run", interactive=False, elem_id=f"rlhf-{prefix}-run")
    view["status"] = gr.Markdown(elem_id=f"rlhf-{prefix}-status")
    view["progress"] = gr.HTML(progress_html(f"rlhf-{prefix}-progress", {"state": "idle"}, [], colour=RLHF_COLOUR))
    with gr.Row():
        view["loss_plot"] = gr.LinePlot(None, x="step", y="loss", color="series", title=first_title, height=260,
                                        elem_id=f"rlhf-{prefix}-loss")
        view["metric_plot"] = gr.LinePlot(None, x="step", y="value", color="series", title=second_title,
                                          height=260, elem_id=f"rlhf-{prefix}-metrics")
    return view


def _step3(form: dict[str, Any], defaults: RunConfig, with_chat: bool, boxes: list[Any]) -> dict[str, Any]:
    with _step_box(3, boxes):
        gr.Markdown("TRL `RewardTrainer`: LoRA plus a one-output score head on the base model, trained so the "
                    "chosen answer scores above the rejected one. Watch the held-out accuracy rise above 50%.")
        with gr.Row():
            form["reward_learning_rate"] = gr.Number(defaults.training.learning_rate, label="Learning rate",
                                                     info=_info("training", "learning_rate"))
            form["reward_max_steps"] = gr.Number(defaults.training.max_steps, label="Steps", precision=0,
                                                 elem_id="rlhf-reward-steps")
        with gr.Row():
            start = gr.Button("Train the reward model", variant="primary", elem_id="rlhf-start-reward")
            stop = gr.Button("Stop", variant="stop", size="sm")
        view = _plots("reward", "Reward model loss", "Accuracy and margin (chosen vs rejected)")
        with gr.Accordion("Reward playground", open=True):
            with gr.Row():
                form["reward_run"] = gr.Dropdown([], label="Reward model (run)", elem_id="rlhf-reward-pick",
                                                 allow_custom_value=True, info=_info("preference", "reward_model"))
                view["refresh"] = gr.Button("Refresh lists", size="sm")
                view["take_chat"] = gr.Button("Take the last Chat turn", size="sm", elem_id="rlhf-take-chat",
                                              visible=with_chat)
            view["prompt"] = gr.Textbox(label="Prompt", elem_id="rlhf-play-prompt")
            with gr.Row():
                view["answer_a"] = gr.Textbox(label="Answer A", lines=3, elem_id="rlhf-play-a")
                view["answer_b"] = gr.Textbox(label="Answer B (optional)", lines=3, elem_id="rlhf-play-b")
            view["score"] = gr.Button("Score", elem_id="rlhf-score")
            view["scores"] = gr.Markdown(elem_id="rlhf-scores")
    return {**view, "start": start, "stop": stop}


def _step4(form: dict[str, Any], defaults: RunConfig, boxes: list[Any]) -> dict[str, Any]:
    with _step_box(4, boxes):
        gr.Markdown("TRL `DPOTrainer` on the pairs (or `KTOTrainer` on thumbs) makes a new LoRA adapter. Watch "
                    "rewards/margins rise: the tuned model prefers the chosen answers more than the reference does. "
                    "`GRPOTrainer` is the online way: it samples several answers per prompt, the reward model "
                    "picked in step 3 scores them, and the policy moves towards the answers scored above their "
                    "group's mean. Watch the mean reward rise.")
        with gr.Row():
            form["method"] = gr.Radio(list(POLICY_METHODS), value="DPO", label="Method", elem_id="rlhf-method")
            form["beta"] = gr.Number(defaults.preference.beta, label="Beta", info=_info("preference", "beta"))
            form["loss_type"] = gr.Dropdown(list(DPO_LOSSES + KTO_LOSSES), value=defaults.preference.loss_type,
                                            label="Loss", info=_info("preference", "loss_type"))
        with gr.Row():
            form["policy_learning_rate"] = gr.Number(defaults.training.learning_rate, label="Learning rate")
            form["policy_max_steps"] = gr.Number(defaults.training.max_steps, label="Steps", precision=0,
                                                 elem_id="rlhf-policy-steps")
            form["num_generations"] = gr.Number(defaults.preference.num_generations, precision=0,
                                                label="GRPO: answers per prompt", elem_id="rlhf-num-generations",
                                                info=_info("preference", "num_generations"))
            form["max_completion_length"] = gr.Number(defaults.preference.max_completion_length, precision=0,
                                                      label="GRPO: longest answer (tokens)",
                                                      elem_id="rlhf-max-completion",
                                                      info=_info("preference", "max_completion_length"))
        with gr.Row():
            start = gr.Button("Train with DPO / KTO / GRPO", variant="primary", elem_id="rlhf-start-policy")
            stop = gr.Button("Stop", variant="stop", size="sm")
        view = _plots("policy", "Policy loss", "Rewards (DPO/KTO: implicit; GRPO: reward model)")
        with gr.Accordion("Did the answers move in the preferred direction?", open=False):
            with gr.Row():
                view["compare_prompts"] = gr.Number(4, label="Held-out prompts", precision=0, minimum=1, maximum=24)
                view["compare_tokens"] = gr.Number(64, label="Max new tokens", precision=0, minimum=8, maximum=256)
                view["compare"] = gr.Button("Compare base, starting adapter and tuned on held-out prompts",
                                            elem_id="rlhf-compare")
            view["compare_summary"] = gr.Markdown(elem_id="rlhf-compare-summary")
            view["compare_table"] = gr.Dataframe(pd.DataFrame(), interactive=False, wrap=True, max_height=300)
    return {**view, "start": start, "stop": stop}


def _advanced(form: dict[str, Any], defaults: RunConfig) -> None:
    with gr.Accordion("Settings shared by steps 3 and 4", open=False):
        with gr.Row():
            form["lora_rank"] = gr.Number(defaults.lora.rank, label="LoRA rank (alpha = 2 x rank)", precision=0,
                                          info=_info("lora", "rank"))
            form["batch_size"] = gr.Number(defaults.training.batch_size, label="Batch size (pairs)", precision=0,
                                           elem_id="rlhf-batch")
            form["eval_steps"] = gr.Number(defaults.training.eval_steps, label="Held-out eval every N steps",
                                           precision=0, elem_id="rlhf-eval-steps",
                                           info=_info("training", "eval_steps"))
            form["max_seq_length"] = gr.Number(defaults.data.max_seq_length, label="Max sequence length",
                                               precision=0, info=_info("data", "max_seq_length"))
        with gr.Row():
            form["early_stopping_patience"] = gr.Number(
                defaults.training.early_stopping_patience, label="Early stopping patience (evaluations, 0 = off)",
                precision=0, elem_id="rlhf-early-stopping", info=_info("training", "early_stopping_patience"))
            form["keep"] = gr.Radio(list(KEEP_CHOICES), value=defaults.training.keep, label="Saved weights",
                                    elem_id="rlhf-keep", info=_info("training", "keep"))
        with gr.Row(visible=offers_processes()):  # past one device: 2+ GPUs, or CPU processes over gloo
            form["processes"] = gr.Number(1, label="Processes (data parallel)", precision=0,
                                          elem_id="rlhf-processes",
                                          info="Each process trains on its share of every batch (DDP; effective "
                                               "batch = batch size x processes). One per GPU; on the CPU, over gloo.")


def build_rlhf_tab(manager: RunManager, feedback_db: str | Path | None = None,
                   chat: dict[str, Any] | None = None, engine: ChatEngine | None = None,
                   scorers: ScorerCache | None = None) -> dict[str, Any]:
    """Lay out the four steps and wire them; ``chat`` (the Chat tab's components) lets the playground take
    the last chat turn, ``engine`` (the Chat tab's models) answers step 4's comparison without loading a
    second copy of the base, and ``scorers`` holds the reward model the Evaluate tab uses too. Returns the
    components by name."""
    feedback_db = Path(feedback_db) if feedback_db else None
    form: dict[str, Any] = {}
    gr.Markdown("## RLHF in four steps\nEach step below uses what the step before produced.")
    pipeline = gr.Markdown(elem_id="rlhf-pipeline")
    boxes: list[Any] = []  # the four steps' accordions: the current one open, the others closed to a line
    _step1(form, boxes)
    data_view = _step2(form, boxes)
    reward = _step3(form, preset("reward"), chat is not None, boxes)
    policy = _step4(form, preset("dpo"), boxes)
    _advanced(form, preset("dpo"))
    log = gr.Textbox(label="Training log (last lines)", lines=8, max_lines=8, interactive=False,
                     elem_id="rlhf-log")
    _wire(manager, feedback_db, form, pipeline, data_view, reward, policy, log, chat, engine or ChatEngine(),
          scorers or ScorerCache())
    on_page_load(bind(open_current_step, manager), None, boxes)
    return {**form, "pipeline": pipeline, "log": log, **{f"data_{k}": v for k, v in data_view.items()},
            **{f"reward_{k}": v for k, v in reward.items()}, **{f"policy_{k}": v for k, v in policy.items()}}


def _wire(manager: RunManager, feedback_db: Path | None, form: dict[str, Any], pipeline: Any,
          data_view: dict[str, Any], reward: dict[str, Any], policy: dict[str, Any], log: Any,
          chat: dict[str, Any] | None, engine: ChatEngine, cache: ScorerCache) -> None:
    summary = bind(pipeline_text, manager)
    gr.on([form[k].change for k in ("model_kind", "model_source", "model_bits", "start_adapter", "data_kind",
                                    "data_file", "data_hub_name", "method", "reward_run")],
          summary, inputs_kwargs=form, outputs=pipeline, api_visibility="private", show_progress="hidden")
    form["model_kind"].input(lambda kind: gr.update(value=EMBEDDED_MODEL if kind == "Embedded" else ""),
                             form["model_kind"], form["model_source"], api_visibility="private")  # see train_tab
    data_view["preview"].click(bind(preview_data, manager, feedback_db), inputs_kwargs=form,
                               outputs=[data_view["info"], data_view["table"]], api_name="rlhf_preview_data",
                               **PREVIEW_SLOT)
    data_view["hub_list"].click(list_hub_options, [form["data_hub_name"], form["data_hub_config"]],
                                [form["data_hub_config"], form["data_split"], data_view["hub_info"]],
                                api_name="rlhf_hub_listing")
    for view, stage, steps in ((reward, "reward", "reward_max_steps"), (policy, "policy", "policy_max_steps")):
        view["start"].click(bind(start_stage, manager, feedback_db, stage), inputs_kwargs=form,
                            outputs=[view["watching"], view["status"]], api_name=f"rlhf_start_{stage}",
                            concurrency_limit=1, concurrency_id="train-start"
                            ).then(bind(steps_box, manager), [view["watching"], form[steps]], form[steps],
                                   api_name=f"rlhf_steps_{stage}", show_progress="hidden")
    for view, name in ((reward, "rlhf_stop_reward"), (policy, "rlhf_stop_policy")):
        view["stop"].click(bind(stop_run, manager), view["watching"], view["status"], api_name=name)
    live = [reward[k] for k in ("watching", "status", "progress", "loss_plot", "metric_plot")] + \
           [policy[k] for k in ("watching", "status", "progress", "loss_plot", "metric_plot")] + [log]
    poll = bind(poll_rlhf, manager)
    gr.Timer(POLL_SECONDS).tick(poll, [reward["watching"], policy["watching"]], live, api_name="rlhf_poll",
                                show_progress="hidden", queue=False)
    lists = [form["reward_run"], form["start_adapter"]]

    def refresh_lists(reward_run: str | None, start: str | None, request: gr.Request = None) -> tuple[Any, Any]:
        visitor = visitor_of(request)
        return reward_choices(manager, reward_run, visitor), start_choices(manager, start, visitor)

    reward["refresh"].click(refresh_lists, lists, lists, api_name="rlhf_lists")
    # A finished run changes its status line: refresh the pickers so the new reward model / adapter is there.
    for view in (reward, policy):
        view["status"].change(refresh_lists, lists, lists, api_visibility="private", show_progress="hidden")
    reward["score"].click(bind(score_answers, manager, cache),
                          [form["reward_run"], reward["prompt"], reward["answer_a"], reward["answer_b"]],
                          reward["scores"], api_name="rlhf_score", concurrency_limit=1, concurrency_id="reward")
    if chat is not None:
        reward["take_chat"].click(bind(last_chat_turn, feedback_db),
                                  [chat["base_chat"], chat["tuned_chat"]],
                                  [reward["prompt"], reward["answer_a"], reward["answer_b"]],
                                  api_visibility="private")
    policy["compare"].click(bind(compare_policy, manager, cache, engine),
                            [form["reward_run"], policy["watching"], policy["compare_prompts"],
                             policy["compare_tokens"]], [policy["compare_summary"], policy["compare_table"]],
                            api_name="rlhf_compare", concurrency_limit=1, concurrency_id="reward")
    on_page_load(poll, [reward["watching"], policy["watching"]], live)  # re-attaches to running jobs
    on_page_load(refresh_lists, lists, lists)
    on_page_load(summary, inputs_kwargs=form, outputs=pipeline)
