"""The Train tab: pick data and model, set hyperparameters, start a run and watch it live.

Every form control maps to one config field (its info text is the field's help). Handlers receive the form as
keyword arguments (``inputs_kwargs``), so ``gradio_client`` can call ``/start_run`` with just the fields it
wants to change, e.g. ``client.predict(model_source="...", training_max_steps=3, api_name="/start_run")``.

The tab never trains in-process: Start hands the config to the RunManager (a child process), and a ``gr.Timer``
polls the run folder. Because the watched run comes from disk, a reloaded page re-attaches to a running job.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any, Iterator

import gradio as gr
import pandas as pd

from components.lora_aid import lora_aid_markdown
from components.shared import (ESTIMATE_SLOT, PREVIEW_SLOT, bind, duration, list_hub_options, live_status, on_page_load,
                               points_frame, problems_markdown, progress_html, queue_place, refusal, series_frame,
                               started_message, stop_run, visitor_of, watched_run)
from components.train_form import DATA_KINDS, MODEL_KINDS, column_mapping, config_from_form, form_from_config, presets
from finetune.core import paths
from finetune.core.access import AccessDenied, can_act
from finetune.core.config import (BUNDLED_DATASET, CHECKPOINTING, COMPUTE_DTYPES, DATA_FORMATS, EMBEDDED_MODEL,
                                  KEEP_CHOICES, LORA_BIAS, LORA_INITS, LORA_METHODS, OPTIMIZERS, PEFT_METHODS,
                                  SCHEDULERS, ConfigError, STRATEGIES, RunConfig, field_help, load_config)
from finetune.core.data import DataError, DataPreview, bundled_names, hub_preview, preview_report
from finetune.core.distributed import check_launch, effective_batch, offers_processes
from finetune.core.estimate import estimate_run, memory_check_text
from finetune.core.hardware import HardwareProfile
from finetune.core.lora_init import init_problems
from finetune.core.metrics import (early_stop_note, headline_metric, is_summary, loss_key, read_metrics,
                                   rows_of_saved_model)
from finetune.core.models import ModelSourceError, load_tokenizer
from finetune.core.recipe import resolve_recipe
from finetune.core.run_folder import ADAPTER_DIR, RUN_CONFIG, has_adapter, memory_records, read_run_info
from finetune.core.storage import folder_bytes, human, usage
from finetune.services.admission import RunError, check_sources
from finetune.services.runs import RunManager

POLL_SECONDS = 2.0
# Each run with its stage and the number that stage is judged by (finetune.core.metrics.HEADLINE_METRICS): a reward
# model's loss or a DPO policy's final loss alone would not say whether it learned anything.
HISTORY_COLUMNS = ["run id", "stage", "headline metric", "headline value", "model", "dataset", "rank", "alpha",
                   "lr", "bits", "steps", "final loss", "final eval loss", "status", "duration (s)", "method",
                   "rows skipped", "processes", "effective batch"]
# run_info.json's counts of rows a run left out of its data: malformed lines (skipped with data.skip_bad_rows), rows
# with missing fields or unusable pairs, rows longer than max_seq_length.
SKIPPED_FIELDS = ("malformed_rows", "skipped_rows", "dropped_too_long")
NO_TOKENIZER = "too-long rows not counted: the tokenizer is not available"


# --- handlers ------------------------------------------------------------------------------------------------

def load_preset(name: str) -> list[Any]:
    """Fill the form from configs/<name>.yaml (values in FORM order); only a listed preset's name is read."""
    if name not in presets():
        raise refusal(paths.REFUSED)
    values = form_from_config(load_config(paths.CONFIGS_DIR / f"{name}.yaml"))
    return [values.get(key, gr.skip()) for key in _FORM_KEYS]


def update_estimate(profile: HardwareProfile, runs_root: Path | None = None, **form: Any) -> str:
    """The estimate beside the form; on the CPU calibrated on the peaks this machine's finished runs measured."""
    try:
        cfg = config_from_form(form)
        check_launch(cfg)  # processes this machine cannot run: the same refusal Start would give
        params, memory = estimate_run(cfg, profile, memory_records(runs_root) if runs_root else None)
        recipe = resolve_recipe(cfg, profile)
    except ConfigError as error:
        return "Estimate unavailable until the form is valid: " + "; ".join(error.problems.values())
    except Exception as error:  # offline Hub id, unreadable folder: say why, keep the form usable
        return f"Estimate unavailable: {error}"
    init_note = "".join(f"  \n**LoRA initialisation:** {problem}" for problem in init_problems(cfg))
    return (f"**Trainable parameters:** {params}  \n**Memory:** {memory.verdict}  \n"
            f"<small>weights {memory.weights_gb:.2f} GB · adapters + optimizer {memory.adapter_gb:.2f} GB · "
            f"activations {memory.activations_gb:.2f} GB · logits {memory.logits_gb:.2f} GB · "
            f"overhead {memory.overhead_gb:.2f} GB</small>  \n"
            f"**Recipe on this hardware:** {'; '.join(recipe.notes)}"
            f"{'; padding-free batches' if recipe.padding_free else ''}{init_note}")


def preview_dataset(**form: Any) -> tuple[str, pd.DataFrame]:
    """Before Start: how the source is read, its first rows, and how many rows will train, be held out and be
    skipped (and why), counted by the same code the run uses."""
    try:
        if form.get("data_kind") == "Hub dataset":
            report, cfg = _hub_report(form), None
        else:
            cfg = config_from_form(form)
            tokenizer, tokenizer_note = _tokenizer_for_preview(cfg)
            report = preview_report(cfg.data, tokenizer=tokenizer, seed=cfg.training.seed, rows=5)
            if tokenizer_note:
                report.notes.append(tokenizer_note)
    except ConfigError as error:
        return "Preview unavailable: " + "; ".join(error.problems.values()), _preview_table([])
    except (DataError, ModelSourceError, RuntimeError, OSError) as error:
        return f"**Cannot preview:** {paths.for_visitors(str(error))}", _preview_table([])
    return report.markdown(), _preview_table(report.rows)


