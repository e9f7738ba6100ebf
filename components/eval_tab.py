"""The Evaluate tab: is the fine-tuned model better than its base, and by how much?

Four views, each from the learner's own runs: validation loss / perplexity (table and bar chart), side-by-side
greedy answers on held-out prompts with ROUGE-L against the reference (and a reward-model score once a reward
run exists), win rate against the base from the Chat votes, and one prompt answered by every checkpoint of a run.

Models come from the same ChatEngine as the Chat tab (one base in memory, adapters attached by name); the
handlers run one at a time (a slot of their own), and each answer or loss pass takes its turn on the engine, so an
evaluation never switches adapters under a chat answer.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from components.page_loads import on_page_load
from components.shared import (bind, feedback_owner, refusal, require_visible, visible_adapters, visible_reward_models,
                               visitor_of)
from finetune.core.access import LOCAL, AccessDenied, Visitor
from finetune.core.config import BUNDLED_DATASET, ConfigError, load_config
from finetune.core.data import first_line
from finetune.core.preference import prompt_key
from finetune.core.run_folder import FEEDBACK_DB, RUN_CONFIG
from finetune.services.admission import RunError
from finetune.services.chat import ChatEngine
from finetune.services.evaluate import (Candidate, LossResult, adapter_name, candidate_answer, candidate_loss,
                                        candidates, degeneration, judge_accuracy, load_eval_rows,
                                        loss_difference_interval, model_label, paired_verdict, read_win_counts,
                                        reference_pairs, reward_models, rouge_l, run_checkpoints, start_run_dir,
                                        trained_prompts, win_rate)
from finetune.services.feedback import FeedbackStore
from finetune.services.runs import RunManager
from finetune.services.scoring import ScorerCache

LOSS_COLUMNS = ["model", "validation loss", "perplexity", "tokens", "rows"]
WIN_COLUMNS = ["adapter", "votes", "wins", "losses", "ties (incl. both bad)", "win rate", "95% CI low",
               "95% CI high"]
CHECKPOINT_COLUMNS = ["checkpoint", "answer"]
# One evaluation at a time; chat answers have their own slot and take turns with it on the engine (ChatEngine).
CONCURRENCY = {"concurrency_limit": 1, "concurrency_id": "chat"}

LEARN_EVAL = """**How to read these numbers.** The validation loss is the average negative log-likelihood per answer
token on rows the model never trained on (lower is better); perplexity = e<sup>loss</sup> is "how many tokens the
model is choosing between" at each step. An adapter is compared with *its own* base, loaded at the bit width it
trained on, so the difference is the adapter's alone. ROUGE-L is the longest common word subsequence with the
reference answer (F1, 0-1): a crude overlap score, good at spotting a learned style, blind to meaning."""


def run_choices(manager: RunManager, current: list[str] | None = None, request: gr.Request = None
                ) -> tuple[Any, Any]:
    """Finished runs with an adapter that the visitor may see, for the multi-run picker and the checkpoint
    picker."""
    ids = list(visible_adapters(manager, visitor_of(request)))
    kept = [run_id for run_id in current or [] if run_id in ids] or ids[:1]
    return (gr.Dropdown(choices=ids, value=kept, multiselect=True),  # multiselect: else gradio warns on a list
            gr.Dropdown(choices=ids, value=ids[0] if ids else None))


def _require_visible(manager: RunManager, run_ids: list[str], visitor: Visitor) -> None:
    try:
        for run_id in run_ids:
            require_visible(manager, run_id, visitor, "evaluate this run")
    except AccessDenied as error:
        raise refusal(str(error)) from None


def _run_dirs(manager: RunManager, run_ids: list[str] | None, visitor: Visitor = LOCAL) -> dict[str, Path]:
    if not run_ids:
        raise refusal("Pick at least one finished run (train one in the Train tab).")
    _require_visible(manager, run_ids, visitor)
    adapters = manager.finished_adapters()
    missing = [run_id for run_id in run_ids if run_id not in adapters]
    if missing:
        raise refusal(f"No saved adapter for run(s): {', '.join(missing)}.")
    return {run_id: manager.run_dir(run_id) for run_id in run_ids}


def _rows(source: str, split: str, limit: float | None) -> Any:
    if limit is not None and (not float(limit).is_integer() or limit < 1):
        raise refusal(f"Max rows must be a whole number of at least 1, got {limit!r}.")
    try:
        return load_eval_rows((source or "").strip() or BUNDLED_DATASET, (split or "").strip() or "validation",
                              int(limit) if limit else None)
    except ValueError as error:
        raise refusal(str(error)) from None


def _finite(value: float) -> float | None:
    return round(value, 4) if math.isfinite(value) else None


def evaluate_loss(manager: RunManager, engine: ChatEngine, run_ids: list[str] | None, source: str, split: str,
                  limit: float | None, batch_size: float, request: gr.Request = None,
                  progress: gr.Progress = gr.Progress()) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """Validation loss and perplexity of each chosen run's base and adapter: table, bar-chart data, summary."""
    run_dirs = _run_dirs(manager, run_ids, visitor_of(request))
    rows = _rows(source, split, limit)
    if not batch_size or batch_size < 1 or not float(batch_size).is_integer():
        raise refusal(f"Batch size must be a whole number of at least 1, got {batch_size!r}.")
    try:
        chosen = candidates(run_dirs)
    except ValueError as error:
        raise refusal(str(error)) from None
    table, results = [], {}
    for index, candidate in enumerate(chosen):
        def on_batch(done: int, total: int, index: int = index, name: str = candidate.name) -> None:
            progress((index + done / total) / len(chosen), desc=f"{name}: batch {done}/{total}")

        try:
            result = candidate_loss(engine, candidate, rows, int(batch_size), on_batch)
        except (ValueError, RuntimeError, OSError) as error:
            raise refusal(f"Could not evaluate {candidate.name}: {error}") from None
        results[candidate.name] = result
        table.append([candidate.name, _finite(result.loss), _finite(result.perplexity), result.tokens, result.rows])
    frame = pd.DataFrame(table, columns=LOSS_COLUMNS)
    return frame, frame[["model", "validation loss"]], _loss_summary(frame, chosen, results)


