"""The Train tab's runs, apart from its layout: start and resume, the live view of the watched run (status line,
loss and learning-rate frames, progress), the run history with its headline metrics, comparing runs, deleting one.
Not a tab: components/train_tab.py wires these handlers (its api_names) to its controls."""

from __future__ import annotations

import time
from typing import Any, Iterator

import gradio as gr
import pandas as pd

from components.shared import (duration, live_status, points_frame, problems_markdown, progress_html, queue_place,
                               series_frame, started_message, visitor_of, watched_run)
from components.train_form import config_from_form
from finetune.core import paths
from finetune.core.access import AccessDenied, can_act
from finetune.core.config import ConfigError, RunConfig, load_config
from finetune.core.distributed import effective_batch
from finetune.core.estimate import memory_check_text
from finetune.core.metrics import early_stop_note, headline_metric, is_summary, loss_key, rows_of_saved_model
from finetune.core.rewards import parse_rules
from finetune.core.run_folder import ADAPTER_DIR, RUN_CONFIG, has_adapter, read_run_info
from finetune.core.run_status import read_metrics
from finetune.core.storage import folder_bytes, human, usage
from finetune.services.admission import RunError, check_sources
from finetune.services.runs import RunManager

# Each run with its stage and the number that stage is judged by (finetune.core.metrics.HEADLINE_METRICS): a reward
# model's loss or a DPO policy's final loss alone would not say whether it learned anything.
HISTORY_COLUMNS = ["run id", "stage", "headline metric", "headline value", "model", "dataset", "rank", "alpha",
                   "lr", "bits", "steps", "final loss", "final eval loss", "status", "duration (s)", "method",
                   "rows skipped", "processes", "effective batch", "reward"]
# run_info.json's counts of rows a run left out of its data: malformed lines (skipped with data.skip_bad_rows), rows
# with missing fields or unusable pairs, rows longer than max_seq_length.
SKIPPED_FIELDS = ("malformed_rows", "skipped_rows", "dropped_too_long")


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


def run_status_text(run_id: str, status: dict[str, Any], adapter_saved: bool = True) -> str:
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


NO_RUNS = "No runs yet: set up a run and press Start."


def poll_run(manager: RunManager, run_id: str, request: gr.Request = None) -> tuple[Any, ...]:
    """Everything the live view shows, read from the run folder (cheap enough for a 2 s timer); only runs the
    visitor may see."""
    visitor, asked = visitor_of(request), run_id
    run_id = watched_run(manager, manager.visible_ids(visitor), run_id, visitor)
    if not run_id:
        # Watching nothing, the status line may hold Start's refusal (a broken file): a tick keeps it. A run that was
        # watched and is gone (deleted, or not the visitor's) is said.
        return ("", NO_RUNS if asked else gr.skip(), progress_html("train-progress", {"state": "idle"}, []),
                loss_frame([]), lr_frame([]), "", gr.Accordion(open=False))
    status, rows = live_status(manager, run_id), read_metrics(manager.run_dir(run_id))
    stalled = status.get("stalled_seconds") is not None
    failed = status.get("state") == "failed"
    adapter_saved = has_adapter(manager.run_dir(run_id) / ADAPTER_DIR)
    text = run_status_text(run_id, status, adapter_saved)
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
                     rows_skipped(manager.run_dir(run.run_id)), *_processes_cells(cfg),
                     reward_text(cfg) if cfg else "", status.get("owner") or ""])
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


def reward_text(cfg: RunConfig) -> str:
    """A GRPO run's reward terms with their weights, as its config declares them ("" for other stages): what the
    run was pushed towards, read in the history beside its result."""
    if cfg.stage != "grpo":
        return ""
    said = {rule.name: rule.describe() for rule in parse_rules(cfg.preference.rewards)}
    said.update(reward_model=f"`{cfg.preference.reward_model}`", python_reward=cfg.preference.reward_file)
    return " + ".join(f"{name} ×{weight:g} ({said[name]})" for name, weight in cfg.preference.reward_weights().items())


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
