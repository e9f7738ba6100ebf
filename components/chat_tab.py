"""The Chat tab: one prompt, two chatbots side by side — the base model and a fine-tuned run — streaming together.

The ChatEngine keeps one base model in memory and attaches each run's adapter by name, so switching runs
is quick; the base answer is the same model with its adapters disabled.

Human feedback is captured here: every answer is stored (``FeedbackStore``) with its model, adapter, prompt,
history and sampling settings; thumbs up/down on any answer, and after each turn a pairwise vote, a comment and
a corrected answer. In **blind arena mode** the two answers are shown as "A" and "B" in random order (single
questions, no history, so the conversation gives nothing away) and the models are revealed only after the vote.

A DPO/KTO/GRPO run that started from an SFT adapter can be compared with that starting adapter instead of the
base ("Compare with"): what the preference training changed, not what the whole fine-tuning did. Both sides come
from the same base with two adapters attached.
"""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path
from typing import Any, Iterator

import gradio as gr

from components.chat_feedback import (ARENA_LABELS, SIDES, TARGETS, VOTES, Turn, like_answer, show_vote,
                                       submit_feedback, who)
from components.page_loads import on_page_load
from components.shared import CHAT_SLOT, bind, duration, refusal, require_visible, visible_adapters, visitor_of
from finetune.core.access import AccessDenied, can_view, sign_in_hint
from finetune.core.config import ConfigError, load_config
from finetune.core.data import validation_prompts
from finetune.core.run_folder import ADAPTER_DIR, RUN_CONFIG, has_adapter
from finetune.services.admission import RunError
from finetune.services.chat import (DEFAULT_NEW_TOKENS, ChatEngine, SamplingSettings, check_prompt, normalize_history,
                                    split_budget_note)
from finetune.services.feedback import FeedbackStore
from finetune.services.runs import RunManager

Chat = list[dict[str, str]]
COMPARE = [("Base model", "base"), ("Starting adapter", "start")]
POLICY_STAGES = ("dpo", "kto", "grpo")
LONG_WAIT_SECONDS = 60  # an expected answer this long gets a reminder that Stop exists


def side_labels(arena: bool, run_id: str | None, reference: str | None = None) -> tuple[str, str]:
    if arena:
        return ARENA_LABELS
    left = f"Starting adapter ({reference})" if reference else "Base model"
    return left, f"Fine-tuned ({run_id})" if run_id else "Fine-tuned (pick a run)"


# --- adapters ------------------------------------------------------------------------------------------------

def starting_adapter(manager: RunManager, run_id: str | None) -> tuple[str, Path] | None:
    """(name, folder) of the adapter a DPO/KTO/GRPO run started from (``preference.start_adapter``: a run id or an
    adapter folder), or None: an SFT run, a run that started from the base, or a start that no longer exists."""
    if not run_id:
        return None
    try:
        cfg = load_config(manager.run_dir(run_id) / RUN_CONFIG)
    except (ConfigError, RunError, OSError):
        return None
    start = cfg.preference.start_adapter if cfg.stage in POLICY_STAGES else ""
    if not start:
        return None
    adapters = manager.finished_adapters()
    if start in adapters:
        return start, adapters[start]
    for folder in (Path(start).expanduser() / ADAPTER_DIR, Path(start).expanduser()):
        if has_adapter(folder):
            return f"{run_id} start", folder  # a folder, not a run: named after the policy that started from it
    return None


def _reference(manager: RunManager, run_id: str, compare: str | None) -> tuple[str, Path] | None:
    """The left side's adapter for ``compare``: None for the base model."""
    if (compare or "base") == "base":
        return None
    if compare != "start":
        raise ValueError(f"Compare with must be 'base' or 'start', got {compare!r}.")
    reference = starting_adapter(manager, run_id)
    if reference is None:
        raise ValueError(f"Run '{run_id}' did not start from an adapter that still exists: compare it with the "
                         "base model.")
    return reference


