"""The progress bar every training tab shows (Train, RLHF): one reading of status.json, so SFT, reward, DPO, KTO
and GRPO runs all say the same things: state, step, the measured ETA, and "evaluating" while an evaluation runs.
Also how their live curves draw a series that has a single point so far.

Not a tab: a shared UI part that tabs import (no tab imports another tab).
"""

from __future__ import annotations

from typing import Any

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


def eta_text(status: dict[str, Any]) -> str:
    """The ETA and what it is made of. Before the first evaluation has been timed its duration is unknown, and
    the text says so rather than guessing it from the training steps (an evaluation can cost many steps)."""
    if status.get("state") != "running":
        return "ETA –"
    text = f"ETA {duration(status.get('eta_seconds'))}"
    untimed, left = int(status.get("evals_untimed") or 0), int(status.get("evals_left") or 0)
    if untimed:
        return f"{text} + {_plural(untimed, 'evaluation')} not yet timed"
    if left and status.get("seconds_per_eval") is not None:
        return f"{text} (incl. {_plural(left, 'evaluation')} × {duration(status['seconds_per_eval'])})"
    return text


def phase_text(status: dict[str, Any]) -> str:
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
    text = (f"<b>{state}</b>{phase_text(status)} · step {step}/{total or '?'} · {percent:.0f}% · "
            f"{eta_text(status)}{speed}")
    fill = EVALUATING_COLOUR if phase == "evaluating" else BAR_COLOURS.get(state, colour)
    points = sum(isinstance(r.get("loss"), (int, float)) for r in rows)
    return (f"<div id='{elem}' data-state='{state}' data-phase='{phase}' data-points='{points}'>{text}"
            f"<div style='background:#e5e7eb;border-radius:6px;height:12px;margin-top:6px'>"
            f"<div style='width:{percent:.1f}%;background:{fill};height:12px;border-radius:6px'></div></div></div>")


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
