"""Training data from the feedback store: preference pairs for the reward model and DPO, thumbs for KTO.

This is where a vote's words change, once (core/preference.py's VOTE_COLUMNS): the store keeps a vote as it was
given, relative to the two answers shown ('first' or 'second' won, a 'tie', 'both_bad'); a pair is TRL's
``prompt/chosen/rejected`` (the winner chosen), and a corrected answer is chosen over the answer it corrects. Ties and both-bad votes carry no pair.
Thumbs become TRL's unpaired ``prompt/completion/label`` rows (True = thumbs up).

    write_pairs(store, "pairs.jsonl"); write_thumbs(store, "thumbs.jsonl")
    export_feedback("runs/feedback.db", "runs/feedback-exports/me", "pairs", owner="me")   # the RLHF tab's
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from finetune.core.preference import VOTE_COLUMNS, Messages, PreferenceError
from finetune.core.run_folder import PARTIAL_SUFFIX
from finetune.services.feedback import FeedbackStore, conversation

Pair = dict[str, Messages]


def preference_pair(history: str | Messages, prompt: str, chosen: str, rejected: str) -> Pair:
    """One conversational preference row: the conversation, then the chosen and the rejected answer."""
    return {"prompt": conversation(history, prompt), "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def pair_from_vote(vote: dict[str, Any]) -> Pair:
    """A vote between the first (a_*) and the second (b_*) answer as chosen/rejected: the one named translation
    from the Chat tab's vote to the reward model's columns."""
    chosen, rejected = ("a", "b") if VOTE_COLUMNS[vote["value"]][0] == "chosen" else ("b", "a")
    # Each side may have its own earlier turns; the prompt is the conversation the winner continued.
    return preference_pair(vote[f"{chosen}_history"], vote[f"{chosen}_prompt"], vote[f"{chosen}_text"],
                           vote[f"{rejected}_text"])


def pair_rows(store: FeedbackStore, owner: str | None = None) -> list[Pair]:
    """TRL conversational preference rows: votes with a winner, and corrections over their originals (only
    those ``owner`` gave, when given)."""
    rows = [pair_from_vote(vote) for vote in store.decided_votes(owner)]
    rows += [preference_pair(fix["history"], fix["prompt"], fix["correction"], fix["response"])
             for fix in store.corrections(owner) if fix["correction"].strip() != fix["response"].strip()]
    return rows


def thumb_rows(store: FeedbackStore, owner: str | None = None) -> list[dict[str, Any]]:
    """TRL unpaired (KTO) rows: prompt, completion, label (True = thumbs up)."""
    return [{"prompt": conversation(t["history"], t["prompt"]),
             "completion": [{"role": "assistant", "content": t["response"]}],
             "label": t["value"] == "up"} for t in store.latest_thumbs(owner)]


def write_pairs(store: FeedbackStore, path: str | Path, owner: str | None = None) -> int:
    """Write the preference pairs as JSONL (loadable with datasets' "json" loader); returns rows written."""
    return _write_jsonl(Path(path), pair_rows(store, owner))


def write_thumbs(store: FeedbackStore, path: str | Path, owner: str | None = None) -> int:
    """Write the thumbs as an unpaired prompt/completion/label JSONL; returns rows written."""
    return _write_jsonl(Path(path), thumb_rows(store, owner))


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> int:
    """Write to a temporary name and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    with partial.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(partial, path)
    return len(rows)


def export_feedback(store_path: str | Path, out_dir: str | Path, kind: str = "pairs",
                    owner: str | None = None) -> Path:
    """Export the collected feedback ('pairs' for DPO, 'thumbs' for KTO; only ``owner``'s when given) to a JSONL
    file in ``out_dir`` and return its path; PreferenceError (a message for the user) when there is nothing."""
    store_path = Path(store_path)
    if not store_path.is_file():
        raise PreferenceError(f"No feedback collected yet ({store_path} does not exist): chat in the Chat tab and "
                              "rate answers first.")
    out = Path(out_dir) / f"feedback-{kind}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    store = FeedbackStore(store_path)
    written = (write_pairs if kind == "pairs" else write_thumbs)(store, out, owner)
    if not written:
        raise PreferenceError(f"The feedback store has no {'A/B preferences' if kind == 'pairs' else 'thumbs'} "
                              "yet: rate some answers in the Chat tab first.")
    return out