def _reference_name(manager: RunManager, run_id: str | None, compare: str | None,
                    request: gr.Request = None) -> str | None:
    """The adapter a run started from, named on the left chat; nothing about a run the visitor may not see."""
    if compare != "start" or not run_id or not can_view(visitor_of(request), manager.owner_of(run_id)):
        return None
    reference = starting_adapter(manager, run_id)
    return reference[0] if reference else None


def adapter_choices(manager: RunManager, current: str | None = None, request: gr.Request = None) -> Any:
    """Dropdown of finished runs with an adapter that the visitor may see, newest first; keeps the current pick
    when it still exists."""
    ids = list(visible_adapters(manager, visitor_of(request)))
    value = current if current in ids else (ids[0] if ids else None)
    return gr.Dropdown(choices=ids, value=value)


def select_adapter(manager: RunManager, run_id: str | None, arena: bool = False, request: gr.Request = None
                   ) -> tuple[Any, Any, Any, Any]:
    """New labels, example prompts from the run's validation data, empty chats, and "Compare with" shown (set to
    the base model) only for a run that started from an adapter. Another visitor's run shows nothing of its data."""
    try:
        require_visible(manager, run_id, visitor_of(request), "chat with this run")
    except AccessDenied as error:
        raise refusal(str(error)) from None
    start = starting_adapter(manager, run_id)
    compare = gr.Radio(value="base", visible=start is not None,
                       info=f"This run started from the adapter '{start[0]}': compare with it to see what the "
                            "preference training changed." if start else None)
    left, right = side_labels(bool(arena), run_id)
    if not run_id:
        return gr.Chatbot(label=right, value=[]), gr.Dataset(samples=[]), gr.Chatbot(label=left, value=[]), compare
    try:
        cfg = load_config(manager.run_dir(run_id) / RUN_CONFIG)
        examples = validation_prompts(cfg.data, limit=6)
    except (ConfigError, RunError):
        examples = []
    return (gr.Chatbot(label=right, value=[]), gr.Dataset(samples=[[p] for p in examples]),
            gr.Chatbot(label=left, value=[]), compare)


def toggle_arena(manager: RunManager, arena: bool, run_id: str | None, compare: str | None = "base",
                 request: gr.Request = None) -> tuple[Any, Any, Any, Any]:
    """Arena on/off, or another "Compare with", starts afresh: empty chats, A/B (or model) labels, no open vote."""
    left, right = side_labels(bool(arena), run_id, _reference_name(manager, run_id, compare, request))
    return gr.Chatbot(label=left, value=[]), gr.Chatbot(label=right, value=[]), gr.Column(visible=False), None


# --- one turn --------------------------------------------------------------------------------------------------

def begin_turn(manager: RunManager, arena: bool, run_id: str | None, compare: str | None = "base",
               request: gr.Request = None) -> tuple[Any, Any, Any, str]:
    """Before the answers stream: hide the last turn's vote and, in arena mode, hide the models' names again."""
    left, right = side_labels(bool(arena), run_id, _reference_name(manager, run_id, compare, request))
    return gr.Chatbot(label=left), gr.Chatbot(label=right), gr.Column(visible=False), ""


