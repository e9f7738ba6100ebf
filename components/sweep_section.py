"""The Compare tab's sweep section: try lists of learning rates, ranks, alphas, dropouts and bit widths on the Train
form's settings, each trial a normal run (finetune/services/sweeps.py), ranked by validation loss.

The lead places it: ``build_sweep_section(SweepQueue(manager), train)`` with the Train tab's components, so Start
sweeps the Train form's config and "Use the best" writes the best trial's settings back into that form. A
``gr.Timer`` reads the sweep file and the runs' folders: a reloaded page re-attaches, a restarted app continues.
"""

from __future__ import annotations

import math
from typing import Any

import gradio as gr
import pandas as pd

from components.page_loads import on_page_load
from components.shared import bind, problems_markdown, stop_queue, visitor_of
from components.train_form import UI_ONLY, config_from_form, form_from_config
from finetune.core import paths
from finetune.core.access import AccessDenied, Visitor
from finetune.core.config import ConfigError, RunConfig, from_dict
from finetune.services.admission import RunError
from finetune.services.compare import CompareError, CompareRequest, base_config
from finetune.services.sweeps import (AXES, RESULT_COLUMNS, SEARCHES, SweepQueue, SweepRequest, best_trial,
                                      loss_by_hyperparameter, max_trials, progress, results)

POLL_SECONDS = 2.0
CHART_LABELS = [label for _, _, label in AXES.values()]
# The request's fields as the section's inputs are named (prefixed: the Train form's keys sit beside them).
SWEEP_FIELDS = [f"sweep_{f.name}" for f in SweepRequest.__dataclass_fields__.values()]


# --- handlers ---------------------------------------------------------------------------------------------------

def train_form_keys(train: dict[str, Any]) -> list[str]:
    """The keys of the Train tab's returned components that make up its form (config_from_form reads them)."""
    known = set(form_from_config(RunConfig())) | set(UI_ONLY) | {"run_name"}
    return [key for key in train if key in known]


def sweep_request(fields: dict[str, Any]) -> SweepRequest:
    values = {name.removeprefix("sweep_"): value for name, value in fields.items() if name in SWEEP_FIELDS}
    for name in ("trials", "seed", "max_steps"):
        values[name] = _int(values.get(name))
    values["bits"] = list(values.get("bits") or [])
    return SweepRequest(**values)


def _int(value: Any) -> Any:
    """gr.Number gives floats; pass integral ones on as ints and anything else as it is (validation reports it)."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return value


def base_of(manager: Any, form: dict[str, Any]) -> RunConfig:
    """The Train form's config (an upload kept beside the runs), or the comparison preset without a form."""
    if not form:
        return base_config(CompareRequest())
    cfg = config_from_form(form)
    if form.get("data_kind") == "Uploaded file":
        cfg.data.source = manager.keep_upload(cfg.data.source)
    return cfg


def start_sweep(queue: SweepQueue, request: gr.Request = None, **fields: Any) -> tuple[Any, ...]:
    """Validate the lists on the Train form's config and queue the trials: (sweep id, message, charts reset)."""
    form = {k: v for k, v in fields.items() if k not in SWEEP_FIELDS}
    resets = tuple(None for _ in CHART_LABELS)
    cfg = None
    try:
        cfg = base_of(queue.manager, form)
        sweep_id = queue.start_sweep(cfg, sweep_request(fields), visitor_of(request))
    except ConfigError as error:
        _discard(queue, cfg)
        return (gr.skip(), "**Not started.** " + problems_markdown(error), *(gr.skip() for _ in CHART_LABELS))
    except (CompareError, RunError, AccessDenied) as error:  # signed out, over a limit, the disk full
        _discard(queue, cfg)
        gr.Warning(str(error))
        return (gr.skip(), f"**Not started:** {error}", *(gr.skip() for _ in CHART_LABELS))
    trials = len(queue.load(sweep_id)["items"])
    return (sweep_id, f"Started sweep `{sweep_id}`: {trials} trial(s), one after another.", *resets)


def _discard(queue: SweepQueue, cfg: RunConfig | None) -> None:
    if cfg is not None:
        queue.manager.discard_upload(cfg.data.source)  # a refused start leaves no copy of the upload behind


def trials_frame(queue: SweepQueue, state: dict[str, Any] | None) -> pd.DataFrame:
    rows = results(queue.manager, state) if state else []
    return pd.DataFrame([[row[c] for c in RESULT_COLUMNS] for row in rows], columns=RESULT_COLUMNS)