def _hub_report(form: dict[str, Any]) -> DataPreview:
    """A Hub dataset's first rows, streamed; its row counts are known only once a run loads the whole split."""
    name = paths.hub_dataset(form.get("data_hub_name"))
    if not name:
        raise DataError("Type a Hub dataset name first, e.g. tatsu-lab/alpaca.")
    report = hub_preview(name, form.get("data_hub_config") or None, form.get("data_split") or "train", rows=5,
                         fmt=form.get("data_format") or "auto", column_mapping=column_mapping(form))
    report.notes.append("row counts (train, held out, skipped) are known once a run loads the whole split")
    return report


def _tokenizer_for_preview(cfg: RunConfig) -> tuple[Any, str]:
    """The run's tokenizer, so rows over max_seq_length are counted; a Hub model offline (or any unreadable
    model) must not stop the preview of the data itself."""
    try:
        return load_tokenizer(cfg.model), ""
    except Exception:  # ModelSourceError offline, OSError for a folder without a tokenizer, ...
        return None, NO_TOKENIZER


def _preview_table(rows: list[list[dict[str, str]]]) -> pd.DataFrame:
    return pd.DataFrame([(i + 1, m["role"], m["content"]) for i, row in enumerate(rows) for m in row],
                        columns=["row", "role", "content"])


def start_run(manager: RunManager, request: gr.Request = None, **form: Any) -> tuple[str, str]:
    """Validate the form and queue the training job (it starts at once on a free device); returns (watched run
    id, status message)."""
    try:
        cfg = config_from_form(form)  # the path gate: an upload must come from gradio's upload folder
        check_sources(cfg)  # an offline Hub name or a bad file is reported now, not by a failed run
    except ConfigError as error:
        return gr.skip(), problems_markdown(error)
    if form.get("data_kind") == "Uploaded file":
        cfg.data.source = manager.keep_upload(cfg.data.source)
    try:
        run_id = manager.start(cfg, visitor=visitor_of(request))
    except (RunError, AccessDenied) as error:  # signed out, over a limit, or the disk is full
        manager.discard_upload(cfg.data.source)  # a refused start leaves no copy of the upload behind
        gr.Warning(str(error))
        return gr.skip(), f"**Not started:** {error}"
    return run_id, started_message(manager, run_id)


def resume_run(manager: RunManager, run_id: str, request: gr.Request = None) -> tuple[Any, str]:
    """Continue a stopped, failed or interrupted run from its last checkpoint (queued when the device is busy);
    returns (watched id, status)."""
    if not run_id:
        return gr.skip(), "Pick the run to resume first (watch it, or select it in the run history)."
    try:
        manager.resume(run_id, visitor_of(request))
    except (RunError, AccessDenied) as error:
        gr.Warning(str(error))
        return gr.skip(), f"**Not resumed:** {error}"
    if manager.queue_info(run_id):
        return run_id, started_message(manager, run_id)
    return run_id, f"Resuming run `{run_id}` from its last checkpoint…"


def restore_form(manager: RunManager, request: gr.Request = None) -> list[Any]:
    """On page load, show the settings of the visitor's run in progress (the form is otherwise back to its
    defaults); another visitor's run is not theirs to copy."""
    active = manager.active_run()
    if active and not can_act(visitor_of(request), manager.owner_of(active)):
        active = None
    try:
        cfg = load_config(manager.run_dir(active) / RUN_CONFIG) if active else None
    except ConfigError:
        cfg = None
    # A reward/DPO/KTO/GRPO run is the RLHF tab's: its settings in this SFT form would start the wrong run.
    values = form_from_config(cfg) if cfg is not None and cfg.stage == "sft" else {}
    if paths.local_paths_mode() != "anywhere":  # every visitor sees this form: sources as names, no server path
        values.update({key: paths.display_name(values[key]) for key in ("model_source", "data_hub_name")
                       if isinstance(values.get(key), str)})
    return [values.get(key, gr.skip()) for key in _FORM_KEYS]


def loss_frame(rows: list[dict[str, Any]], status: dict[str, Any] | None = None) -> pd.DataFrame | None:
    """Long format (step, loss, series) so one LinePlot draws train and eval loss in two colours; a run that
    tracks its best evaluation also gets a mark (a short dash) on the best eval point and on the early stop."""
    marks = _best_marks(rows, status or {})
    series = (("loss", "train loss"), ("eval_loss", "eval loss")) + tuple((key, key) for key in marks)
    return series_frame(rows + [{"step": step, key: value} for key, (step, value) in marks.items()], series, "loss")


def _best_marks(rows: list[dict[str, Any]], status: dict[str, Any]) -> dict[str, tuple[int, float]]:
    """{series label: (step, eval loss there)} for the best evaluation and the early stop that status.json names."""
    evals = {r["step"]: r["eval_loss"] for r in rows if isinstance(r.get("eval_loss"), (int, float))}
    wanted = {"best eval": status.get("best_step"), "early stop": status.get("stopped_early_at")}
    return {label: (step, evals[step]) for label, step in wanted.items() if step in evals}


def lr_frame(rows: list[dict[str, Any]]) -> pd.DataFrame | None:
    points = [(r["step"], r["learning_rate"]) for r in rows if isinstance(r.get("learning_rate"), (int, float))]
    return points_frame(points, ["step", "learning_rate"])