def chat(manager: RunManager, engine: ChatEngine, store: FeedbackStore | None, prompt: str, run_id: str | None,
         base_chat: Chat | None, tuned_chat: Chat | None, max_new_tokens: float, temperature: float, top_p: float,
         seed: float, arena: bool = False, turn: Turn | None = None, compare: str | None = "base",
         request: gr.Request = None) -> Iterator[tuple[Chat, Chat, str, Turn | None]]:
    """Stream both answers: yields (left chat, right chat, cleared prompt box, turn) as the answers grow.

    Left is the base model (or, with ``compare="start"``, the adapter the run started from) and right the
    fine-tuned one, except in arena mode, where the order is random. When both answers are complete they are
    stored, and the turn (their ids) is handed to the feedback controls.
    """
    try:
        prompt = check_prompt(prompt)
        settings = SamplingSettings(max_new_tokens, temperature, top_p, seed)
        visitor = visitor_of(request)
        if not run_id:
            how = (f"{sign_in_hint()} to train one in the Train tab" if visitor.sign_in and visitor.name is None
                   else "train one in the Train tab")
            raise ValueError(f"Pick a finished run's adapter first ({how}).")
        require_visible(manager, run_id, visitor, "chat with this run")
        adapters = manager.finished_adapters()
        if run_id not in adapters:
            raise ValueError(f"Run '{run_id}' has no saved adapter.")
        cfg = load_config(manager.run_dir(run_id) / RUN_CONFIG)
        reference = _reference(manager, run_id, compare)
    except (ValueError, RunError, AccessDenied) as error:  # ConfigError is a ValueError
        raise refusal(str(error)) from None
    arena = bool(arena)
    # Arena turns are single questions: a shared history would tell which side is which.
    histories = {"left": [] if arena else normalize_history(base_chat),
                 "right": [] if arena else normalize_history(tuned_chat)}
    order = random.choice([("base", "tuned"), ("tuned", "base")]) if arena else ("base", "tuned")
    user = {"role": "user", "content": prompt}
    texts = {"base": "", "tuned": ""}

    def shown() -> tuple[Chat, Chat]:
        return tuple(histories[side] + [user, {"role": "assistant", "content": texts[order[i]]}]
                     for i, side in enumerate(SIDES))  # type: ignore[return-value]

    try:
        for texts["base"], texts["tuned"] in engine.stream_pair(
                prompt, histories[SIDES[order.index("base")]], histories[SIDES[order.index("tuned")]],
                cfg.model, run_id, adapters[run_id], settings, reference=reference):
            yield (*shown(), "", turn)
    except (ValueError, RuntimeError) as error:  # too long a prompt, a base model that cannot be loaded
        raise refusal(str(error)) from None
    if store is None or (visitor.sign_in and visitor.name is None):  # signed out: nobody's to keep, nor to rate
        return
    # Stored: what each model wrote; the time-limit notice the chat showed after an answer goes beside it, so
    # neither the reward model nor DPO ever trains on it.
    (base_text, base_notice), (tuned_text, tuned_notice) = (split_budget_note(texts[s]) for s in ("base", "tuned"))
    try:
        ids = store.record_turn(model=cfg.model.source, adapter=run_id, prompt=prompt,
                                base_history=histories[SIDES[order.index("base")]],
                                tuned_history=histories[SIDES[order.index("tuned")]],
                                settings=vars(settings).copy(), base_response=base_text, tuned_response=tuned_text,
                                base_notice=base_notice, tuned_notice=tuned_notice,
                                base_adapter=reference and reference[0], **who(request))
    except sqlite3.Error as error:
        raise gr.Error(f"The answers are shown but could not be saved for feedback: {error}") from None
    yield (*shown(), "", _next_turn(turn, ids, order, arena, run_id, histories, reference and reference[0]))


def _next_turn(turn: Turn | None, ids: dict[str, str], order: tuple[str, str], arena: bool, run_id: str,
               histories: dict[str, Chat], reference: str | None = None) -> Turn:
    """The turn the feedback controls act on, and which stored answer each chat message is (for thumbs)."""
    keep = (turn and not arena and not turn.get("arena") and turn.get("run_id") == run_id
            and turn.get("reference") == reference)
    messages = {side: dict(turn["messages"][side]) if keep else {} for side in SIDES}
    for index, side in enumerate(SIDES):
        messages[side][str(len(histories[side]) + 1)] = ids[order[index]]
    return {"turn_id": ids["turn"], "run_id": run_id, "reference": reference, "arena": arena, "order": list(order),
            "gen": {side: ids[order[index]] for index, side in enumerate(SIDES)}, "messages": messages,
            "voted": False, "follow_up": any(histories[side] for side in SIDES)}


def clear_chats() -> tuple[Chat, Chat]:
    return [], []


