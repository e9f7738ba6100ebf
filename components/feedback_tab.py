"""The Feedback tab: what people said about the answers, how each fine-tuned run fares against its base, and the
exports that feed the RLHF stage (preference pairs for a reward model / DPO, thumbs for KTO).

Everything shown is read from the FeedbackStore (SQLite); LangSmith, when configured, only mirrors it. On a shared
app a visitor sees and exports only their own feedback; an operator (or the local user) sees everyone's.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from components.downloads import downloadable
from components.shared import bind, feedback_owner, refusal, visitor_of
from finetune.core.access import AccessDenied, require_signed_in
from finetune.services.evaluate import WinRate, win_rate
from finetune.services.feedback import FeedbackStore
from finetune.services.feedback_export import write_pairs, write_thumbs

RECENT_COLUMNS = ["time", "kind", "value", "score", "arena", "model / adapter", "prompt", "answer", "comment",
                  "corrected answer", "user"]
WIN_COLUMNS = ["adapter", "wins", "losses", "ties", "both bad", "votes", "win rate", "95% CI", "verdict"]


def _short(text: Any, limit: int = 120) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _value(row: dict[str, Any]) -> str:
    """A vote reads as 'tuned better' rather than the stored 'first'/'second'."""
    if row["kind"] != "preference":
        return row["value"] or ""
    first, second = row["side"] or "first", row["other_side"] or "second"
    return {"first": f"{first} better", "second": f"{second} better", "tie": "tie",
            "both_bad": "both bad"}.get(row["value"], row["value"])


def _about(row: dict[str, Any]) -> str:
    adapter = row["adapter"] or row.get("other_adapter")
    model = Path(str(row["model"])).name or str(row["model"])
    if row["kind"] == "preference" or row.get("other_side"):
        return f"{adapter} vs base ({model})" if adapter else model
    return f"{adapter} ({model})" if row["adapter"] else f"base ({model})"


def recent_table(store: FeedbackStore, limit: int = 50, owner: str | None = None) -> pd.DataFrame:
    rows = [[time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created"])), r["kind"], _value(r),
             None if r["kind"] == "preference" else r["score"],  # a vote's score is relative to one side
             "yes" if r["arena"] else "", _about(r), _short(r["prompt"]), _short(r["response"]),
             _short(r["comment"]), _short(r["correction"]), r["user"] or ""]
            for r in store.recent(limit, owner=owner)]
    return pd.DataFrame(rows, columns=RECENT_COLUMNS)


def wins_table(store: FeedbackStore, owner: str | None = None) -> pd.DataFrame:
    """Fine-tuned vs base per adapter, with the Evaluate tab's win rate (a tie or 'both bad' is half a win)."""
    rows = []
    for adapter, c in sorted(store.win_counts(owner=owner).items()):
        result = win_rate(adapter, c)
        rate = round(result.rate, 3) if result.rate is not None else None
        interval = f"{result.low:.2f}-{result.high:.2f}" if result.low is not None else "–"
        rows.append([adapter, c["wins"], c["losses"], c["ties"], c["both_bad"], result.votes, rate, interval,
                     win_verdict(result)])
    return pd.DataFrame(rows, columns=WIN_COLUMNS)


def win_verdict(result: WinRate) -> str:
    """'better' or 'worse' only when the 95% interval leaves out 0.5; else how little the votes can tell (a walk
    saw a bare win rate of 0 from a single vote)."""
    if result.low is None or result.high is None:
        return "no votes yet"
    if result.low > 0.5:
        return "tuned better"
    if result.high < 0.5:
        return "base better"
    return f"cannot tell yet ({result.votes} {'vote' if result.votes == 1 else 'votes'}: the interval holds 0.5)"


def counts_text(store: FeedbackStore, owner: str | None = None) -> str:
    c = store.counts(owner=owner)
    # A correction for both answers of a turn is one correction (exported as one pair per answer it replaces).
    replaced = (f" (replacing {c['corrected_answers']} answers)" if c["corrected_answers"] != c["corrections"]
                else "")
    return (f"**{c['generations']}** answers stored · **{c['thumbs_up']}** 👍 · **{c['thumbs_down']}** 👎 · "
            f"**{c['preferences']}** pairwise votes · **{c['corrections']}** "
            f"{'correction' if c['corrections'] == 1 else 'corrections'}{replaced} · **{c['comments']}** comments")


def feedback_summary(store: FeedbackStore, request: gr.Request = None) -> tuple[str, str, pd.DataFrame, pd.DataFrame]:
    """LangSmith line, counts, recent feedback and the win/loss table, all read fresh from the store: the
    visitor's own feedback, everyone's for an operator."""
    visitor = visitor_of(request)
    owner = feedback_owner(visitor)
    counts = counts_text(store, owner)
    if visitor.sign_in and visitor.name is None:
        counts = "Sign in to see the feedback you gave. " + counts
    return store.sync_summary(), counts, recent_table(store, owner=owner), wins_table(store, owner)