def status_text(run_id: str, status: dict[str, Any], adapter_saved: bool = True) -> str:
    state = status.get("state", "unknown")
    if state == "failed":
        return f"Run `{run_id}` **failed**: {paths.for_visitors(status.get('error') or 'see the log below')}"
    if state == "completed":
        # A full fine-tune saves a whole model (runs/<id>/model), not an adapter, so Chat has nothing to attach.
        where = ("Try it in the Chat tab." if adapter_saved else
                 "It saved a full model (the run folder's `model/`), not an adapter, so it is not offered in Chat.")
        ended = early_stop_note(status).replace("stopped early", "**stopped early**") or "**completed**"
        return f"Run `{run_id}` {ended} in {duration(status.get('duration'))}.{_kept_note(status)} {where}"
    if state in ("stopped", "interrupted"):
        return f"Run `{run_id}` **{state}**.{_kept_note(status)} {paths.for_visitors(status.get('error') or '')}"
    if state == "waiting":
        return f"Run `{run_id}` is **waiting** in the job queue: {queue_place(status)}. Stop takes it out of the queue."
    if state == "queued":  # the child is starting: not waiting behind anyone
        return f"Run `{run_id}` is **starting**: loading the model and data…"
    if state == "cancelled":
        return f"Run `{run_id}` was **cancelled** while it waited in the queue; nothing was trained."
    if status.get("stop_requested_at"):
        return (f"Run `{run_id}` is **stopping**: asked {duration(time.time() - status['stop_requested_at'])} ago "
                "to save a checkpoint and stop; a process that does not answer is ended.")
    if status.get("stalled_seconds") is not None:
        return (f"Run `{run_id}` looks **stalled**: no progress for {duration(status['stalled_seconds'])} at step "
                f"{status.get('step') or 0}/{status.get('max_steps') or '?'}. Its last log lines are below; Stop "
                "asks it to save a checkpoint and ends the process if it does not answer.")
    return f"Run `{run_id}` is **{state}**."


def _kept_note(status: dict[str, Any]) -> str:
    """Which weights a finished run that tracked its best evaluation saved ('' for any other run)."""
    best, kept = status.get("best_step"), status.get("kept")
    if not isinstance(best, int) or kept not in ("best", "last"):
        return ""
    name, value = status.get("best_metric_name") or "metric", status.get("best_metric")
    value_text = f", {name.replace('_', ' ')} {value:.4g}" if isinstance(value, float) else ""  # eval_loss: eval loss
    holds = f"the best step's ({best})" if kept == "best" else "the last step's"
    return f" Best held-out evaluation: step {best}{value_text}; the saved weights are {holds}."


def poll_run(manager: RunManager, run_id: str, request: gr.Request = None) -> tuple[Any, ...]:
    """Everything the live view shows, read from the run folder (cheap enough for a 2 s timer); only runs the
    visitor may see."""
    visitor = visitor_of(request)
    run_id = watched_run(manager, manager.visible_ids(visitor), run_id, visitor)
    if not run_id:
        return ("", "No runs yet: set up a run and press Start.", progress_html("train-progress", {"state": "idle"}, []),
                loss_frame([]), lr_frame([]), "", gr.Accordion(open=False))
    status, rows = live_status(manager, run_id), read_metrics(manager.run_dir(run_id))
    stalled = status.get("stalled_seconds") is not None
    failed = status.get("state") == "failed"
    adapter_saved = has_adapter(manager.run_dir(run_id) / ADAPTER_DIR)
    text = status_text(run_id, status, adapter_saved)
    if status.get("state") == "completed":  # the estimate beside the measured peak: a drift is seen
        text += " " + memory_check_text(read_run_info(manager.run_dir(run_id)))
    return (run_id, text.rstrip(), progress_html("train-progress", status, rows),
            loss_frame(rows, status), lr_frame(rows),
            paths.for_visitors(manager.log_tail(run_id, 40)),
            gr.Accordion(open=True) if failed or stalled else gr.skip())


def run_history(manager: RunManager, selected: list[str] | None = None,
                request: gr.Request = None) -> tuple[pd.DataFrame, Any, Any, str]:
    """The history table (the runs the visitor may see), the compare picker (preselecting the newest runs when
    nothing is picked), the delete picker (the runs they may delete) and the disk in use."""
    visitor, rows = visitor_of(request), []
    for run in (manager.summary(run_id) for run_id in manager.visible_ids(visitor)):
        cfg = run.config
        stage = cfg.stage if cfg else "?"
        status = manager.status(run.run_id)
        # A run that kept its best checkpoint is judged by that checkpoint's figures, not its last step's.
        saved = rows_of_saved_model(read_metrics(manager.run_dir(run.run_id)), status)
        name, value = headline_metric(stage, saved)
        final_eval = _last_value(saved, "eval_loss") if status.get("kept") == "best" else run.final_eval_loss
        rows.append([run.run_id, stage, name, _round(value), paths.display_name(cfg.model.source) if cfg else "?",
                     paths.display_name(cfg.data.source) if cfg else "?",
                     cfg.lora.rank if cfg else None, cfg.lora.alpha if cfg else None,
                     cfg.training.learning_rate if cfg else None, cfg.model.bits if cfg else None,
                     f"{run.step}/{run.max_steps or '?'}", _round(run.final_loss), _round(final_eval),
                     early_stop_note(status) or run.state, run.duration,
                     _method_text(cfg) if cfg else "?",
                     rows_skipped(manager.run_dir(run.run_id)), *_processes_cells(cfg), status.get("owner") or ""])
    ids = [r[0] for r in rows]
    kept = [run_id for run_id in selected or [] if run_id in ids] or ids[:3]
    owners = {row[0]: row[-1] or None for row in rows}  # the owner column, read with each run's status above
    # An operator may delete anyone's run: the choice names whose it is.
    deletable = [(f"{run_id} ({owners[run_id] or 'no owner'})" if visitor.sign_in else run_id, run_id)
                 for run_id in ids if can_act(visitor, owners[run_id])]
    table = pd.DataFrame(rows, columns=HISTORY_COLUMNS + ["owner"])
    # Beside the run id, where it is read first; one local user owns everything: no owner column then.
    table = table[["run id", "owner", *HISTORY_COLUMNS[1:]]] if visitor.sign_in else table.drop(columns="owner")
    return (table, gr.Dropdown(choices=ids, value=kept, multiselect=True), gr.Dropdown(choices=deletable, value=None),
            usage(manager.root).text())