def _loss_summary(frame: pd.DataFrame, chosen: list[Candidate], results: dict[str, LossResult] | None = None) -> str:
    """One line per adapter: its loss against the base it trained on (not against another run's base) and, for a
    preference-tuned adapter, against the adapter it started from: lower than the base can still be worse than
    where it started (issue 15: DPO 4.09 vs its SFT start 3.37, both "lower than the base"). With the per-row
    results, each difference carries its 95% paired-bootstrap interval over the rows."""
    loss = dict(zip(frame["model"], frame["validation loss"]))
    lines = [f"Evaluated {len(frame)} model(s) on {int(frame['rows'].iloc[0])} rows "
             f"({int(frame['tokens'].iloc[0])} answer tokens)."]
    for candidate in chosen:
        tuned, base_name = loss.get(candidate.name), model_label(candidate.model)
        base = loss.get(base_name)
        if candidate.adapter_dir is None or pd.isna(tuned) or pd.isna(base):
            continue
        parts = [_difference(tuned, base, "its base", _interval(results, candidate.name, base_name))]
        start = loss.get(candidate.start_name) if candidate.start_name else None
        if start is not None and not pd.isna(start):
            parts.append(_difference(tuned, start, f"`{candidate.start_name}`, the adapter it started from",
                                     _interval(results, candidate.name, str(candidate.start_name))))
        lines.append(f"- `{candidate.name}`: loss {tuned:.4f} ({'; '.join(parts)})")
    return "\n".join(lines)


def _interval(results: dict[str, LossResult] | None, name: str, other: str) -> tuple[float, float] | None:
    if not results or name not in results or other not in results:
        return None
    return loss_difference_interval(results[name], results[other])