def default_new_tokens(engine: ChatEngine) -> int:
    """A default answer length this device writes in reasonable time (128 tokens on a busy CPU ran into the
    server's 600 s limit)."""
    return DEFAULT_NEW_TOKENS["gpu" if engine.profile.is_cuda else "cpu"]


def expected_time(engine: ChatEngine, max_new_tokens: float | None) -> str:
    """Before sending: about how long an answer of this length takes at the pace measured on the latest answers
    (re-measured on every answer, so a busier machine shows), and whether the server's time limit would cut it."""
    tokens = int(max_new_tokens or 0)
    seconds = engine.expected_seconds(tokens)
    if seconds is None:
        return (f"Up to {tokens} new tokens per answer; the first answer measures how fast this machine writes "
                "them. Stop ends an answer early.")
    pace = f"{engine.seconds_per_token:.2f} s per token for both answers, measured on the latest answers"
    text = f"Up to {tokens} new tokens: about **{duration(seconds)}** at {pace}."
    if engine.max_seconds and seconds > engine.max_seconds:
        text += (f" ⚠️ That is longer than the server's limit of {duration(engine.max_seconds)} per answer: "
                 "fewer tokens, or the answer is cut there.")
    elif seconds > LONG_WAIT_SECONDS:
        text += " Stop ends an answer early."
    return text


# --- layout ----------------------------------------------------------------------------------------------------

def _feedback_panel() -> dict[str, Any]:
    with gr.Column(visible=False, elem_id="feedback-panel") as panel:
        hint = gr.Markdown("", elem_id="vote-hint")
        vote = gr.Radio(VOTES, label="Which answer is better?", elem_id="vote")
        with gr.Row():
            comment = gr.Textbox(label="Comment (optional)", lines=2, elem_id="feedback-comment")
            correction = gr.Textbox(label="Corrected answer (optional)", lines=2, elem_id="feedback-correction",
                                    info="What the answer should have been; exported as a preferred answer.")
        target = gr.Radio(TARGETS, value="both", label="The corrected answer replaces", elem_id="correction-target")
        submit = gr.Button("Save feedback", variant="primary", elem_id="feedback-submit")
    status = gr.Markdown("", elem_id="feedback-status")
    return {"panel": panel, "hint": hint, "vote": vote, "comment": comment, "correction": correction,
            "target": target, "submit": submit, "status": status}