def ask_delete(manager: RunManager, run_id: str | None, request: gr.Request = None) -> tuple[str, Any]:
    """The first press of Delete: say what goes and how big it is, and show the confirming button."""
    if not run_id:
        return "Pick a run to delete first.", gr.Button(visible=False)
    try:
        manager.require_can_act(run_id, visitor_of(request), "delete this run")
        size = folder_bytes(manager.run_dir(run_id))
    except (RunError, AccessDenied) as error:
        return f"**Not deleted:** {error}", gr.Button(visible=False)
    return (f"Delete run `{run_id}` for good? Its adapter, checkpoints, merged model and exports go with it "
            f"({human(size)}). Press **Confirm delete** to go on.", gr.Button(visible=True))


def delete_run(manager: RunManager, run_id: str | None, request: gr.Request = None) -> tuple[str, Any]:
    """The confirming press: remove the run's folder (owner or operator only)."""
    if not run_id:
        return "Pick a run to delete first.", gr.Button(visible=False)
    try:
        freed = manager.delete(run_id, visitor_of(request))
    except (RunError, AccessDenied) as error:
        return f"**Not deleted:** {error}", gr.Button(visible=False)
    gr.Info(f"Deleted {run_id}.")
    return f"Deleted run `{run_id}`: {human(freed)} freed.", gr.Button(visible=False)


def _processes_cells(cfg: RunConfig | None) -> tuple[str | None, int | None]:
    """("2 · ddp", effective batch): how many processes shared the run, and the rows of one optimizer step."""
    if cfg is None:
        return None, None
    processes = "1" if cfg.training.processes == 1 else f"{cfg.training.processes} · {cfg.training.strategy}"
    return processes, effective_batch(cfg)


def _method_text(cfg: RunConfig) -> str:
    """The PEFT method, with the LoRA initialisation when it is not the default ("lora + loftq")."""
    return cfg.lora.method + (f" + {cfg.lora.init}" if cfg.lora.init != "default" else "")


