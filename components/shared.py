"""The UI parts every tab shares (not a tab: tabs import this, never each other): the progress bar of a training
run, plot frames for live curves, the config-problem list, picking the run to watch, Stop, event-handler binding,
number checks, refusals and what a visitor may see. Downloads are components/downloads.py's,
the LoRA aid components/lora_aid.py's.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import gradio as gr
import pandas as pd

from finetune.core.access import LOCAL, AccessDenied, Visitor, not_yours, sign_in_mode, visitor_from_session
from finetune.core.config import ConfigError
from finetune.core.data import DataError, hub_configs, hub_splits
from finetune.core.metrics import is_summary
from finetune.core.paths import for_visitors, hub_dataset
from finetune.services.admission import RunError
from finetune.services.compare import CompareError, CompareQueue
from finetune.services.runs import RunManager

LIVE_STATES = ("running", "queued", "waiting")  # waiting: in the job queue, not started yet
logger = logging.getLogger("lora_lab")


# --- page loads and handlers -----------------------------------------------------------------------------------

# How often gradio's queue looks for new events and for progress to send when it has none. Its own intervals on
# Linux (1 ms and 10 ms) kept an idle app at ~5% of a core (measured: 1.46 CPU-s per idle 30 s; 0.43 s with these):
# a learner's laptop fan, a Space's CPU. An event now waits at most 20 ms more to start.
QUEUE_IDLE_SECONDS, PROGRESS_IDLE_SECONDS = 0.02, 0.05


def calm_queue(page: gr.Blocks) -> gr.Blocks:
    """Set the queue's idle polling intervals (after ``page.queue()``, which makes a new queue). No public setting
    exists for either: where a gradio release renamed them, the app says so and keeps gradio's own."""
    queue = page._queue
    if not all(hasattr(queue, name) for name in ("sleep_when_free", "progress_update_sleep_when_free")):
        logger.warning("gradio's queue has no idle intervals to set: an idle app polls at gradio's own pace")
        return page
    queue.sleep_when_free, queue.progress_update_sleep_when_free = QUEUE_IDLE_SECONDS, PROGRESS_IDLE_SECONDS
    return page


def timers_in(block: gr.blocks.Block) -> list[gr.Timer]:
    """The ``gr.Timer`` components built inside ``block`` (a tab), at any depth."""
    if isinstance(block, gr.Timer):
        return [block]
    return [timer for child in getattr(block, "children", []) for timer in timers_in(child)]


def tick_only_on_the_open_tab(tabs: list[Any]) -> None:
    """Each tab's timers tick only while that tab is open.

    Each tick of a timer is an event the browser handles for every output of the poll (gradio's frontend looks each
    output up in the whole component tree, twice), and a tab's timer, once the tab was opened, kept ticking after
    the visitor left it. Selecting any tab now runs ``timer_switch_js`` in the browser. It reads which tab is open
    instead of trusting the event that called it: a page fires its first tab's select as it loads, and that event
    could run after a quick click on another tab (seen twice on a busy machine: the other tab's timer ended off).
    The timers start on: a tab not opened yet is not rendered and does not tick."""
    owners = [(tab.label, timer) for tab in tabs for timer in timers_in(tab)]
    switch = timer_switch_js([label for label, _ in owners])
    for tab in tabs:
        tab.select(None, None, [timer for _, timer in owners], js=switch, api_visibility="private", queue=False,
                   show_progress="hidden")


def timer_switch_js(owners: list[str]) -> str:
    """A browser-side handler whose outputs (the timers, each named by its tab's label) are updates of their
    ``active`` property: on for the open tab's, off for the others; all on where no tab reads as open (a narrow
    window puts the last tabs in an overflow menu). It waits a turn of the event loop for the tab bar to show the
    click."""
    return ("async () => { await new Promise(done => setTimeout(done, 0)); "
            "const open = [...document.querySelectorAll('[role=\"tab\"][aria-selected=\"true\"]')]"
            ".map(tab => tab.innerText.trim()); "
            f"return {json.dumps(owners)}"
            ".map(tab => ({__type__: 'update', active: !open.length || open.includes(tab)})); }")