def build_chat_tab(manager: RunManager, engine: ChatEngine, store: FeedbackStore | None = None) -> dict[str, Any]:
    with gr.Row():
        # allow_custom_value: API clients name a run that this session's dropdown has not listed yet.
        run = gr.Dropdown([], label="Fine-tuned run (adapter)", elem_id="adapter-pick", scale=3,
                          allow_custom_value=True,
                          info="Finished runs that saved an adapter. The base model stays loaded when you switch.")
        refresh = gr.Button("Refresh runs", size="sm", scale=1)
        arena = gr.Checkbox(False, label="Blind arena mode", elem_id="arena-mode", scale=1,
                            info="Answers shown as A and B in random order; the models are revealed after your vote.")
        compare = gr.Radio(COMPARE, value="base", label="Compare with", elem_id="chat-compare", scale=1,
                           visible=False)  # shown for a DPO/KTO/GRPO run that started from an adapter
    with gr.Row():
        base_chat = gr.Chatbot(label="Base model", height=420, elem_id="base-chat")
        tuned_chat = gr.Chatbot(label="Fine-tuned (pick a run)", height=420, elem_id="tuned-chat")
    with gr.Row():
        prompt = gr.Textbox(placeholder="Ask both models the same question…", show_label=False, scale=5,
                            elem_id="chat-prompt")
        send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
        stop = gr.Button("Stop", variant="stop", scale=1, elem_id="chat-stop")
        clear = gr.Button("Clear", scale=1)
    expected = gr.Markdown(expected_time(engine, default_new_tokens(engine)), elem_id="chat-expected")
    examples = gr.Dataset(components=[prompt], samples=[], label="Example prompts from the run's validation data")
    turn = gr.State(None)  # the last stored turn: its answers' ids and, in arena mode, the hidden order
    feedback = _feedback_panel()
    with gr.Accordion("Sampling (shared by both sides)", open=False):
        with gr.Row():
            max_new = gr.Slider(1, 512, value=default_new_tokens(engine), step=1, label="Max new tokens",
                                elem_id="max-new-tokens")
            temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature", info="0 = greedy",
                                    elem_id="temperature")
            top_p = gr.Slider(0.05, 1, value=0.9, step=0.05, label="Top-p")
            seed = gr.Number(value=0, precision=0, label="Seed", minimum=0)
    refresh_fn = bind(adapter_choices, manager)
    refresh.click(refresh_fn, run, run, api_name="list_adapters")
    run.change(bind(select_adapter, manager), [run, arena], [tuned_chat, examples, base_chat, compare],
               api_name="select_adapter")
    examples.click(lambda sample: sample[0], examples, prompt, api_visibility="private")
    handler = bind(chat, manager, engine, store)
    inputs = [prompt, run, base_chat, tuned_chat, max_new, temperature, top_p, seed, arena, turn, compare]
    outputs = [base_chat, tuned_chat, prompt, turn]
    timing = bind(expected_time, engine)
    answers = []
    for trigger, api in ((send.click, {"api_name": "chat"}), (prompt.submit, {"api_visibility": "private"})):
        started = trigger(bind(begin_turn, manager), [arena, run, compare],
                          [base_chat, tuned_chat, feedback["panel"], feedback["status"]], api_visibility="private")
        answered = started.then(handler, inputs, outputs, **CHAT_SLOT, **api)
        answered.success(show_vote, turn, [feedback["panel"], feedback["vote"], feedback["hint"]],
                         api_visibility="private")
        answered.then(timing, max_new, expected, api_visibility="private", show_progress="hidden")
        answers.append(answered)
    # Stop cancels the answer being generated: gradio closes the handler's generator, which ends generate() at
    # its next token and frees the model; what was written so far stays on screen (and is not stored).
    stop.click(None, None, None, cancels=answers, api_visibility="private")
    max_new.change(timing, max_new, expected, api_name="chat_expected_time", show_progress="hidden")
    clear.click(clear_chats, None, [base_chat, tuned_chat], api_name="clear_chat")
    _wire_feedback(store, feedback, turn, base_chat, tuned_chat)
    restart = bind(toggle_arena, manager)
    arena.change(restart, [arena, run, compare], [base_chat, tuned_chat, feedback["panel"], turn], api_name="set_arena")
    compare.input(restart, [arena, run, compare], [base_chat, tuned_chat, feedback["panel"], turn],
                  api_name="set_compare")
    on_page_load(refresh_fn, run, run)  # a page load picks the newest finished run
    on_page_load(timing, max_new, expected)  # the pace measured since the app started, not at build time
    return {"run": run, "refresh": refresh, "base_chat": base_chat, "tuned_chat": tuned_chat, "prompt": prompt,
            "send": send, "stop": stop, "expected": expected, "clear": clear, "examples": examples, "max_new_tokens": max_new,
            "temperature": temperature, "top_p": top_p, "seed": seed, "arena": arena, "compare": compare,
            "turn": turn, **feedback}


def _wire_feedback(store: FeedbackStore | None, feedback: dict[str, Any], turn: Any, base_chat: Any,
                   tuned_chat: Any) -> None:
    feedback["submit"].click(
        bind(submit_feedback, store),
        [turn, feedback["vote"], feedback["comment"], feedback["correction"], feedback["target"]],
        [feedback["status"], base_chat, tuned_chat, feedback["comment"], feedback["correction"], turn],
        api_name="submit_feedback")
    for side, chatbot in zip(SIDES, (base_chat, tuned_chat)):
        chatbot.like(bind(like_answer, store, side), turn, None, api_name=f"like_{side}")