def _difference(value: float, reference: float, what: str, interval: tuple[float, float] | None = None) -> str:
    delta = value - reference
    text = f"{'lower' if delta < 0 else 'higher'} than {what} by {abs(delta):.4f}"
    if interval is None:
        return text
    low, high = interval
    text += f", 95% CI of the difference {low:+.4f} to {high:+.4f}"
    return text + (": these rows cannot tell the two apart" if low <= 0 <= high else "")


def add_reward_scores(manager: RunManager, scorers: ScorerCache, frame: pd.DataFrame,
                      prompts: list[list[dict[str, str]]], chosen: list[Candidate], visitor: Visitor = LOCAL) -> str:
    """Add a 'reward' column from the newest reward run the visitor may see, if there is one, and a paired verdict
    of each adapter against its base (and a preference-tuned one against its starting adapter) on the prompts
    nobody involved trained on; returns a note for the summary."""
    runs = reward_models(manager) if visitor.operator else visible_reward_models(manager, visitor)
    if not runs:
        return "No reward model yet: train one from your votes (reward stage) to score these answers."
    run_id, folder = next(iter(runs.items()))
    try:
        frame["reward"] = [round(x, 4) for x in scorers.get(folder).score(prompts, list(frame["answer"]))]
    except Exception as error:  # a reward model that cannot load must not lose the answers already generated
        return f"Reward run `{run_id}` could not score the answers: {first_line(error, 200)}"
    means = frame.groupby("model", sort=False)["reward"].mean()
    note = f"**Mean reward (run `{run_id}`):** " + " · ".join(f"`{n}` {v:.3f}" for n, v in means.items())
    return note + "  \n" + _reward_verdicts(manager, frame, chosen, manager.run_dir(run_id))


def _reward_verdicts(manager: RunManager, frame: pd.DataFrame, chosen: list[Candidate], reward_dir: Path) -> str:
    judge = judge_accuracy(reward_dir)
    lines = [f"**Judge:** reward model `{reward_dir.name}`, {judge.text()}."]
    for candidate in chosen:
        if candidate.adapter_dir is None:
            continue
        try:
            run_dir = candidate.adapter_dir.parent
            start = start_run_dir(run_dir)
            trained = trained_prompts(reward_dir) | trained_prompts(run_dir) | (trained_prompts(start) if start
                                                                                else set())
        except ValueError as error:
            lines.append(f"- `{candidate.name}`: no verdict: {error}")
            continue
        held = frame[[prompt_key([{"role": "user", "content": p}]) not in trained for p in frame["prompt"]]]
        for other in [model_label(candidate.model)] + ([candidate.start_name] if candidate.start_name else []):
            mine, theirs = held[held["model"] == candidate.name], held[held["model"] == other]
            verdict = paired_verdict(candidate.name, other, list(mine["reward"]), list(theirs["reward"]),
                                     list(mine["answer"]), judge)
            lines.append(f"- {verdict.text()}")
    return "\n".join(lines)