def chart_frames(queue: SweepQueue, state: dict[str, Any] | None) -> list[pd.DataFrame | None]:
    """One frame per hyperparameter (validation loss against its value); None where it was not varied or nothing
    is ranked yet."""
    points = loss_by_hyperparameter(queue.manager, state) if state else {}
    return [pd.DataFrame(points[label], columns=["value", "val_loss", "trial"]) if label in points else None
            for label in CHART_LABELS]


def best_markdown(queue: SweepQueue, state: dict[str, Any] | None) -> str:
    item = best_trial(queue.manager, state) if state else None
    if item is None:
        return "No finished trial with a validation loss yet."
    cfg = from_dict(item["config"])
    ranked = [r for r in results(queue.manager, state) if r["val loss"] is not None]
    return (f"**Best so far:** {item['technique']} · validation loss {ranked[0]['val loss']} "
            f"({len(ranked)} trial(s) ranked; one held-out split and one seed each, so differences of a few "
            f"hundredths may be noise) · {cfg.training.max_steps} steps, method {cfg.lora.method}.")


def _key(state: dict[str, Any] | None, table: pd.DataFrame) -> str:
    """What the charts show: they are only reset (then redrawn) when this changes (gradio keeps a plot's first
    scales, see compare_tab)."""
    if state is None:
        return ""
    return state["id"] + ":" + "|".join(f"{t}={v}" for t, v in zip(table["trial"], table["val loss"]))


def poll_sweep(queue: SweepQueue, sweep_id: str, shown: str = "", request: gr.Request = None) -> tuple[Any, ...]:
    """(id, status, table, best, charts reset or skipped, key) for the visitor's running sweep, else the one
    shown (of those they may see)."""
    sweep_id, state = queue.watched(sweep_id, visitor_of(request))
    table = trials_frame(queue, state)
    status = "No sweep yet."
    if state:
        done, total = progress(state)
        status = f"Sweep `{sweep_id}`: **{state['state']}** · {done}/{total} trials done"
        status += f" ({state['error']})" if state.get("error") else ""
    key = _key(state, table)
    charts = [None if key != shown else gr.skip() for _ in CHART_LABELS]
    return (sweep_id, status, table, best_markdown(queue, state), *charts, key)


def _visible_state(queue: SweepQueue, sweep_id: str | None, visitor: Visitor) -> dict[str, Any] | None:
    """The sweep's state, when there is one the visitor may see."""
    try:
        return queue.load(sweep_id) if sweep_id and sweep_id in queue.visible_ids(visitor) else None
    except CompareError:
        return None


def show_charts(queue: SweepQueue, sweep_id: str, shown: str, drawn: str, request: gr.Request = None) -> list[Any]:
    """Draw the charts once per change of what they show (``shown``, set by the poll), not at every tick."""
    if shown == drawn:
        return [gr.skip() for _ in CHART_LABELS] + [gr.skip()]
    state = _visible_state(queue, sweep_id, visitor_of(request))
    return [gr.update(value=frame, visible=frame is not None) for frame in chart_frames(queue, state)] + [shown]


def use_best(queue: SweepQueue, keys: list[str], sweep_id: str, request: gr.Request = None) -> list[Any]:
    """The best trial's settings as Train-form values, in the order of ``keys``."""
    state = _visible_state(queue, sweep_id, visitor_of(request))
    item = best_trial(queue.manager, state) if state else None
    if item is None:
        gr.Warning("No finished trial with a validation loss yet: nothing to copy.")
        return [gr.skip() for _ in keys]
    cfg = from_dict(item["config"])
    cfg.run_name = f"best-of-{sweep_id}"
    values = form_from_config(cfg)
    if paths.local_paths_mode() != "anywhere":  # every visitor sees the form: sources as names, no server path
        values.update({key: paths.display_name(values[key]) for key in ("model_source", "data_hub_name")
                       if isinstance(values.get(key), str)})
    gr.Info(f"The Train form now holds {item['technique']} ({cfg.training.max_steps} steps: raise max steps "
            "for the real run).")
    return [values.get(key, gr.skip()) for key in keys]


# --- layout -----------------------------------------------------------------------------------------------------