def _last_value(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return values[-1] if values else None


def rows_skipped(run_dir: Any) -> int | None:
    """Rows the run left out of its data (run_info.json); None for a run that has not recorded them yet."""
    info = read_run_info(run_dir)
    counts = [info[key] for key in SKIPPED_FIELDS if isinstance(info.get(key), int)]
    return sum(counts) if counts else None


def _round(value: float | None) -> float | None:
    """Four significant digits: a DPO loss of 2e-7 must not read as 0."""
    return None if value is None else float(f"{value:.4g}")


def _stage(manager: RunManager, run_id: str) -> str:
    try:
        return load_config(manager.run_dir(run_id) / RUN_CONFIG).stage
    except (ConfigError, RunError, OSError):
        return "?"


def compare_runs(manager: RunManager, run_ids: list[str] | None, request: gr.Request = None) -> Iterator[Any]:
    """Training curves of several runs, coloured by run (None first: see above). Only runs of one stage share
    the chart, the stage of the first run picked: an SFT loss, a reward model's loss and a DPO loss measure
    different things on different scales, so overlaying them would suggest a comparison that does not exist."""
    visible = set(manager.visible_ids(visitor_of(request)))
    stages = {run_id: _stage(manager, run_id) for run_id in run_ids or [] if run_id in visible}
    stage = next(iter(stages.values()), "sft")
    key, points = loss_key(stage), []
    for run_id in (r for r, s in stages.items() if s == stage and s != "?"):  # "?": no such run
        points += [(r["step"], r[key], run_id) for r in read_metrics(manager.run_dir(run_id))
                   if isinstance(r.get(key), (int, float)) and not is_summary(r)]
    left_out = [f"{run_id} ({s})" for run_id, s in stages.items() if s != stage]
    title = f"{'Mean reward' if key == 'reward' else 'Training loss'} of {stage} runs"
    if left_out:
        title += f"; not overlaid (other stages): {', '.join(left_out)}"
    yield None
    yield gr.LinePlot(points_frame(points, ["step", "loss", "run"]), title=title,
                      y_title="mean reward" if key == "reward" else "loss")


def toggle_data_kind(kind: str) -> tuple[Any, Any, Any]:
    return (gr.update(visible=kind == "Bundled"), gr.update(visible=kind == "Hub dataset"),
            gr.update(visible=kind == "Uploaded file"))


def choose_model_kind(kind: str, current: str) -> Any:
    if kind == "Embedded":
        return gr.update(value=EMBEDDED_MODEL, placeholder=EMBEDDED_MODEL)
    placeholder = "organisation/model-name" if kind == "Hub id" else "/path/to/saved/model"
    return gr.update(value="" if current == EMBEDDED_MODEL else current, placeholder=placeholder)


# --- layout --------------------------------------------------------------------------------------------------

def _info(key: str) -> str:
    section, _, name = key.partition("_")
    return field_help(section, name)


def _number(key: str, label: str, value: Any, **kwargs: Any) -> gr.Number:
    return gr.Number(value=value, label=label, info=_info(key), **kwargs)


def _short_info(key: str) -> str:
    """The first sentence of a field's help: the first screen keeps one line per control (the whole help is the
    config's, shown in the full form below)."""
    text = _info(key)
    head, dot, _ = text.partition(". ")
    return head + "." if dot else text


def _data_source_controls(form: dict[str, Any], hub: dict[str, Any]) -> None:
    """Where the data comes from (first screen): a bundled set, a Hub dataset or an uploaded file."""
    form["data_kind"] = gr.Radio(list(DATA_KINDS), value="Bundled", label="Dataset source", elem_id="data-kind",
                                 scale=2)
    form["data_bundled"] = gr.Dropdown(bundled_names() or [BUNDLED_DATASET], value=BUNDLED_DATASET,
                                       label="Bundled dataset", info=_short_info("data_source"), scale=2)
    with gr.Column(visible=False, scale=2) as hub["box"]:
        form["data_hub_name"] = gr.Textbox(value="", label="Hub dataset name", placeholder="tatsu-lab/alpaca",
                                           elem_id="hub-name")
        # Dropdowns that accept typed values: the Hub's lists when fetched, any name when offline.
        form["data_hub_config"] = gr.Dropdown([], value="", label="Hub config (subset)",
                                              info=_info("data_hub_config"), allow_custom_value=True)
        hub["list"] = gr.Button("List configs/splits", size="sm", elem_id="hub-list")
        hub["info"] = gr.Markdown(elem_id="hub-info")
    form["data_file"] = gr.File(label="Upload a dataset file", type="filepath", visible=False, scale=2,
                                file_types=list(paths.DATA_FILE_SUFFIXES), elem_id="data-file")


def _data_details(form: dict[str, Any], defaults: RunConfig) -> None:
    """How the rows are read: split, format, columns, malformed rows (collapsed: the defaults read the bundled
    data and most files)."""
    with gr.Accordion("Data details: split, format, columns", open=False, elem_id="data-details"):
        with gr.Row():
            form["data_split"] = gr.Dropdown([defaults.data.split], value=defaults.data.split, label="Split",
                                             info=_info("data_split"), allow_custom_value=True)
            form["data_format"] = gr.Dropdown(list(DATA_FORMATS), value="auto", label="Format",
                                              info=_info("data_format"))
            form["prompt_column"] = gr.Textbox(value="", label="Prompt column", placeholder="e.g. query",
                                               info="Your column holding the user's message (renamed to 'prompt').")
            form["answer_column"] = gr.Textbox(value="", label="Answer column", placeholder="e.g. reply",
                                               info="Your column holding the answer (renamed to 'completion').")
        with gr.Row():
            form["column_mapping_json"] = gr.Textbox(value="", label="Column mapping (JSON, optional)",
                                                     placeholder='{"query": "prompt", "reply": "completion"}',
                                                     info=_info("data_column_mapping"), scale=3)
            form["data_skip_bad_rows"] = gr.Checkbox(value=defaults.data.skip_bad_rows, label="Skip malformed rows",
                                                     info=_info("data_skip_bad_rows"), elem_id="skip-bad-rows")


def _model_controls(form: dict[str, Any], defaults: RunConfig) -> None:
    """Which model (first screen)."""
    with gr.Row():
        form["model_kind"] = gr.Radio(list(MODEL_KINDS), value="Embedded", label="Model source", scale=2)
        form["model_source"] = gr.Textbox(value=defaults.model.source, label="Model", elem_id="model-source",
                                          info=_short_info("model_source"), scale=3)
        form["model_bits"] = gr.Radio([4, 8, 16, 32], value=defaults.model.bits, label="Bit width",
                                      info=_short_info("model_bits"), elem_id="bit-width", scale=2)


def _quant_details(form: dict[str, Any], defaults: RunConfig) -> None:
    with gr.Accordion("Quantization details: 4-bit type, double quantization", open=False):
        with gr.Row():
            form["model_quant_type"] = gr.Radio(["nf4", "fp4"], value=defaults.model.quant_type,
                                                label="4-bit type", info=_info("model_quant_type"))
            form["model_double_quant"] = gr.Checkbox(value=defaults.model.double_quant, label="Double quant",
                                                     info=_info("model_double_quant"))


def show_method_fields(method: str) -> tuple[Any, ...]:
    """Only the fields the chosen PEFT method reads: rank/alpha/dropout/targets for the LoRA family, ..."""
    lora_like, ia3, prompt = method in LORA_METHODS, method == "ia3", method == "prompt_tuning"
    return (gr.update(visible=lora_like), gr.update(visible=lora_like), gr.update(visible=lora_like),
            gr.update(visible=lora_like or ia3), gr.update(visible=ia3), gr.update(visible=prompt),
            gr.update(visible=prompt), gr.update(visible=lora_like))


METHOD_FIELDS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_ia3_feedforward_modules",
                 "lora_num_virtual_tokens", "lora_prompt_init_text", "lora_init")