def compare_generations(manager: RunManager, engine: ChatEngine, scorers: ScorerCache, run_ids: list[str] | None,
                        source: str, split: str, prompts: float, max_new_tokens: float,
                        request: gr.Request = None, progress: gr.Progress = gr.Progress()) -> tuple[pd.DataFrame, str]:
    """Greedy answers of each base and adapter on the first N held-out prompts, with ROUGE-L (and reward)."""
    visitor = visitor_of(request)
    run_dirs = _run_dirs(manager, run_ids, visitor)
    if not prompts or prompts < 1 or prompts > 50 or not float(prompts).is_integer():
        raise refusal(f"Number of prompts must be a whole number from 1 to 50, got {prompts!r}.")
    if not max_new_tokens or not 1 <= max_new_tokens <= 1024:
        raise refusal(f"Max new tokens must be from 1 to 1024, got {max_new_tokens!r}.")
    pairs = reference_pairs(_rows(source, split, None), int(prompts))
    if not pairs:
        raise refusal("This split has no prompt/answer rows to generate from.")
    chosen = candidates(run_dirs)
    answers: dict[tuple[int, int], str] = {}
    # Model by model, so each base loads once (see candidates); the table then reads prompt by prompt.
    for m, candidate in enumerate(chosen):
        for p, (prompt, _) in enumerate(pairs):
            progress(len(answers) / (len(pairs) * len(chosen)), desc=f"{candidate.name} answering prompt {p + 1}")
            answers[m, p] = _answer(engine, candidate, prompt, int(max_new_tokens))
    table, asked = [], []
    for p, (prompt, reference) in enumerate(pairs):
        for m, candidate in enumerate(chosen):
            check = degeneration(answers[m, p])
            table.append({"prompt": prompt[-1]["content"], "reference": reference or "", "model": candidate.name,
                          "answer": answers[m, p], "ROUGE-L": _round(rouge_l(answers[m, p], reference)),
                          "tokens": check.words, "distinct-2": check.distinct_2,
                          "repeated 3-grams": check.repeated_3grams, "degenerate": check.problem or ""})
            asked.append(prompt)
    frame = pd.DataFrame(table)
    reward_note = add_reward_scores(manager, scorers, frame, asked, chosen, visitor)
    means = frame.groupby("model", sort=False)["ROUGE-L"].mean()
    summary = "**Mean ROUGE-L vs reference:** " + " · ".join(
        f"`{name}` {value:.3f}" for name, value in means.items() if pd.notna(value))
    flagged = frame.groupby("model", sort=False)["degenerate"].apply(lambda col: int((col != "").sum()))
    summary += "  \n**Degenerate answers (repeated phrases, empty):** " + " · ".join(
        f"`{name}` {count} of {len(pairs)}" for name, count in flagged.items())
    return frame, summary + "  \n" + reward_note


def _answer(engine: ChatEngine, candidate: Candidate, prompt: list[dict[str, str]], max_new_tokens: int) -> str:
    try:
        return candidate_answer(engine, candidate, prompt, max_new_tokens)
    except (ValueError, RuntimeError, OSError) as error:
        raise refusal(f"{candidate.name} could not answer: {error}") from None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _win_counts(db_path: Path, owner: str | None) -> dict[str, dict[str, int]]:
    """The votes of ``owner`` (everyone's for None) per adapter; empty before the database exists."""
    if owner is None or not Path(db_path).is_file():
        return read_win_counts(db_path)
    store = FeedbackStore(db_path)
    try:
        return store.win_counts(owner=owner)
    finally:
        store.close()


def win_rates(db_path: Path, request: gr.Request = None) -> tuple[pd.DataFrame, str]:
    """Each adapter's win rate against its base from the feedback votes (the visitor's own, everyone's for an
    operator), with a 95% Wilson interval."""
    try:
        counts = _win_counts(db_path, feedback_owner(visitor_of(request)))
    except Exception as error:  # a locked or damaged database: say so, keep the tab working
        return pd.DataFrame(columns=WIN_COLUMNS), f"Could not read the votes: {error}"
    rows = [win_rate(name, c) for name, c in sorted(counts.items())]
    rows = [r for r in rows if r.votes]
    if not rows:
        return pd.DataFrame(columns=WIN_COLUMNS), ("No votes yet: compare answers in the Chat tab and pick the "
                                                   "better one.")
    frame = pd.DataFrame([[r.adapter, r.votes, r.wins, r.losses, r.ties, round(r.rate, 3), round(r.low, 3),
                           round(r.high, 3)] for r in rows], columns=WIN_COLUMNS)
    note = ("A tie or 'both bad' counts as half a win and half a loss. The 95% interval is Wilson's; "
            "when it includes 0.5 the votes cannot yet tell the adapter from its base.")
    return frame, note