def bind(handler: Callable[..., Any], *bound: Any) -> Callable[..., Any]:
    """``functools.partial`` for event handlers that keeps the type hints gradio reads (gr.Request, gr.LikeData),
    which a plain partial hides (gradio then hands None for the request); generators stay generators, so
    streaming still streams."""
    if inspect.isgeneratorfunction(handler):
        def call(*args: Any, **kwargs: Any) -> Any:
            yield from handler(*bound, *args, **kwargs)
    else:
        def call(*args: Any, **kwargs: Any) -> Any:
            return handler(*bound, *args, **kwargs)
    functools.update_wrapper(call, handler)
    parameters = list(inspect.signature(handler).parameters.values())[len(bound):]
    call.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    return call


# --- who is asking --------------------------------------------------------------------------------------------

def visitor_of(request: gr.Request | None) -> Visitor:
    """The visitor behind a request: from the session entry that Hugging Face's sign-in (or the dev stand-in)
    leaves; the local user, with every right, where sign-in is off."""
    if sign_in_mode() == "off":
        return LOCAL
    underlying = getattr(request, "request", None) or request
    scope = getattr(underlying, "scope", None)
    session = scope.get("session") or {} if isinstance(scope, dict) else getattr(underlying, "session", None) or {}
    return visitor_from_session(session.get("oauth_info"))


def who_markdown(request: gr.Request) -> str:
    """The line under the title that says who you are signed in as, and what that lets you do."""
    visitor = visitor_of(request)
    if not visitor.sign_in:
        return ""
    if visitor.name is None:
        sign_in = ("the **Sign in with Hugging Face** button" if sign_in_mode() == "huggingface"
                   else "`/dev-sign-in?user=NAME` (dev sign-in)")
        return f"Not signed in: you can look around; sign in with {sign_in} to train, chat with feedback and export."
    role = "operator: you see and manage every run" if visitor.operator else "you see and manage your own runs"
    return f"Signed in as **{visitor.name}** ({role})."


# --- the progress bar of a training run ------------------------------------------------------------------------
# One reading of status.json, so SFT, reward, DPO, KTO and GRPO runs all say the same things: state, step, the
# measured ETA, and "evaluating" while an evaluation runs.

BAR_COLOURS = {"failed": "#dc2626", "stopped": "#d97706", "interrupted": "#d97706", "stalled": "#d97706",
               "stopping": "#d97706"}
EVALUATING_COLOUR = "#0d9488"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def evaluation_left(status: dict[str, Any], now: float | None = None) -> float | None:
    """Seconds left of the evaluation running now, from its own pace: elapsed / batches done x batches left
    (None before its first batch). A walk saw "ETA 0s" for the 170 s of a first, not yet timed evaluation."""
    batch, batches, started = status.get("eval_batch"), status.get("eval_batches"), status.get("eval_started_at")
    if status.get("phase") != "evaluating" or not batch or not batches or not isinstance(started, (int, float)):
        return None
    elapsed = max((time.time() if now is None else now) - started, 0.0)
    return elapsed / batch * max(batches - batch, 0)


def eta_text(status: dict[str, Any], now: float | None = None) -> str:
    """The ETA and what it is made of. Before the first evaluation has been timed its duration is unknown, and
    the text says so rather than guessing it from the training steps (an evaluation can cost many steps)."""
    if status.get("state") != "running":
        return "ETA –"
    text = f"ETA {duration(status.get('eta_seconds'))}"
    untimed, left = int(status.get("evals_untimed") or 0), int(status.get("evals_left") or 0)
    running_left = evaluation_left(status, now)
    if untimed and running_left is not None:  # the first evaluation, running now, is paced by its own batches
        eta = (status.get("eta_seconds") or 0.0) + running_left
        more = f" + {_plural(untimed - 1, 'evaluation')} not yet timed" if untimed > 1 else ""
        return f"ETA {duration(eta)} (this evaluation paced by its batches){more}"
    if untimed:
        return f"{text} + {_plural(untimed, 'evaluation')} not yet timed"
    if left and status.get("seconds_per_eval") is not None:
        return f"{text} (incl. {_plural(left, 'evaluation')} × {duration(status['seconds_per_eval'])})"
    return text


