"""The Compare tab: PEFT vs LoRA vs QLoRA, measured on the learner's own data and hardware.

One button queues the same dataset, seed and step budget for the chosen techniques (finetune/services/compare.py); they
train one after another as normal runs (they also appear in the Train tab's history). A ``gr.Timer`` reads the
queue file and the run folders, so a reloaded page re-attaches to a comparison in progress. Beside the measured
table sit the course's qualitative rows, so the words and the numbers are seen together.
"""

from __future__ import annotations

import math
from typing import Any

import gradio as gr
import pandas as pd

from components.page_loads import on_page_load
from components.shared import bind, duration, stop_queue, visitor_of
from finetune.core.access import AccessDenied
from finetune.core.config import BUNDLED_DATASET, EMBEDDED_MODEL, ConfigError
from finetune.services.admission import RunError
from finetune.services.compare import (DEFAULT_TECHNIQUES, QUALITATIVE, QUALITATIVE_COLUMNS, RESULT_COLUMNS, TECHNIQUES,
                                       CompareError, CompareQueue, CompareRequest, base_config, expected_seconds,
                                       loss_points, progress, results, seconds_left, validate_request)

POLL_SECONDS = 2.0
# The order of start_comparison's parameters.
START_INPUTS = ("techniques", "model_source", "data_source", "max_steps", "max_seq_length", "batch_size",
                "max_samples", "learning_rate", "seed", "sample_prompt")


# --- views of a comparison ---------------------------------------------------------------------------------

def results_frame(queue: CompareQueue, state: dict[str, Any] | None) -> pd.DataFrame:
    rows = results(queue.manager, state) if state else []
    return pd.DataFrame([[row[c] for c in RESULT_COLUMNS] for row in rows], columns=RESULT_COLUMNS)


def techniques_loss_frame(queue: CompareQueue, state: dict[str, Any] | None) -> pd.DataFrame | None:
    """Training loss of every technique in one long frame (None, not an empty frame: see train_tab's notes on
    gradio 6.31's LinePlot colour domain)."""
    points = loss_points(queue.manager, state) if state else []
    if not points:
        return None
    return pd.DataFrame(points, columns=["step", "loss", "technique"]).astype({"step": int, "loss": float})


def scatter_frame(table: pd.DataFrame) -> pd.DataFrame | None:
    """Peak memory vs validation loss, one point per technique that has both numbers."""
    frame = pd.DataFrame({"peak_memory_mb": pd.to_numeric(table["peak memory (MB)"], errors="coerce"),
                          "val_loss": pd.to_numeric(table["val loss"], errors="coerce"),
                          "technique": table["technique"]}).dropna()
    return None if frame.empty else frame.reset_index(drop=True)


def scatter_key(frame: pd.DataFrame | None) -> str:
    return "" if frame is None else "|".join(frame["technique"])


def comparison_progress_html(state: dict[str, Any] | None, queue: CompareQueue) -> str:
    if not state:
        return "<div id='compare-progress' data-state='idle' data-done='0'>No comparison yet.</div>"
    done, total, fraction = progress(state, queue.manager)
    current = next((i for i in state["items"] if i["state"] == "running"), None)
    label = TECHNIQUES[current["technique"]].label if current and current["technique"] in TECHNIQUES else ""
    text = (f"<b>{state['state']}</b> · {done}/{total} techniques done · {100 * fraction:.0f}%"
            + (f" · training <b>{label}</b>" if label else "") + _left_text(state, queue))
    return (f"<div id='compare-progress' data-state='{state['state']}' data-done='{done}'>{text}"
            f"<div style='background:#e5e7eb;border-radius:6px;height:12px;margin-top:6px'>"
            f"<div style='width:{100 * fraction:.1f}%;background:#2563eb;height:12px;border-radius:6px'></div>"
            f"</div></div>")


