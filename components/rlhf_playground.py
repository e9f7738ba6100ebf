"""The RLHF tab's playground and comparison, apart from its layout: the reward model scoring two answers (typed, or
the last Chat turn), and the trained policy against its starting adapter on held-out prompts, judged by the reward
model. Not a tab: components/rlhf_tab.py wires these handlers (its api_names) to its controls."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from components.rlhf_form import BASE_CHOICE
from components.shared import refusal, require_visible, visible_adapters, visible_reward_models, visitor_of
from finetune.core import paths
from finetune.core.access import LOCAL, AccessDenied, Visitor
from finetune.core.config import ConfigError, RunConfig, load_config
from finetune.core.data import DataError
from finetune.core.models import ModelSourceError
from finetune.core.preference import held_out_prompts
from finetune.core.run_folder import ADAPTER_DIR, RUN_CONFIG
from finetune.services.chat import ChatEngine, normalize_history
from finetune.services.evaluate import (NO_HELD_OUT, Candidate, adapter_name, compare_policy_answers, judge_accuracy,
                                        model_label, start_run_dir, trained_prompts)
from finetune.services.feedback import FeedbackStore
from finetune.services.runs import RunManager
from finetune.services.scoring import ScorerCache


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