ORDINALS = {1: "1st", 2: "2nd", 3: "3rd"}


def place_in_line(ahead: int) -> str:
    """"2nd in line" for a job with one job ahead of it: the job on the device counts as the first in line, for a
    waiting training run and a waiting benchmark alike."""
    return f"{ORDINALS.get(ahead + 1, f'{ahead + 1}th')} in line"


def queue_place(status: dict[str, Any]) -> str:
    """A waiting job's place, "2nd in line · starts in about 3m 10s" (the run manager's queue_info merged into its
    status)."""
    starts_in, ahead = status.get("starts_in"), len(status.get("ahead") or [])
    jobs_ahead = "the job ahead finishes" if ahead == 1 else f"the {ahead} jobs ahead finish"
    when = (f"starts in about {duration(starts_in)}" if isinstance(starts_in, (int, float)) else
            f"starts when {jobs_ahead} (no time estimate yet)" if ahead else "starting")
    return f"{place_in_line(ahead)} · {when}" if status.get("position") else when


def queue_text(status: dict[str, Any]) -> str:
    return f"<b>waiting</b> in the queue · {queue_place(status)}"


def phase_text(status: dict[str, Any]) -> str:
    if status.get("state") == "running" and status.get("phase") == "initialising":
        return f" · <b>{status.get('phase_note') or 'initialising the adapter'}</b>"
    if status.get("state") != "running" or status.get("phase") != "evaluating":
        return ""
    batch, batches = status.get("eval_batch"), status.get("eval_batches")
    where = f" batch {batch}/{batches}" if batch and batches else ""
    return f" · <b>evaluating</b>{where}"


def shown_status(status: dict[str, Any]) -> dict[str, Any]:
    """A live run that was asked to stop, or that shows no progress (the run manager adds ``stop_requested_at``
    and ``stalled_seconds``), reads "stopping" or "stalled" on the bar, not "running" with a frozen ETA."""
    if status.get("state") not in ("running", "queued"):
        return status
    if status.get("stop_requested_at"):
        return {**status, "state": "stopping"}
    if status.get("stalled_seconds") is not None:
        return {**status, "state": "stalled"}
    return status


def progress_html(elem: str, status: dict[str, Any], rows: list[dict[str, Any]],
                  colour: str = "#2563eb") -> str:
    """The bar and its line of text. data-* attributes let a browser test wait on a state, not on time."""
    status = shown_status(status)
    step, total = int(status.get("step") or 0), int(status.get("max_steps") or 0)
    state = status.get("state", "idle")
    phase = status.get("phase", "") if state == "running" else ""
    percent = 100.0 if state == "completed" else (100.0 * step / total if total else 0.0)
    last = next((r for r in reversed(rows) if "tokens_per_second" in r), {})
    speed = f" · {last['tokens_per_second']} tokens/s" if last else ""
    text = (queue_text(status) if state == "waiting" else
            "<b>starting</b> · loading the model and data (nothing is ahead of it)" if state == "queued" else
            f"<b>{state}</b>{phase_text(status)} · step {step}/{total or '?'} · {percent:.0f}% · "
            f"{eta_text(status)}{speed}")
    fill = EVALUATING_COLOUR if phase == "evaluating" else BAR_COLOURS.get(state, colour)
    points = sum(isinstance(r.get("loss"), (int, float)) for r in rows)
    return (f"<div id='{elem}' data-state='{state}' data-phase='{phase}' data-points='{points}'>{text}"
            f"<div style='background:#e5e7eb;border-radius:6px;height:12px;margin-top:6px'>"
            f"<div style='width:{percent:.1f}%;background:{fill};height:12px;border-radius:6px'></div></div></div>")