def _left_text(state: dict[str, Any], queue: CompareQueue) -> str:
    """The time left, re-measured on every poll from this comparison's own steps."""
    if state.get("state") != "running":
        return ""
    left, pace = seconds_left(state, queue.manager)
    if left is None:
        return " · time left: not measured yet (the first steps measure it)"
    return f" · about {duration(left)} left" + (f" at {pace:.1f} s per step, measured in this comparison" if pace
                                                 else "")


def ordering_notes(table: pd.DataFrame) -> str:
    """Plain-language reading of the finished rows: who trains fewest parameters, who needs least memory."""
    done = table[table["state"] == "completed"]
    notes = []
    for column, what in (("trainable params", "trainable parameters"), ("peak memory (MB)", "peak memory"),
                         ("val loss", "validation loss")):
        values = done[["technique", column]].dropna()
        if len(values) >= 2:
            ordered = values.sort_values(column)
            notes.append(f"**{what}** (low → high): " + " < ".join(
                f"{t} ({_fmt(v)})" for t, v in zip(ordered["technique"], ordered[column])))
    return "  \n".join(notes)


def _fmt(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() else f"{value:.3g}"


# --- handlers ------------------------------------------------------------------------------------------------

def start_comparison(queue: CompareQueue, techniques: list[str], model_source: str, data_source: str,
                     max_steps: float, max_seq_length: float, batch_size: float, max_samples: float,
                     learning_rate: float, seed: float, sample_prompt: str, request: gr.Request = None
                     ) -> tuple[Any, ...]:
    """Queue the chosen techniques; returns (comparison id, message, loss plot, scatter) with the plots reset."""
    wanted = _request(techniques, model_source, data_source, max_steps, max_seq_length, batch_size, max_samples,
                      learning_rate, seed, sample_prompt)
    try:
        comparison_id = queue.start(wanted, visitor_of(request))
    except ConfigError as error:
        for name, message in error.problems.items():
            gr.Warning(f"{name}: {message}")
        return gr.skip(), "**Not started:** " + "; ".join(f"`{n}`: {m}" for n, m in error.problems.items()), \
            gr.skip(), gr.skip()
    except (CompareError, RunError, AccessDenied) as error:  # signed out, over a limit, the disk full
        gr.Warning(str(error))
        return gr.skip(), f"**Not started:** {error}", gr.skip(), gr.skip()
    names = ", ".join(TECHNIQUES[t].label for t in dict.fromkeys(wanted.techniques))
    return comparison_id, f"Started comparison `{comparison_id}`: {names}. {estimate_text(queue, wanted)}", None, None


def _request(techniques: list[str], model_source: str, data_source: str, max_steps: float, max_seq_length: float,
             batch_size: float, max_samples: float, learning_rate: float, seed: float, sample_prompt: str
             ) -> CompareRequest:
    return CompareRequest(techniques=list(techniques or []), model_source=model_source or "",
                          data_source=data_source or "", max_steps=_int(max_steps),
                          max_seq_length=_int(max_seq_length), batch_size=_int(batch_size),
                          max_samples=_int(max_samples) or None, learning_rate=learning_rate, seed=_int(seed),
                          sample_prompt=sample_prompt or "")


def estimate_before_start(queue: CompareQueue, techniques: list[str], model_source: str, data_source: str,
                          max_steps: float, max_seq_length: float, batch_size: float, max_samples: float,
                          learning_rate: float, seed: float, sample_prompt: str) -> str:
    """The form's expected time, shown before Start (a walk found the tab silent about it until a comparison ran)."""
    wanted = _request(techniques, model_source, data_source, max_steps, max_seq_length, batch_size, max_samples,
                      learning_rate, seed, sample_prompt)
    if not wanted.techniques:
        return "Tick at least one technique to see how long the comparison should take."
    return estimate_text(queue, wanted) or "No time estimate for these settings: Start names what is wrong."


def estimate_text(queue: CompareQueue, wanted: CompareRequest) -> str:
    """Before the wait: how long the techniques should take here, or that nothing measured yet can say."""
    try:
        seconds = expected_seconds(validate_request(wanted), queue.manager)
    except (ConfigError, CompareError):
        return ""
    if seconds is None:
        return ("No time estimate yet: no run of this model and bit width has completed on this machine; the "
                "progress line gives one once the first steps are measured.")
    return (f"Expected to take about **{duration(seconds)}** here (each technique's steps at the seconds per step "
            "this machine's completed runs of this model took; re-measured while it runs).")


def _int(value: Any) -> Any:
    """gr.Number gives floats; pass integral ones on as ints and anything else as it is (validation reports it)."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return value


def poll_comparison(queue: CompareQueue, comparison_id: str, shown: str = "", request: gr.Request = None
                    ) -> tuple[Any, ...]:
    """(id, status, progress, table, notes, loss plot, scatter reset, scatter key) for the running comparison,
    else the given one. The scatter is only reset (None) when its set of points changes; show_scatter then
    draws it: gradio 6.31's plots keep the colour domain and scales of their first data (see train_tab)."""
    comparison_id, state = queue.watched(comparison_id, visitor_of(request))  # theirs, or one they may see
    table = results_frame(queue, state)
    status = f"Comparison `{comparison_id}`: **{state['state']}**" if state else "No comparison yet."
    if state and state.get("error"):
        status += f" ({state['error']})"
    key = f"{comparison_id}:{scatter_key(scatter_frame(table))}"
    return (comparison_id, status, comparison_progress_html(state, queue), table, ordering_notes(table),
            techniques_loss_frame(queue, state), None if key != shown else gr.skip(), key)


def show_scatter(queue: CompareQueue, comparison_id: str, request: gr.Request = None) -> pd.DataFrame | None:
    """The memory vs validation-loss points of the comparison's finished techniques (one the visitor may see)."""
    try:
        visible = comparison_id in queue.visible_ids(visitor_of(request))
        state = queue.load(comparison_id) if comparison_id and visible else None
    except CompareError:
        state = None
    return scatter_frame(results_frame(queue, state))


# --- layout --------------------------------------------------------------------------------------------------

def _form(defaults: CompareRequest) -> dict[str, Any]:
    form: dict[str, Any] = {}
    form["techniques"] = gr.CheckboxGroup([(t.label, key) for key, t in TECHNIQUES.items()],
                                          value=list(DEFAULT_TECHNIQUES), label="Techniques to compare",
                                          info="Each one becomes a normal run, trained one after another.",
                                          elem_id="compare-techniques")
    with gr.Row():
        form["model_source"] = gr.Textbox(EMBEDDED_MODEL, label="Model", elem_id="compare-model",
                                          info="The embedded model, a Hub id or a local folder (same for all).")
        form["data_source"] = gr.Textbox(BUNDLED_DATASET, label="Dataset", elem_id="compare-data",
                                         info="Bundled name, Hub dataset or file path (same for all).")
        form["sample_prompt"] = gr.Textbox(defaults.sample_prompt, label="Sample prompt", elem_id="compare-prompt",
                                           info="Every technique answers it greedily after training.")
    with gr.Row():
        form["max_steps"] = gr.Number(defaults.max_steps, label="Steps per technique", precision=0,
                                      elem_id="compare-steps")
        form["max_seq_length"] = gr.Number(defaults.max_seq_length, label="Max sequence length", precision=0,
                                           elem_id="compare-seq")
        form["batch_size"] = gr.Number(defaults.batch_size, label="Batch size", precision=0)
        form["max_samples"] = gr.Number(defaults.max_samples, label="Max samples (0 = all)", precision=0,
                                        elem_id="compare-samples")
        form["learning_rate"] = gr.Number(defaults.learning_rate, label="LoRA learning rate",
                                          info="Full fine-tuning uses 0.1x, IA3 10x, prompt tuning 20x.",
                                          elem_id="compare-lr")
        form["seed"] = gr.Number(defaults.seed, label="Seed", precision=0)
    return form


def _defaults() -> CompareRequest:
    request = CompareRequest()
    try:  # the preset's step budget and sizes, when it is valid
        cfg = base_config(request)
        request.max_steps, request.max_seq_length = cfg.training.max_steps, cfg.data.max_seq_length
        request.batch_size, request.max_samples = cfg.training.batch_size, cfg.data.max_samples
        request.learning_rate, request.seed = cfg.training.learning_rate, cfg.training.seed
    except ConfigError:
        pass
    return request


def build_compare_tab(queue: CompareQueue) -> dict[str, Any]:
    """Lay out the tab and wire its handlers; returns its components by name."""
    gr.Markdown("Train the same data, seed and step budget with several techniques and compare what each "
                "costs and gives: trainable parameters, memory, speed, adapter size, losses and a sample answer.")
    form = _form(_defaults())
    with gr.Row():
        start = gr.Button("Run comparison", variant="primary", elem_id="compare-start")
        stop = gr.Button("Stop comparison", variant="stop", elem_id="compare-stop")
    view: dict[str, Any] = {"estimate": gr.Markdown(elem_id="compare-estimate")}
    view["comparison"] = gr.Textbox(label="Watching comparison", interactive=False, elem_id="compare-id")
    view["message"] = gr.Markdown(elem_id="compare-message")  # what Start / Stop said; the timer leaves it
    view["status"] = gr.Markdown(elem_id="compare-status")
    view["progress"] = gr.HTML(comparison_progress_html(None, queue))
    # The sample answer wraps; the number columns get room for their headers (else one letter per line).
    widths = {"technique": "170px", "state": "110px", "sample answer": "320px", "run id": "220px"}
    view["table"] = gr.Dataframe(pd.DataFrame(columns=RESULT_COLUMNS), interactive=False, wrap=True,
                                 label="Measured", elem_id="compare-table",
                                 column_widths=[widths.get(name, "110px") for name in RESULT_COLUMNS])
    view["notes"] = gr.Markdown(elem_id="compare-notes")
    with gr.Row():
        view["loss_plot"] = gr.LinePlot(None, x="step", y="loss", color="technique", title="Training loss",
                                        elem_id="compare-loss-plot", height=300)
        view["scatter"] = gr.ScatterPlot(None, x="peak_memory_mb", y="val_loss", color="technique",
                                         title="Peak memory (MB) vs validation loss", elem_id="compare-scatter",
                                         height=300)
    view["qualitative"] = gr.Dataframe(pd.DataFrame(QUALITATIVE, columns=QUALITATIVE_COLUMNS), interactive=False,
                                       wrap=True, label="In words", elem_id="compare-words")
    _wire(queue, form, start, stop, view)
    return {**form, "start": start, "stop": stop, **view}


def _wire(queue: CompareQueue, form: dict[str, Any], start: Any, stop: Any, view: dict[str, Any]) -> None:
    start.click(bind(start_comparison, queue), [form[k] for k in START_INPUTS],
                [view["comparison"], view["message"], view["loss_plot"], view["scatter"]], api_name="compare_start",
                concurrency_limit=1, concurrency_id="train-start")
    stop.click(bind(stop_queue, queue, "techniques"), view["comparison"], view["message"],
               api_name="compare_stop")
    inputs, estimate = [form[k] for k in START_INPUTS], bind(estimate_before_start, queue)
    for key in ("techniques", "model_source", "data_source", "max_steps", "max_seq_length", "batch_size",
                "max_samples"):
        form[key].change(estimate, inputs, view["estimate"], api_visibility="private", show_progress="hidden")
    on_page_load(estimate, inputs, view["estimate"])
    shown = gr.State("")  # which scatter points the browser holds
    live = [view[k] for k in ("comparison", "status", "progress", "table", "notes", "loss_plot", "scatter")] + [shown]
    poll, scatter = bind(poll_comparison, queue), bind(show_scatter, queue)
    timer = gr.Timer(POLL_SECONDS)
    timer.tick(poll, [view["comparison"], shown], live, api_name="compare_poll", show_progress="hidden",
               queue=False).then(scatter, view["comparison"], view["scatter"], show_progress="hidden", queue=False,
                                 api_visibility="private")
    on_page_load(poll, [view["comparison"], shown], live).then(scatter, view["comparison"], view["scatter"],
                                                               api_visibility="private")
