"""The Chat tab's feedback, apart from its layout: who gives it, the vote after a turn, thumbs on one answer, a
comment and a corrected answer, each stored through the FeedbackStore. A visitor may rate only the answers given
to them. Not a tab: components/chat_tab.py wires these handlers to its controls."""

from __future__ import annotations

import sqlite3
import uuid
from typing import Any

import gradio as gr

from components.shared import refusal, visitor_of
from finetune.core.access import AccessDenied, require_signed_in
from finetune.services.feedback import FeedbackError, FeedbackStore

Turn = dict[str, Any]
SIDES = ("left", "right")
# The Chat tab's sides are the places of a stored pair (left is stored first): the store's words for a vote.
PAIR_PLACE = dict(zip(SIDES, ("first", "second")))
VOTES = [("Left is better", "left"), ("Right is better", "right"), ("Tie", "tie"), ("Both bad", "both_bad")]
ARENA_VOTES = [("A is better", "left"), ("B is better", "right"), ("Tie", "tie"), ("Both bad", "both_bad")]
TARGETS = [("Both answers", "both"), ("Left / A", "left"), ("Right / B", "right")]
ARENA_LABELS = ("A", "B")
# One refusal for an answer that is someone else's and one that was never recorded: no visitor learns which exist.
NOT_YOUR_ANSWER = "You can rate only answers given to you: send a prompt, then rate its answers."


def who(request: gr.Request | None) -> dict[str, str | None]:
    """Who gave the feedback: the signed-in visitor where sign-in is on, else the login name when the app has
    auth (LORA_LAB_AUTH); and the browser session."""
    if request is None:
        return {"user": None, "session": None}
    visitor = visitor_of(request)
    user = visitor.owner if visitor.sign_in else getattr(request, "username", None) or None
    return {"user": user, "session": getattr(request, "session_hash", None)}


def feedback_giver(request: gr.Request | None) -> dict[str, str | None]:
    """who() for a vote, thumb or comment: a visitor who has not signed in on a shared app may chat, not rate."""
    try:
        require_signed_in(visitor_of(request), "give feedback")
    except AccessDenied as error:
        raise refusal(str(error)) from None
    return who(request)


def model_name(side: str, run_id: str, reference: str | None = None) -> str:
    if side == "base":
        return f"the starting adapter ({reference})" if reference else "the base model"
    return f"the fine-tuned model ({run_id})"


def show_vote(turn: Turn | None) -> tuple[Any, Any, str]:
    """After a stored turn: open the vote, worded for arena (A/B) or side-by-side (left/right)."""
    if not turn:
        return gr.Column(visible=False), gr.Radio(value=None), ""
    hint = ("Which answer is better? The models are revealed after your vote." if turn["arena"]
            else "Rate this turn: which answer is better, and what should the answer have been?")
    if turn.get("follow_up"):  # a preference pair stores the whole conversation as its prompt
        hint += (" This answer follows earlier turns, so your vote is stored with the whole conversation as its "
                 "prompt; press Clear between unrelated questions to give the RLHF step separate prompts.")
    return gr.Column(visible=True), gr.Radio(choices=ARENA_VOTES if turn["arena"] else VOTES, value=None), hint


# --- feedback --------------------------------------------------------------------------------------------------

def submit_feedback(store: FeedbackStore | None, turn: Turn | None, vote: str | None, comment: str | None,
                    correction: str | None, target: str | None, request: gr.Request = None
                    ) -> tuple[str, Any, Any, str, str, Turn | None]:
    """Store the vote, comment and corrected answer for the last turn; in arena mode reveal the models."""
    if store is None:
        raise refusal("Feedback is not stored in this app (it was built without a feedback store).")
    who = feedback_giver(request)
    if not turn:
        raise refusal("Send a prompt first: there is no answer to rate yet.")
    comment, correction = (comment or "").strip(), (correction or "").strip()
    if not (vote or comment or correction):
        raise refusal("Choose which answer is better, or write a comment or a corrected answer.")
    if vote and vote not in ("left", "right", "tie", "both_bad"):
        raise refusal(f"Unknown vote {vote!r}.")
    gen, saved = turn.get("gen") or {}, []
    if not store.given_to([gen.get(side) for side in SIDES], **who):
        raise refusal(NOT_YOUR_ANSWER)
    try:
        if vote:
            choice = PAIR_PLACE.get(vote, vote)
            store.add_preference(gen["left"], gen["right"], choice, comment=comment or None,
                                 arena=turn["arena"], **who)
            saved.append("vote")
        elif comment:
            store.add_comment(gen["left"], comment, other_id=gen["right"], **who)
        if comment:
            saved.append("comment")
        if correction:
            sides = SIDES if (target or "both") == "both" else (target,)
            group = str(uuid.uuid4())  # one correction, stored once per answer it replaces, counted once
            for side in sides:
                store.add_correction(gen[side], correction, group_id=group, **who)
            saved.append("corrected answer" + (" (for both answers: 2 preference pairs)" if len(sides) > 1 else ""))
    except FeedbackError as error:
        raise refusal(str(error)) from None
    except sqlite3.Error as error:
        raise gr.Error(f"Could not save the feedback (nothing was lost from the form): {error}") from None
    message = f"Saved: {', '.join(saved)}. {store.sync_summary()}"
    labels = [gr.Chatbot(), gr.Chatbot()]
    if turn["arena"] and vote:
        names = [model_name(side, turn["run_id"], turn.get("reference")) for side in turn["order"]]
        message = f"**Revealed:** A was {names[0]}, B was {names[1]}.  \n" + message
        labels = [gr.Chatbot(label=f"{letter}: {name}") for letter, name in zip(ARENA_LABELS, names)]
        turn = {**turn, "voted": True}
    return message, labels[0], labels[1], "", "", turn


def like_answer(store: FeedbackStore | None, side: str, turn: Turn | None, data: gr.EventData,
                request: gr.Request = None) -> None:
    """Thumbs up/down (or taken back) on one answer, from the chatbot's own like buttons. Typed as EventData, not
    LikeData: an API call carries no like event, and LikeData would fail inside gradio with a bare error."""
    if store is None:
        raise refusal("Feedback is not stored in this app (it was built without a feedback store).")
    data = _like_event(data)
    who = feedback_giver(request)
    index = data.index[0] if isinstance(data.index, (list, tuple)) else data.index
    generation = ((turn or {}).get("messages", {}).get(side, {})).get(str(index))
    if generation is None:
        gr.Warning("That answer was not stored (it came before this session's feedback started); "
                   "ask again to rate it.")
        return
    if not store.given_to([generation], **who):
        raise refusal(NOT_YOUR_ANSWER)
    up = data.liked if isinstance(data.liked, bool) else None  # "" means the thumb was clicked off again
    try:
        store.add_thumbs(generation, up, **who)
    except (FeedbackError, sqlite3.Error) as error:
        raise gr.Error(f"Could not save the thumb: {error}") from None
    gr.Info({True: "Saved 👍", False: "Saved 👎", None: "Thumb removed"}[up])


def _like_event(data: Any) -> Any:
    """The like event's index and thumb (a LikeData as is); a call without one is refused in words."""
    if not isinstance(data, gr.EventData):  # a LikeData-like object (a direct call)
        return data
    event = data.__dict__.get("_data")  # EventData's own __getattr__ fails when an API call carries no event
    if not isinstance(event, dict) or not {"index", "value"} <= set(event):
        raise refusal("A thumb rates an answer shown in the chat: press 👍 or 👎 under it. Through the API, rate the "
                      "last answer with /submit_feedback.")
    return gr.LikeData(data.__dict__.get("target"), event)