# --- plot frames -----------------------------------------------------------------------------------------------
# gradio 6.31's LinePlot fixes its colour domain (the series names) when it first gets data and only swaps the
# data afterwards, so a series that appears later is never drawn. So: every series of a chart gets at least a
# blank point from the first frame on, an empty chart gets None (not an empty frame), and a chart whose series
# change (runs compared) is sent None first, which makes the browser rebuild it.

def lone_points_as_dashes(points: list[tuple[Any, Any, str]]) -> list[tuple[Any, Any, str]]:
    """gradio's LinePlot draws lines only (its point marks show on hover), so a series with a single point, such
    as the eval loss after its first evaluation, would be invisible: draw it as a short level dash around its
    step instead."""
    counts: dict[str, int] = {}
    for _, value, series in points:
        counts[series] = counts.get(series, 0) + (value is not None)
    drawn = []
    for step, value, series in points:
        if value is not None and counts[series] == 1:
            drawn += [(step - 0.3, value, series), (step + 0.3, value, series)]
        else:
            drawn.append((step, value, series))
    return drawn


def points_frame(points: list[tuple[Any, ...]], columns: list[str], step_type: type = int) -> pd.DataFrame | None:
    """(step, value[, series]) points as a frame; None rather than an empty frame."""
    if not points:
        return None
    return pd.DataFrame(points, columns=columns).astype({"step": step_type, columns[1]: float})


def series_frame(rows: list[dict[str, Any]], series: tuple[tuple[str, str], ...], y: str) -> pd.DataFrame | None:
    """metrics.jsonl rows in long format (step, y, series) for one LinePlot with a colour per series: every series
    present from the first frame (a blank point), a series with one point drawn as a short dash."""
    points = [(r["step"], r[key], label) for r in rows if not is_summary(r) for key, label in series
              if isinstance(r.get(key), (int, float))]
    if not points:
        return None
    present = {label for _, _, label in points}
    points += [(points[0][0], None, label) for _, label in series if label not in present]
    return points_frame(lone_points_as_dashes(points), ["step", y, "series"], step_type=float)


# --- forms and runs --------------------------------------------------------------------------------------------

def problems_markdown(error: ConfigError) -> str:
    """Every problem of a form at once: a toast per field and the list under the Start button."""
    for name, message in error.problems.items():
        gr.Warning(f"{name}: {message}")
    return "**Please fix the form:**\n" + "\n".join(f"- `{n}`: {m}" for n, m in error.problems.items())


def watched_run(manager: RunManager, ids: list[str], current: str | None, visitor: Visitor = LOCAL) -> str:
    """The run a live view shows: the visitor's own live run first (so a reloaded page re-attaches to their
    training or queued job), else another live one they may see, else the one picked, else the newest."""
    live = [run_id for run_id in ids if manager.status(run_id).get("state") in LIVE_STATES]
    mine = [run_id for run_id in live if visitor.sign_in and manager.owner_of(run_id) == visitor.owner]
    if current in mine or (current in live and not mine):
        return current
    if mine or live:
        return (mine or live)[0]
    return current if current in ids else (ids[0] if ids else "")


def live_status(manager: RunManager, run_id: str) -> dict[str, Any]:
    """A run's status for a live view; a job waiting in the queue also gets its position and expected start."""
    status = manager.status(run_id)
    return {**status, **manager.queue_info(run_id)} if status.get("state") == "waiting" else status