def checkpoint_answers(manager: RunManager, engine: ChatEngine, run_id: str | None, prompt: str,
                       max_new_tokens: float, request: gr.Request = None,
                       progress: gr.Progress = gr.Progress()) -> pd.DataFrame:
    """The same prompt answered greedily by the base, each saved checkpoint of the run, and its final adapter."""
    if not run_id:
        raise refusal("Pick a run first.")
    _require_visible(manager, [run_id], visitor_of(request))
    if not isinstance(prompt, str) or not prompt.strip():
        raise refusal("Type a prompt first: the message is empty.")
    if not max_new_tokens or not 1 <= max_new_tokens <= 1024:
        raise refusal(f"Max new tokens must be from 1 to 1024, got {max_new_tokens!r}.")
    try:
        run_dir = manager.run_dir(run_id)
        cfg = load_config(run_dir / RUN_CONFIG).model
    except (RunError, ConfigError) as error:
        raise refusal(str(error)) from None
    saved = run_checkpoints(run_dir)
    if not saved:
        raise refusal(f"Run '{run_id}' saved no checkpoint or adapter yet.")
    chosen = [Candidate("base", cfg)] + [Candidate(adapter_name(run_id, label.replace(" ", "-")), cfg, folder)
                                         for label, folder in saved]
    labels = ["base (no adapter)"] + [label for label, _ in saved]
    answers = []
    for done, (label, candidate) in enumerate(zip(labels, chosen)):
        progress(done / len(chosen), desc=f"{label} answering")
        answers.append([label, _answer(engine, candidate, [{"role": "user", "content": prompt.strip()}],
                                       int(max_new_tokens))])
    return pd.DataFrame(answers, columns=CHECKPOINT_COLUMNS)


# --- layout --------------------------------------------------------------------------------------------------

def _loss_section() -> dict[str, Any]:
    ui: dict[str, Any] = {}
    with gr.Row():
        ui["source"] = gr.Textbox(value=BUNDLED_DATASET, label="Dataset", elem_id="eval-source",
                                  info="Bundled name, Hub dataset or local file; the same formats as training.")
        ui["split"] = gr.Textbox(value="validation", label="Split", elem_id="eval-split",
                                 info="A split the adapters did not train on.")
        ui["limit"] = gr.Number(value=24, precision=0, minimum=1, label="Max rows", elem_id="eval-limit")
        ui["batch_size"] = gr.Number(value=4, precision=0, minimum=1, label="Batch size")
    ui["loss_button"] = gr.Button("Compute validation loss", variant="primary", elem_id="eval-loss-button")
    ui["loss_summary"] = gr.Markdown(elem_id="eval-loss-summary")
    with gr.Row():
        ui["loss_table"] = gr.Dataframe(pd.DataFrame(columns=LOSS_COLUMNS), interactive=False,
                                        elem_id="eval-loss-table")
        ui["loss_plot"] = gr.BarPlot(None, x="model", y="validation loss", title="Validation loss (lower is better)",
                                     elem_id="eval-loss-plot", height=280, sort=None, y_lim=[0, None])
    return ui


def _generation_section() -> dict[str, Any]:
    ui: dict[str, Any] = {}
    with gr.Accordion("Side-by-side answers on held-out prompts", open=False):
        with gr.Row():
            ui["prompts"] = gr.Number(value=3, precision=0, minimum=1, maximum=50, label="Prompts")
            ui["max_new_tokens"] = gr.Slider(8, 256, value=64, step=8, label="Max new tokens")
        ui["gen_button"] = gr.Button("Generate answers", elem_id="eval-gen-button")
        ui["gen_summary"] = gr.Markdown(elem_id="eval-gen-summary")
        ui["gen_table"] = gr.Dataframe(interactive=False, wrap=True, elem_id="eval-gen-table")
    return ui