def _method_controls(form: dict[str, Any], d: RunConfig) -> None:
    with gr.Row():
        form["lora_method"] = gr.Dropdown(list(PEFT_METHODS), value=d.lora.method, label="PEFT method",
                                          info=_info("lora_method"), elem_id="peft-method")
        form["lora_init"] = gr.Dropdown(list(LORA_INITS), value=d.lora.init, label="LoRA initialisation",
                                        info=_info("lora_init"), elem_id="lora-init",
                                        visible=d.lora.method in LORA_METHODS)
        form["lora_ia3_feedforward_modules"] = gr.Textbox(
            value=d.lora.ia3_feedforward_modules, label="IA3 feed-forward modules",
            info=_info("lora_ia3_feedforward_modules"), visible=d.lora.method == "ia3")
        form["lora_num_virtual_tokens"] = _number("lora_num_virtual_tokens", "Virtual tokens",
                                                  d.lora.num_virtual_tokens, precision=0,
                                                  visible=d.lora.method == "prompt_tuning")
        form["lora_prompt_init_text"] = gr.Textbox(value=d.lora.prompt_init_text, label="Prompt init text",
                                                   info=_info("lora_prompt_init_text"),
                                                   visible=d.lora.method == "prompt_tuning")


def _card_hyperparameters(form: dict[str, Any], d: RunConfig) -> None:
    """Four of the product card's five hyperparameters (the fifth, the bit width, sits beside the model) and how
    long to train, on the first screen."""
    with gr.Row(elem_id="card-hyperparameters"):
        form["training_learning_rate"] = gr.Number(d.training.learning_rate, label="Learning rate",
                                                   info=_short_info("training_learning_rate"),
                                                   elem_id="learning-rate", min_width=120)
        form["lora_rank"] = gr.Number(d.lora.rank, label="LoRA rank (r)", precision=0,
                                      info=_short_info("lora_rank"), elem_id="lora-rank",
                                      min_width=120)
        form["lora_alpha"] = gr.Number(d.lora.alpha, label="LoRA alpha", info=_short_info("lora_alpha"),
                                       elem_id="lora-alpha", min_width=120)
        form["lora_dropout"] = gr.Number(d.lora.dropout, label="LoRA dropout", info=_short_info("lora_dropout"),
                                         elem_id="lora-dropout", min_width=120)
        form["training_max_steps"] = gr.Number(d.training.max_steps, label="Max steps", precision=0,
                                               info=_short_info("training_max_steps"), elem_id="max-steps",
                                               min_width=120)


def _method_details(form: dict[str, Any], d: RunConfig) -> None:
    with gr.Accordion("PEFT method and target modules", open=False, elem_id="peft-details"):
        _method_controls(form, d)
        form["lora_target_modules"] = gr.Textbox(value=d.lora.target_modules, label="Target modules",
                                                 info=_info("lora_target_modules"))


def _length_controls(form: dict[str, Any], d: RunConfig) -> None:
    with gr.Accordion("Batch, epochs and sequence length", open=False, elem_id="length-details"):
        with gr.Row():
            form["training_num_epochs"] = _number("training_num_epochs", "Epochs", d.training.num_epochs)
            form["training_batch_size"] = _number("training_batch_size", "Batch size", d.training.batch_size,
                                                  precision=0, elem_id="batch-size")
            form["training_gradient_accumulation"] = _number("training_gradient_accumulation",
                                                             "Gradient accumulation",
                                                             d.training.gradient_accumulation, precision=0)
            form["data_max_seq_length"] = _number("data_max_seq_length", "Max sequence length",
                                                  d.data.max_seq_length, precision=0, elem_id="max-seq-length")
        # Past one device: offered with 2+ GPUs, and on the CPU (processes over gloo) when asked.
        with gr.Row(visible=offers_processes()):
            form["training_processes"] = _number("training_processes", "Processes (devices)", d.training.processes,
                                                 precision=0, minimum=1, elem_id="processes")
            form["training_strategy"] = gr.Dropdown(list(STRATEGIES), value=d.training.strategy, label="Strategy",
                                                    info=_info("training_strategy"), elem_id="strategy")


def _advanced_controls(form: dict[str, Any], d: RunConfig) -> None:
    t = d.training
    with gr.Accordion("Advanced settings", open=False):
        with gr.Row():
            form["run_name"] = gr.Textbox(value="run", label="Run name", info="Prefix of the run folder's name.")
            form["model_compute_dtype"] = gr.Dropdown(list(COMPUTE_DTYPES), value=d.model.compute_dtype,
                                                      label="Compute dtype", info=_info("model_compute_dtype"))
            form["model_trust_remote_code"] = gr.Checkbox(value=False, label="Trust remote code",
                                                          info=_info("model_trust_remote_code"))
            form["lora_bias"] = gr.Dropdown(list(LORA_BIAS), value=d.lora.bias, label="LoRA bias",
                                            info=_info("lora_bias"))
        with gr.Row():
            form["training_lr_scheduler"] = gr.Dropdown(list(SCHEDULERS), value=t.lr_scheduler, label="Scheduler",
                                                        info=_info("training_lr_scheduler"))
            form["training_warmup_ratio"] = _number("training_warmup_ratio", "Warmup ratio", t.warmup_ratio)
            form["training_optimizer"] = gr.Dropdown(list(OPTIMIZERS), value=t.optimizer, label="Optimizer",
                                                     info=_info("training_optimizer"))
            form["training_weight_decay"] = _number("training_weight_decay", "Weight decay", t.weight_decay)
            form["training_max_grad_norm"] = _number("training_max_grad_norm", "Max grad norm", t.max_grad_norm)
        with gr.Row():
            form["training_gradient_checkpointing"] = gr.Radio(
                list(CHECKPOINTING), value=t.gradient_checkpointing, label="Gradient checkpointing",
                info=_info("training_gradient_checkpointing"))
            form["training_padding_free"] = gr.Checkbox(value=t.padding_free, label="Padding-free batches",
                                                        info=_info("training_padding_free"))
            form["training_liger_kernels"] = gr.Checkbox(value=t.liger_kernels, label="Liger kernels (GPU)",
                                                         info=_info("training_liger_kernels"))
            form["training_cpu_lm_head"] = gr.Checkbox(value=t.cpu_lm_head, label="Answer-only LM head (CPU)",
                                                       info=_info("training_cpu_lm_head"))
            form["training_seed"] = _number("training_seed", "Seed", t.seed, precision=0)
            form["training_logging_steps"] = _number("training_logging_steps", "Logging steps", t.logging_steps,
                                                     precision=0)
            form["training_eval_steps"] = _number("training_eval_steps", "Eval steps", t.eval_steps, precision=0,
                                                  elem_id="eval-steps")
            form["training_save_steps"] = _number("training_save_steps", "Save steps", t.save_steps, precision=0)
        with gr.Row():
            form["data_validation_fraction"] = _number("data_validation_fraction", "Validation fraction",
                                                       d.data.validation_fraction)
            form["data_max_samples"] = _number("data_max_samples", "Max samples (0 = all)", 0, precision=0)
            form["training_early_stopping_patience"] = _number(
                "training_early_stopping_patience", "Early stopping patience (evaluations, 0 = off)",
                t.early_stopping_patience, precision=0, elem_id="early-stopping-patience")
            form["training_keep"] = gr.Radio(list(KEEP_CHOICES), value=t.keep, label="Saved adapter holds",
                                             info=_info("training_keep"), elem_id="keep-weights")