def started_message(manager: RunManager, run_id: str, what: str = "run") -> str:
    """What Start says: started now, or queued behind other jobs with its place and expected start."""
    info = manager.queue_info(run_id)
    if not info:
        return f"Started {what} `{run_id}`; loading the model and data…"
    return (f"Queued {what} `{run_id}`: the device is busy, so it waits in the queue ({queue_place(info)}). It "
            "starts by itself (also after an app restart); Stop takes it out of the queue.")


def stop_run(manager: RunManager, run_id: str, request: gr.Request = None) -> str:
    """The cooperative stop every training tab offers: STOP file, then the process is ended if it does not answer.
    A job still waiting in the queue is taken out of it. Only the run's owner (or an operator) may stop it."""
    visitor = visitor_of(request)
    if not run_id:
        return "No run to stop."
    try:
        manager.require_can_act(run_id, visitor, "stop this run")  # first: a state is news about what exists
        state = manager.status(run_id).get("state")
        if state not in LIVE_STATES:
            return f"Run `{run_id}` is not running ({state})."
        after = manager.request_stop(run_id, visitor)
    except (RunError, AccessDenied) as error:
        return f"**Error:** {error}"
    if state == "waiting":
        gr.Info("Cancelled: the job left the queue before it started.")
        if after.get("state") == "stopped":  # a waiting resume: the run keeps what it trained before
            return (f"`{run_id}`'s resume was cancelled while it waited in the queue; it stays stopped and can be "
                    "resumed again.")
        return f"`{run_id}` was cancelled while it waited in the queue; nothing was trained."
    gr.Info("Stopping after the current step; a checkpoint is saved.")
    return (f"Stop requested for `{run_id}`: it saves a checkpoint and stops after the current step; if it has not "
            f"stopped within {manager.stop_grace:g} s, its process is ended (resume then continues from its last "
            "complete checkpoint).")


def check_number_inputs(demo: gr.Blocks) -> None:
    """Every number box and slider of the app refuses what is not a finite number (NaN, ±inf, text, a list: an API
    client can send any JSON) with the field named, before gradio's own rounding fails with a bare error; its
    range refusal names the field too."""
    for block in demo.blocks.values():
        if isinstance(block, (gr.Number, gr.Slider)):
            block.preprocess = _checked_number(block, block.preprocess)


def _checked_number(block: Any, preprocess: Any) -> Any:
    name = block.label or block.elem_id or "a number field"

    def checked(payload: Any) -> Any:
        if payload is None:
            return preprocess(payload)
        if isinstance(payload, str):
            try:
                payload = float(payload)
            except ValueError:
                raise refusal(f"{name}: type a number, got {payload[:40]!r}.") from None
        if isinstance(payload, bool) or not isinstance(payload, (int, float)) or not math.isfinite(payload):
            raise refusal(f"{name}: type a finite number, got {str(payload)[:40]!r}.")
        try:
            return preprocess(payload)
        except gr.Error as error:  # gradio's "Value 9 is greater than maximum value 5."
            raise refusal(f"{name}: {error.message}") from None
        except (ValueError, OverflowError, TypeError):
            raise refusal(f"{name}: type a number, got {str(payload)[:40]!r}.") from None
    return checked


# The heavy read-only handlers get slots of their own (gradio concurrency ids), apart from each other and from the
# queue's other events: a visitor's data preview or estimate can wait only behind another preview or estimate, and
# each of those reads a bounded sample (finetune.core.data_sources.SAMPLE_BYTES), so the wait is short. Chat has its own slot:
# up to 4 answers at once, which take turns on the one model in slices (finetune.services.chat), so a short question is
# answered while a long answer runs; a fifth visitor waits in gradio's queue and sees their place.
PREVIEW_SLOT: dict[str, Any] = {"concurrency_limit": 2, "concurrency_id": "data-preview"}
ESTIMATE_SLOT: dict[str, Any] = {"concurrency_limit": 2, "concurrency_id": "estimate"}
CHAT_SLOT: dict[str, Any] = {"concurrency_limit": 4, "concurrency_id": "chat-answers"}