def _votes_section() -> dict[str, Any]:
    ui: dict[str, Any] = {}
    with gr.Accordion("Win rate against the base (your votes)", open=False):
        ui["win_button"] = gr.Button("Refresh win rates", size="sm", elem_id="eval-win-button")
        ui["win_note"] = gr.Markdown(elem_id="eval-win-note")
        ui["win_table"] = gr.Dataframe(pd.DataFrame(columns=WIN_COLUMNS), interactive=False,
                                       elem_id="eval-win-table")
    return ui


def _checkpoint_section() -> dict[str, Any]:
    ui: dict[str, Any] = {}
    with gr.Accordion("Checkpoints of one run", open=False):
        with gr.Row():
            ui["ckpt_run"] = gr.Dropdown([], label="Run", allow_custom_value=True, elem_id="eval-ckpt-run")
            ui["ckpt_prompt"] = gr.Textbox(value="What does LoRA train?", label="Prompt", scale=3)
            ui["ckpt_tokens"] = gr.Slider(8, 256, value=48, step=8, label="Max new tokens")
        ui["ckpt_button"] = gr.Button("Answer with every checkpoint", elem_id="eval-ckpt-button")
        ui["ckpt_table"] = gr.Dataframe(pd.DataFrame(columns=CHECKPOINT_COLUMNS), interactive=False, wrap=True,
                                        elem_id="eval-ckpt-table")
    return ui


def build_eval_tab(manager: RunManager, engine: ChatEngine, feedback_db: str | Path | None = None,
                   scorers: ScorerCache | None = None) -> dict[str, Any]:
    """``feedback_db``: the votes' SQLite file (default: feedback.db beside the runs); ``scorers``: the reward
    model in memory, shared with the RLHF tab."""
    gr.Markdown(LEARN_EVAL)
    with gr.Row():
        runs = gr.Dropdown([], multiselect=True, label="Runs to evaluate (adapters)", elem_id="eval-runs", scale=4,
                           allow_custom_value=True, info="Each adapter is compared with the base it trained on.")
        refresh = gr.Button("Refresh runs", size="sm", scale=1)
    ui = {"runs": runs, "refresh": refresh, **_loss_section(), **_generation_section(), **_votes_section(),
          **_checkpoint_section()}
    _wire(manager, engine, scorers or ScorerCache(), Path(feedback_db or manager.root / FEEDBACK_DB), ui)
    return ui


def _wire(manager: RunManager, engine: ChatEngine, scorers: ScorerCache, feedback_db: Path, ui: dict[str, Any]) -> None:
    choices = bind(run_choices, manager)
    ui["refresh"].click(choices, ui["runs"], [ui["runs"], ui["ckpt_run"]], api_name="list_eval_runs")
    data = [ui["source"], ui["split"]]
    ui["loss_button"].click(bind(evaluate_loss, manager, engine),
                            [ui["runs"], *data, ui["limit"], ui["batch_size"]],
                            [ui["loss_table"], ui["loss_plot"], ui["loss_summary"]], api_name="eval_loss",
                            **CONCURRENCY)
    ui["gen_button"].click(bind(compare_generations, manager, engine, scorers),
                           [ui["runs"], *data, ui["prompts"], ui["max_new_tokens"]],
                           [ui["gen_table"], ui["gen_summary"]], api_name="eval_generations", **CONCURRENCY)
    ui["win_button"].click(bind(win_rates, feedback_db), None, [ui["win_table"], ui["win_note"]],
                           api_name="win_rates")
    ui["ckpt_button"].click(bind(checkpoint_answers, manager, engine),
                            [ui["ckpt_run"], ui["ckpt_prompt"], ui["ckpt_tokens"]], ui["ckpt_table"],
                            api_name="checkpoint_answers", **CONCURRENCY)
    on_page_load(choices, ui["runs"], [ui["runs"], ui["ckpt_run"]])
    on_page_load(bind(win_rates, feedback_db), None, [ui["win_table"], ui["win_note"]])