def _inputs(defaults: SweepRequest) -> dict[str, Any]:
    form: dict[str, Any] = {}
    with gr.Row():
        form["sweep_learning_rates"] = gr.Textbox("1e-4, 5e-4", label="Learning rates", elem_id="sweep-lr",
                                                  info="Comma list, e.g. 1e-4, 3e-4, 1e-3.")
        form["sweep_ranks"] = gr.Textbox("4, 8", label="Ranks", elem_id="sweep-rank", info="Comma list of r.")
        form["sweep_alphas"] = gr.Textbox(str(defaults.alphas), label="Alphas", elem_id="sweep-alpha",
                                          info="Comma list; '2r' means alpha = 2 x rank.")
        form["sweep_dropouts"] = gr.Textbox(str(defaults.dropouts), label="Dropouts", elem_id="sweep-dropout")
        form["sweep_bits"] = gr.CheckboxGroup(["4", "8", "16", "32"], value=["4"], label="Base bits",
                                              elem_id="sweep-bits")
    with gr.Row():
        form["sweep_search"] = gr.Radio(list(SEARCHES), value=defaults.search, label="Search", elem_id="sweep-search",
                                        info="grid = every combination; random = a seeded sample of them.")
        form["sweep_trials"] = gr.Number(defaults.trials, label="Random trials", precision=0)
        form["sweep_seed"] = gr.Number(defaults.seed, label="Random seed", precision=0)
        form["sweep_max_steps"] = gr.Number(defaults.max_steps, label="Steps per trial", precision=0,
                                            elem_id="sweep-steps")
        form["sweep_prune_margin"] = gr.Number(defaults.prune_margin, label="Stop a trial this much worse (nats)",
                                               info="than the best finished trial at the same evaluation; 0 = never")
    return form


def build_sweep_section(queue: SweepQueue, train: dict[str, Any] | None = None) -> dict[str, Any]:
    """Lay out the section and wire it; ``train`` is the Train tab's components (its form is the base config and
    receives "Use the best"). Returns the section's components by name."""
    gr.Markdown(f"### Hyperparameter sweep\nEach trial trains the **Train tab's settings** with one combination "
                f"below, for the same number of steps, as a normal run; trials are ranked by validation loss. "
                f"At most {max_trials()} trials per sweep.")
    form = _inputs(SweepRequest())
    with gr.Row():
        start = gr.Button("Start sweep", variant="primary", elem_id="sweep-start")
        stop = gr.Button("Stop sweep", variant="stop", elem_id="sweep-stop")
        best = gr.Button("Use the best in the Train tab", elem_id="sweep-use-best")
    view: dict[str, Any] = {"sweep": gr.Textbox(label="Watching sweep", interactive=False, elem_id="sweep-id"),
                            "message": gr.Markdown(elem_id="sweep-message"),
                            "status": gr.Markdown(elem_id="sweep-status")}
    widths = {"trial": "200px", "note": "260px", "run id": "220px"}  # the rest: room for their headers
    view["table"] = gr.Dataframe(pd.DataFrame(columns=RESULT_COLUMNS), interactive=False, wrap=True,
                                 label="Trials (lowest validation loss first)", elem_id="sweep-table",
                                 column_widths=[widths.get(name, "100px") for name in RESULT_COLUMNS])
    view["best"] = gr.Markdown(elem_id="sweep-best")
    with gr.Row():
        view["charts"] = [gr.ScatterPlot(None, x="value", y="val_loss", color="trial", height=240, visible=False,
                                         title=f"Validation loss vs {'log10 ' if label == 'learning rate' else ''}"
                                               f"{label}", elem_id=f"sweep-chart-{label.replace(' ', '-')}")
                          for label in CHART_LABELS]
    train_form = {k: train[k] for k in train_form_keys(train)} if train else {}
    _wire(queue, form, train_form, start, stop, best, view)
    return {**form, "start": start, "stop": stop, "use_best": best, **view}


def _wire(queue: SweepQueue, form: dict[str, Any], train_form: dict[str, Any], start: Any, stop: Any, best: Any,
          view: dict[str, Any]) -> None:
    start.click(bind(start_sweep, queue), inputs_kwargs={**form, **train_form},
                outputs=[view["sweep"], view["message"], *view["charts"]], api_name="sweep_start",
                concurrency_limit=1, concurrency_id="train-start")
    stop.click(bind(stop_queue, queue, "trials"), view["sweep"], view["message"],
               api_name="sweep_stop")
    if train_form:
        best.click(bind(use_best, queue, list(train_form)), view["sweep"], list(train_form.values()),
                   api_name="sweep_use_best")
    shown = gr.State("")  # which points the charts should hold (the poll's key)
    drawn = gr.State("")  # which points they do hold
    live = [view["sweep"], view["status"], view["table"], view["best"], *view["charts"], shown]
    poll, charts = bind(poll_sweep, queue), bind(show_charts, queue)
    chart_io = ([view["sweep"], shown, drawn], [*view["charts"], drawn])
    timer = gr.Timer(POLL_SECONDS)
    timer.tick(poll, [view["sweep"], shown], live, api_name="sweep_poll", show_progress="hidden",
               queue=False).then(charts, *chart_io, show_progress="hidden", queue=False, api_visibility="private")
    on_page_load(poll, [view["sweep"], shown], live).then(charts, *chart_io, api_visibility="private")