def stop_queue(queue: CompareQueue, waiting: str, queue_id: str, request: gr.Request = None) -> str:
    """Stop a comparison or a sweep: the run training now saves a checkpoint, the ``waiting`` ones are skipped."""
    noun, visitor = queue.NOUN, visitor_of(request)
    if not queue_id:
        return f"No {noun.lower()} to stop."
    try:
        queue.require_can_act(queue_id, visitor, f"stop this {noun.lower()}")  # first: its state is news
        state = queue.load(queue_id)
        if state["state"] != "running":
            return f"{noun} `{queue_id}` is not running ({state['state']})."
        queue.stop(queue_id, visitor)
    except (CompareError, AccessDenied) as error:
        return f"**Error:** {error}"
    gr.Info(f"Stopping: the current run saves a checkpoint; the {waiting} still waiting are skipped.")
    return f"Stop requested for `{queue_id}`."


# --- refusals --------------------------------------------------------------------------------------------------

def refusal(message: str) -> gr.Error:
    """An expected "no" for the user (bad input, nothing to act on yet): the message in the UI and one line in the
    app log, not a traceback (gradio prints one for every gr.Error by default). Failures the operator must debug
    stay plain gr.Error."""
    logger.warning("refused: %s", message.splitlines()[0] if message else "")
    return gr.Error(message, print_exception=False)


# --- Hub datasets (the Train and RLHF tabs) ----------------------------------------------------------------------

def list_hub_options(name: str, config: str | None) -> tuple[Any, Any, str]:
    """Fill a tab's config and split pickers from the Hub (or an allowed local folder laid out as a Hub dataset
    repository); offline, one message and the form as it was."""
    try:
        name = hub_dataset(name)
        if not name:
            return gr.skip(), gr.skip(), "Type a Hub dataset name first, e.g. tatsu-lab/alpaca."
        configs = hub_configs(name)
        chosen = config if config in configs else (configs[0] if configs else "")
        splits = hub_splits(name, chosen or None)
    except ConfigError as error:  # the path gate: one message for every refused name
        return gr.skip(), gr.skip(), "; ".join(error.problems.values())
    except DataError as error:
        return gr.skip(), gr.skip(), f"**Cannot list:** {for_visitors(str(error))}"
    split = "train" if "train" in splits else (splits[0] if splits else "train")
    return (gr.Dropdown(choices=configs, value=chosen), gr.Dropdown(choices=splits, value=split),
            f"{len(configs)} config(s): {', '.join(configs)} · splits of `{chosen}`: {', '.join(splits)}")


# --- what a visitor may see (the tabs beyond Train) ---------------------------------------------------------------

def visible_adapters(manager: RunManager, visitor: Visitor) -> dict[str, Path]:
    """run id -> adapter folder of the finished runs ``visitor`` may see (all of them where sign-in is off)."""
    visible = set(manager.visible_ids(visitor))
    return {run_id: folder for run_id, folder in manager.finished_adapters().items() if run_id in visible}


def visible_reward_models(manager: RunManager, visitor: Visitor) -> dict[str, Path]:
    visible = set(manager.visible_ids(visitor))
    return {run_id: folder for run_id, folder in manager.reward_models().items() if run_id in visible}


def require_visible(manager: RunManager, run_id: str | None, visitor: Visitor, what: str) -> None:
    """AccessDenied when ``visitor`` may not see run ``run_id`` (an API call naming someone else's run); a run that
    does not exist reads the same, so names cannot be probed. Nothing is checked for the operators."""
    if run_id and not visitor.operator and not manager.can_see(run_id, visitor):
        raise AccessDenied(not_yours(what, f"run {run_id}"))


def feedback_owner(visitor: Visitor) -> str | None:
    """Whose feedback ``visitor`` reads and exports: everyone's (None) for an operator or the local user, else
    their own. A visitor who has not signed in owns none: '' matches no stored user."""
    return None if visitor.operator else (visitor.name or "")