def sync_now(store: FeedbackStore) -> str:
    """Retry everything waiting for LangSmith at once instead of after the back-off."""
    if store.langsmith is None:
        raise refusal("LangSmith is off: set LANGSMITH_API_KEY (and optionally LANGSMITH_ENDPOINT, "
                       "LANGSMITH_PROJECT) before starting the app.")
    store.retry_now()
    store.flush(timeout=5.0)
    return store.sync_summary()


def _export(store: FeedbackStore, folder: Path, kind: str, request: gr.Request = None) -> tuple[str | None, str]:
    """One visitor's feedback (everyone's for an operator) into a folder of their own, so two visitors exporting
    at the same second never overwrite, nor download, each other's file."""
    visitor = visitor_of(request)
    try:
        require_signed_in(visitor, "export feedback")
    except AccessDenied as error:
        raise refusal(str(error)) from None
    owner = feedback_owner(visitor)
    if visitor.sign_in:
        folder = folder / (owner or "all")
    path = folder / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    count = (write_pairs if kind == "pairs" else write_thumbs)(store, path, owner)
    if count == 0:
        path.unlink(missing_ok=True)
        what = ("pairwise votes with a winner or corrected answers" if kind == "pairs" else "thumbs up/down")
        gr.Warning(f"Nothing to export yet: give some {what} in the Chat tab first.")
        return None, f"No rows: no {what} yet."
    # The file name only: the page shows no server path (the download carries the file itself).
    return downloadable(path), (f"Wrote {count} rows to {path.name} "
                                "(load with datasets.load_dataset('json', data_files=...)).")


def export_pairs(store: FeedbackStore, folder: Path, request: gr.Request = None) -> tuple[str | None, str]:
    """Preference pairs as JSONL: prompt (chat messages), chosen and rejected (assistant messages)."""
    return _export(store, folder, "pairs", request)


def export_thumbs(store: FeedbackStore, folder: Path, request: gr.Request = None) -> tuple[str | None, str]:
    """Thumbs as unpaired JSONL for KTO: prompt, completion and label (True = thumbs up)."""
    return _export(store, folder, "thumbs", request)


def build_feedback_tab(store: FeedbackStore, exports_dir: str | Path) -> dict[str, Any]:
    exports_dir = Path(exports_dir)
    with gr.Row():
        sync = gr.Markdown(store.sync_summary(), elem_id="langsmith-status")
        refresh = gr.Button("Refresh", size="sm", scale=0, elem_id="feedback-refresh")
        send = gr.Button("Send queued now", size="sm", scale=0)
    counts = gr.Markdown("", elem_id="feedback-counts")
    gr.Markdown("### Fine-tuned vs base (pairwise and arena votes; the latest vote per pair and session counts)")
    wins = gr.Dataframe(pd.DataFrame(columns=WIN_COLUMNS), interactive=False, elem_id="win-table")
    gr.Markdown("### Recent feedback")
    # Long prompts and answers wrap; the short columns get room for their headers (else one letter per line).
    recent = gr.Dataframe(pd.DataFrame(columns=RECENT_COLUMNS), interactive=False, wrap=True,
                          elem_id="recent-feedback",
                          column_widths=["150px", "90px", "80px", "70px", "70px", "160px", "220px", "260px", "160px",
                                         "160px", "80px"])
    gr.Markdown("### Export as training data (the inputs of the RLHF stage)")
    with gr.Row():
        pairs_button = gr.Button("Export preference pairs", elem_id="export-pairs")
        thumbs_button = gr.Button("Export thumbs (KTO)", elem_id="export-thumbs")
    with gr.Row():
        pairs_file = gr.File(label="prompt / chosen / rejected (JSONL)", elem_id="pairs-file")
        thumbs_file = gr.File(label="prompt / completion / label (JSONL)", elem_id="thumbs-file")
    export_note = gr.Markdown("", elem_id="export-note")
    summary_fn = bind(feedback_summary, store)
    refresh.click(summary_fn, None, [sync, counts, recent, wins], api_name="feedback_summary")
    send.click(bind(sync_now, store), None, sync, api_name="sync_now")
    pairs_button.click(bind(export_pairs, store, exports_dir), None, [pairs_file, export_note],
                       api_name="export_pairs")
    thumbs_button.click(bind(export_thumbs, store, exports_dir), None, [thumbs_file, export_note],
                        api_name="export_thumbs")
    return {"sync": sync, "refresh": refresh, "send": send, "counts": counts, "wins": wins, "recent": recent,
            "export_pairs": pairs_button, "export_thumbs": thumbs_button, "pairs_file": pairs_file,
            "thumbs_file": thumbs_file, "export_note": export_note, "summary_fn": summary_fn}