def _default_config() -> RunConfig:
    try:
        return load_config(paths.CONFIGS_DIR / "cpu-quick.yaml")
    except ConfigError:
        return RunConfig()


_FORM_KEYS: list[str] = []  # filled by build_train_tab: the order load_preset returns values in


def _run_state(view: dict[str, Any]) -> None:
    """The run's status line and progress bar, right under Start."""
    view["status"] = gr.Markdown(elem_id="run-status")
    view["progress"] = gr.HTML(progress_html("train-progress", {"state": "idle"}, []))


def _live_view(view: dict[str, Any]) -> dict[str, Any]:
    view["watching"] = gr.Textbox(label="Watching run", interactive=False, elem_id="watching-run")
    with gr.Row():
        view["loss_plot"] = gr.LinePlot(None, x="step", y="loss", color="series", title="Loss",
                                        elem_id="loss-plot", height=300)
        view["lr_plot"] = gr.LinePlot(None, x="step", y="learning_rate", title="Learning rate",
                                      elem_id="lr-plot", height=300)
    with gr.Accordion("Training log (last lines)", open=False) as view["log_box"]:
        view["log"] = gr.Textbox(lines=12, max_lines=12, show_label=False, interactive=False, elem_id="train-log")
    return view


def _history_view() -> dict[str, Any]:
    view: dict[str, Any] = {}
    with gr.Accordion("Run history", open=True):
        view["history"] = gr.Dataframe(pd.DataFrame(columns=HISTORY_COLUMNS), interactive=False, wrap=False,
                                       elem_id="run-history")
        with gr.Row():
            view["compare_ids"] = gr.Dropdown([], multiselect=True, label="Compare loss curves of runs",
                                              allow_custom_value=True)  # API clients: see inspect_section
            view["refresh"] = gr.Button("Refresh history", size="sm")
        view["compare_plot"] = gr.LinePlot(None, x="step", y="loss", color="run",
                                           title="Training loss by run", height=280)
        view["disk"] = gr.Markdown(elem_id="disk-usage")
        with gr.Row():
            # Custom values pass to the handler, which checks the owner itself (an API caller may name any run).
            view["delete_id"] = gr.Dropdown([], label="Delete a run", elem_id="delete-run-id",
                                            allow_custom_value=True,
                                            info="Runs you may delete: your own (an operator: any run).")
            view["delete"] = gr.Button("Delete run…", size="sm", variant="stop", elem_id="delete-run")
            view["confirm_delete"] = gr.Button("Confirm delete", size="sm", variant="stop", visible=False,
                                               elem_id="confirm-delete")
        view["delete_note"] = gr.Markdown(elem_id="delete-note")
    return view


def build_train_tab(manager: RunManager, profile: HardwareProfile) -> dict[str, Any]:
    """Lay out the tab and wire its handlers; returns its components by name. The first screen holds what a
    learner chooses (preset, data, model, the card's five hyperparameters) and Start, with the estimate beside
    them; every other setting is one click away in a collapsed group."""
    defaults, form, hub = _default_config(), {}, {}
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            with gr.Row():
                preset = gr.Dropdown(presets(), value="cpu-quick" if "cpu-quick" in presets() else None,
                                     label="Preset", info="Fill the form from configs/*.yaml", scale=1,
                                     elem_id="preset")
                _data_source_controls(form, hub)
            _model_controls(form, defaults)
            _card_hyperparameters(form, defaults)
            with gr.Row():
                start = gr.Button("Start training", variant="primary", elem_id="start-button", scale=2)
                stop = gr.Button("Stop", variant="stop", elem_id="stop-button", scale=1)
                resume = gr.Button("Resume from last checkpoint", elem_id="resume-button", scale=1)
            view: dict[str, Any] = {}
            _run_state(view)
        with gr.Column(scale=1):
            estimate = gr.Markdown(elem_id="estimate")
            lora_aid = gr.Markdown(elem_id="lora-aid")  # learning aid: W + (alpha/r)·B·A with this form's numbers
    _data_details(form, defaults)
    with gr.Accordion("Data preview", open=True):
        preview_info = gr.Markdown(elem_id="data-preview")
        preview_table = gr.Dataframe(pd.DataFrame(columns=["row", "role", "content"]), interactive=False, wrap=True)
        preview_button = gr.Button("Preview data", size="sm")
    _quant_details(form, defaults)
    _method_details(form, defaults)
    _length_controls(form, defaults)
    _advanced_controls(form, defaults)
    _FORM_KEYS[:] = list(form)
    view, history = _live_view(view), _history_view()
    _wire(manager, profile, form, preset, estimate, preview_info, preview_table, preview_button, start, stop,
          view, history)
    _wire_hub(form, hub)
    # Shares Start's concurrency slot: a resume and a start pressed together still give one training job.
    resume.click(bind(resume_run, manager), view["watching"], [view["watching"], view["status"]],
                 api_name="resume_run", concurrency_limit=1, concurrency_id="train-start")
    _wire_lora_aid(form, lora_aid)
    return {**form, "preset": preset, "estimate": estimate, "start": start, "stop": stop, "resume": resume,
            "lora_aid": lora_aid,
            **view, **history}


def _wire_hub(form: dict[str, Any], hub: dict[str, Any]) -> None:
    form["data_kind"].change(toggle_data_kind, form["data_kind"], [form["data_bundled"], hub["box"], form["data_file"]],
                             api_visibility="private")
    hub["list"].click(list_hub_options, [form["data_hub_name"], form["data_hub_config"]],
                      [form["data_hub_config"], form["data_split"], hub["info"]], api_name="hub_listing")


def _wire_lora_aid(form: dict[str, Any], lora_aid: Any) -> None:
    inputs = [form[k] for k in ("model_source", "lora_rank", "lora_alpha", "lora_target_modules", "model_bits",
                                "model_quant_type", "model_double_quant", "training_optimizer", "lora_init")]
    gr.on([c.change for c in inputs], lora_aid_markdown, inputs, lora_aid, api_name="lora_aid",
          show_progress="hidden", trigger_mode="always_last")
    on_page_load(lora_aid_markdown, inputs, lora_aid)


def _wire(manager: RunManager, profile: HardwareProfile, form: dict[str, Any], preset: Any, estimate: Any,
          preview_info: Any, preview_table: Any, preview_button: Any, start: Any, stop: Any,
          view: dict[str, Any], history: dict[str, Any]) -> None:
    form_list = list(form.values())
    preset.change(load_preset, preset, form_list, api_name="load_preset")
    # .input, not .change: only a person's pick clears the source; a preset or a reload that restores a run's form
    # sets the kind and the source together, and a .change raced that and emptied the restored source.
    form["model_kind"].input(choose_model_kind, [form["model_kind"], form["model_source"]], form["model_source"],
                             api_visibility="private")
    form["lora_method"].change(show_method_fields, form["lora_method"], [form[k] for k in METHOD_FIELDS],
                               api_visibility="private")
    estimate_inputs = [form[k] for k in ("lora_method", "lora_init", "lora_num_virtual_tokens",
                                         "lora_ia3_feedforward_modules", "model_source", "model_bits", "model_quant_type", "model_double_quant",
                                         "lora_rank", "lora_target_modules", "lora_bias", "training_batch_size",
                                         "data_max_seq_length", "training_gradient_checkpointing", "training_padding_free",
                                         "training_liger_kernels", "training_cpu_lm_head",
                                         "training_optimizer", "model_compute_dtype", "training_processes",
                                         "training_strategy", "training_gradient_accumulation")]
    estimate_fn = functools.partial(update_estimate, profile, manager.root)  # calibrated on this folder's runs
    gr.on([c.change for c in estimate_inputs], estimate_fn, inputs_kwargs=form,
          outputs=estimate, api_name="estimate", show_progress="hidden", trigger_mode="always_last", **ESTIMATE_SLOT)
    data_inputs = [form[k] for k in ("data_kind", "data_bundled", "data_file", "data_split", "data_format",
                                     "column_mapping_json", "data_skip_bad_rows")]
    gr.on([preview_button.click] + [c.change for c in data_inputs], preview_dataset, inputs_kwargs=form,
          outputs=[preview_info, preview_table], api_name="preview_data", trigger_mode="always_last", **PREVIEW_SLOT)
    start.click(bind(start_run, manager), inputs_kwargs=form,
                outputs=[view["watching"], view["status"]], api_name="start_run",
                concurrency_limit=1, concurrency_id="train-start")
    stop.click(bind(stop_run, manager), view["watching"], view["status"], api_name="stop_run")
    live = [view[k] for k in ("watching", "status", "progress", "loss_plot", "lr_plot", "log", "log_box")]
    timer = gr.Timer(POLL_SECONDS)
    timer.tick(bind(poll_run, manager), view["watching"], live, api_name="poll_run",
               show_progress="hidden", queue=False)
    refresh = bind(run_history, manager)
    history_out = [history["history"], history["compare_ids"], history["delete_id"], history["disk"]]
    history["refresh"].click(refresh, history["compare_ids"], history_out, api_name="run_history")
    history["delete"].click(bind(ask_delete, manager), history["delete_id"],
                            [history["delete_note"], history["confirm_delete"]], api_name="ask_delete")
    history["confirm_delete"].click(bind(delete_run, manager), history["delete_id"],
                                    [history["delete_note"], history["confirm_delete"]], api_name="delete_run"
                                    ).then(refresh, history["compare_ids"], history_out, api_visibility="private")
    view["status"].change(refresh, history["compare_ids"], history_out, api_visibility="private",
                          show_progress="hidden")
    history["compare_ids"].change(bind(compare_runs, manager), history["compare_ids"],
                                  history["compare_plot"], api_name="compare_runs")
    on_page_load(bind(poll_run, manager), view["watching"], live)  # re-attaches to the active run
    on_page_load(refresh, history["compare_ids"], history_out)
    on_page_load(bind(restore_form, manager), None, form_list)
    on_page_load(estimate_fn, inputs_kwargs=form, outputs=estimate)
