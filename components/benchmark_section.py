"""The Evaluate tab's benchmark section: standard tasks through lm-evaluation-harness, base vs adapter.

Start plans the job (every refusal, with its reason, before a child starts), shows the rough time estimate and
hands the job to ``finetune.services.benchmarks.BenchmarkService``: it waits in the device queue with the training
runs ("waiting: 2nd in line behind run X") and then runs the harness in a child process. A ``gr.Timer`` reads the
job folder: its place in the queue, progress, then the table. Stop takes a waiting job out of the queue and ends a
running one at its next model call.
"""

from __future__ import annotations

import math
import time
from typing import Any

import gradio as gr
import pandas as pd

from components.page_loads import on_page_load
from components.shared import bind, duration, place_in_line, refusal, require_visible, visible_adapters, visitor_of
from finetune.core.access import AccessDenied, Visitor, can_view, require_owner, require_signed_in
from finetune.core.config import ConfigError
from finetune.core.paths import model_source as gated_model_source
from finetune.services.benchmarks import (BUNDLED_TASK, FORGETTING_CHECK_LIMIT, FORGETTING_CHECK_ONLINE, MIN_ITEMS,
                                          Z_95, BenchmarkError, BenchmarkService, TableRow, base_only_rows,
                                          forgetting_check_tasks)
from finetune.services.admission import RunError
from finetune.services.runs import RunManager

POLL_SECONDS = 2.0
TABLE_COLUMNS = ["task", "metric", "adapter", "base", "base ± se", "adapter score", "adapter ± se", "difference",
                 "difference ± se", "se kind", "items", "verdict"]
BASE_COLUMNS = ["model", "task", "metric", "score", "± se"]
LIVE_STATES = ("waiting", "queued", "running")

LEARN_BENCHMARKS = f"""**Validation loss vs benchmark accuracy.** Validation loss measures how well the model predicts
*your* held-out answers, so it shows what fine-tuning taught; benchmark accuracy measures general skills on questions
unrelated to your data, so it shows what fine-tuning may have cost (forgetting). The **forgetting check** runs
general tasks on the base and on each adapter (the base at the adapter's own bit width): offline the bundled
`{BUNDLED_TASK}` (60 questions written for LoRA Lab), with the Hub also {', '.join(FORGETTING_CHECK_ONLINE[1:])}.
Base and adapter answer the same questions, so the difference's standard error is the paired one (per-question
differences); "no measurable change" means the difference is within {Z_95} × that error, and fewer than
{MIN_ITEMS} questions give no verdict at all."""


# --- handlers ------------------------------------------------------------------------------------------------------

def adapter_choices(manager: RunManager, current: list[str] | None = None, request: gr.Request = None) -> Any:
    ids = list(visible_adapters(manager, visitor_of(request)))
    return gr.Dropdown(choices=ids, value=[run_id for run_id in current or [] if run_id in ids], multiselect=True)


def forgetting_preset() -> tuple[Any, float]:
    """The preset's tasks (what this machine can reach) and limit."""
    return gr.Dropdown(value=forgetting_check_tasks()), FORGETTING_CHECK_LIMIT


def _plan(manager: RunManager, service: BenchmarkService, adapters: list[str] | None, model: str, bits: Any,
          tasks: list[str] | None, limit: Any, visitor: Visitor) -> Any:
    # Only the runs' own adapters (those the visitor may see): a typed folder path would let a visitor point the
    # harness at any folder.
    try:
        for run_id in adapters or []:
            require_visible(manager, run_id, visitor, "benchmark this run")
    except AccessDenied as error:
        raise refusal(str(error)) from None
    unknown = [a for a in adapters or [] if a not in manager.finished_adapters()]
    if unknown:
        raise refusal(f"No saved adapter for run(s): {', '.join(unknown)}; pick finished runs from the list.")
    try:
        source = gated_model_source(model or "")
        return service.plan(list(tasks or []), limit, list(adapters or []), source or None, int(bits or 4))
    except (BenchmarkError, ConfigError) as error:
        raise refusal(str(error)) from None


def estimate_benchmark(manager: RunManager, service: BenchmarkService, adapters: list[str] | None, model: str, bits: Any,
                       tasks: list[str] | None, limit: Any, request: gr.Request = None) -> str:
    return _plan(manager, service, adapters, model, bits, tasks, limit, visitor_of(request)).estimate_text()


def start_benchmark(manager: RunManager, service: BenchmarkService, adapters: list[str] | None, model: str, bits: Any,
                    tasks: list[str] | None, limit: Any, request: gr.Request = None) -> tuple[str, str]:
    """(job id, message with the estimate); a refusal names the problem and starts nothing."""
    visitor = visitor_of(request)
    try:
        require_signed_in(visitor, "run a benchmark")
    except AccessDenied as error:
        raise refusal(str(error)) from None
    plan = _plan(manager, service, adapters, model, bits, tasks, limit, visitor)
    try:
        job_id = service.start(plan, visitor)
    except (BenchmarkError, RunError, AccessDenied) as error:
        raise refusal(str(error)) from None
    status = service.status(job_id)
    if status.get("state") == "waiting":
        return job_id, f"Queued {job_id} ({queue_line(service, status, visitor)}): {plan.estimate_text()}"
    return job_id, f"Started {job_id}: {plan.estimate_text()}"


def visible_job(service: BenchmarkService, job_id: str | None, visitor: Visitor) -> str:
    """The job id if it names a job ``visitor`` may see, else '' (another visitor's job is not shown)."""
    try:
        return job_id if job_id and can_view(visitor, service.owner_of(job_id)) else ""
    except BenchmarkError:
        return ""


def stop_benchmark(service: BenchmarkService, job_id: str, request: gr.Request = None) -> str:
    visitor = visitor_of(request)
    job_id = visible_job(service, job_id, visitor)
    if not job_id or not service.running(job_id):
        return "No benchmark is running."
    try:
        require_owner(visitor, service.owner_of(job_id), "stop this benchmark", f"benchmark {job_id}")
        status = service.request_stop(job_id, visitor)
    except (AccessDenied, RunError) as error:
        return f"**Not stopped:** {error}"
    if status.get("state") == "cancelled":
        return f"Took {job_id} out of the queue; it never started."
    return f"Stopping {job_id} at its next model call."


def latest_visible_job(service: BenchmarkService, request: gr.Request = None) -> str:
    """On a page load: the newest job the visitor may see, to re-attach to."""
    return service.latest_job(visitor_of(request)) or ""


def _number(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, 4)


def table_frame(rows: list[TableRow]) -> pd.DataFrame:
    return pd.DataFrame([[r.task, r.metric, r.adapter, _number(r.base), _number(r.base_stderr), _number(r.tuned),
                          _number(r.tuned_stderr), _number(r.difference), _number(r.difference_stderr),
                          r.stderr_kind, r.items, r.verdict] for r in rows], columns=TABLE_COLUMNS)


def queue_line(service: BenchmarkService, status: dict[str, Any], visitor: Visitor) -> str:
    """A waiting job's place, "2nd in line behind run X": the job on the device counts as the first in line. A job
    the visitor may not see is not named."""
    ahead = status.get("ahead") or []
    names = [_job_name(service, job_id, visitor) for job_id in ahead]
    behind = f" behind {', '.join(names[:-1])} and {names[-1]}" if len(names) > 1 else \
        f" behind {names[0]}" if names else ""
    starts = status.get("starts_in")
    when = f"; starts in about {duration(starts)}" if isinstance(starts, (int, float)) and ahead else ""
    return f"{place_in_line(len(ahead))}{behind}{when}"


def _job_name(service: BenchmarkService, job_id: str, visitor: Visitor) -> str:
    manager, kind = service.manager, service.manager.kind_name(job_id)
    try:
        visible = can_view(visitor, manager.owner_of(job_id))
    except RunError:
        visible = False
    if not visible:
        return f"another visitor's {kind}"
    return f"`{job_id}`" if job_id.startswith(kind) else f"{kind} `{job_id}`"  # not "run `run-…`"


def progress_text(status: dict[str, Any], plan: Any = None, now: float | None = None) -> str:
    state = status.get("state", "unknown")
    if state == "waiting":
        return f"**waiting**: {status.get('queue_line', 'in the device queue')}"
    if state not in LIVE_STATES:
        error = f": {status['error']}" if status.get("error") else ""
        return f"**{state}**{error}"
    done, total = status.get("requests_done", 0), status.get("requests_total", 0)
    unit = f"run {status.get('unit', 0) + 1} of {status.get('units', '?')}"
    what = f" — {status['unit_label']} on {status['task']}" if status.get("unit_label") else ""
    return f"**{state}** {unit}{what}: about {done}/{total} answer choices scored{remaining_text(status, plan, now)}"


def remaining_text(status: dict[str, Any], plan: Any, now: float | None = None) -> str:
    """The time left at the pace measured in this job so far (this run's elapsed time over what it scored, its
    model loading included), re-measured at every poll; the plan's estimate came from an earlier job's pace."""
    started, done = status.get("unit_started_at"), status.get("requests_done") or 0
    if not isinstance(started, (int, float)) or done <= 0 or plan is None:
        return ""
    pace = max((now if now is not None else time.time()) - started, 0.0) / done
    index = int(status.get("unit") or 0)
    later = sum(u.requests for u in plan.units[index + 1:] if not u.cached)
    left = pace * (max(int(status.get("requests_total") or 0) - done, 0) + later)
    return f" · about {duration(left)} left at {pace:.2f} s per answer choice, measured in this job"


def poll_benchmark(service: BenchmarkService, job_id: str,
                   request: gr.Request = None) -> tuple[str, pd.DataFrame, pd.DataFrame]:
    """(progress or place in the queue, base-vs-adapter table, base scores) of the job; blank without one (or for
    a job the visitor may not see)."""
    empty = pd.DataFrame(columns=TABLE_COLUMNS), pd.DataFrame(columns=BASE_COLUMNS)
    visitor = visitor_of(request)
    job_id = visible_job(service, job_id, visitor)
    if not job_id or not service.job(job_id).planned():
        return "", *empty
    job = service.job(job_id)
    plan, results = job.plan(), job.results()
    base = pd.DataFrame([[r["model"], r["task"], r["metric"], _number(r["score"]), _number(r["stderr"])]
                         for r in base_only_rows(plan, results)], columns=BASE_COLUMNS)
    status = service.status(job_id)
    if status.get("state") == "waiting":
        status["queue_line"] = queue_line(service, status, visitor)
    return progress_text(status, plan), table_frame(service.table(job_id)), base


# --- layout -----------------------------------------------------------------------------------------------------------

def _layout() -> dict[str, Any]:
    ui: dict[str, Any] = {}
    gr.Markdown(LEARN_BENCHMARKS, elem_id="benchmark-learn")
    with gr.Row():
        ui["adapters"] = gr.Dropdown([], multiselect=True, label="Adapters (runs)", elem_id="benchmark-adapters",
                                     allow_custom_value=True, scale=3,
                                     info="Each is compared with its own base at the bit width it trained at.")
        ui["refresh"] = gr.Button("Refresh runs", size="sm", scale=1)
    with gr.Row():
        ui["model"] = gr.Textbox(label="Base model", elem_id="benchmark-model", placeholder="each adapter's own",
                                 info="Empty: each adapter's base. With no adapter: this model alone.")
        ui["bits"] = gr.Dropdown([4, 8, 16, 32], value=4, label="Bits (base alone)", elem_id="benchmark-bits")
    with gr.Row():
        ui["tasks"] = gr.Dropdown(list(dict.fromkeys([BUNDLED_TASK, *FORGETTING_CHECK_ONLINE, "mmlu", "gsm8k"])),
                                  value=[BUNDLED_TASK], multiselect=True, allow_custom_value=True, scale=3,
                                  label="Tasks", elem_id="benchmark-tasks",
                                  info="Any lm-evaluation-harness task; all but the bundled one need the Hub.")
        ui["limit"] = gr.Number(value=60, precision=0, minimum=1, label="Items per task", elem_id="benchmark-limit")
    with gr.Row():
        ui["preset"] = gr.Button("Forgetting check", elem_id="benchmark-preset")
        ui["estimate"] = gr.Button("Estimate time", elem_id="benchmark-estimate")
        ui["start"] = gr.Button("Run benchmarks", variant="primary", elem_id="benchmark-start")
        ui["stop"] = gr.Button("Stop", variant="stop", elem_id="benchmark-stop")
    ui["job"] = gr.Textbox(label="Job", interactive=False, elem_id="benchmark-job")
    ui["message"] = gr.Markdown(elem_id="benchmark-message")
    ui["progress"] = gr.Markdown(elem_id="benchmark-progress")
    ui["table"] = gr.Dataframe(pd.DataFrame(columns=TABLE_COLUMNS), interactive=False, wrap=False,
                               label="Base vs adapter", elem_id="benchmark-table")
    ui["base_table"] = gr.Dataframe(pd.DataFrame(columns=BASE_COLUMNS), interactive=False,
                                    label="Base scores", elem_id="benchmark-base-table")
    return ui


def build_benchmark_section(manager: RunManager, service: BenchmarkService) -> None:
    """The section, inside whatever Accordion or Tab the caller opened."""
    with gr.Accordion("Benchmarks: what did fine-tuning cost? (lm-evaluation-harness)", open=False):
        ui = _layout()
    _wire(manager, service, ui)


def _wire(manager: RunManager, service: BenchmarkService, ui: dict[str, Any]) -> None:
    form = [ui["adapters"], ui["model"], ui["bits"], ui["tasks"], ui["limit"]]
    live = [ui["progress"], ui["table"], ui["base_table"]]
    ui["refresh"].click(bind(adapter_choices, manager), ui["adapters"], ui["adapters"],
                        api_name="benchmark_runs")
    ui["preset"].click(forgetting_preset, None, [ui["tasks"], ui["limit"]], api_name="benchmark_preset")
    ui["estimate"].click(bind(estimate_benchmark, manager, service), form, ui["message"], api_name="benchmark_estimate")
    ui["start"].click(bind(start_benchmark, manager, service), form, [ui["job"], ui["message"]], api_name="benchmark_start",
                      concurrency_limit=1, concurrency_id="benchmark-start")
    ui["stop"].click(bind(stop_benchmark, service), ui["job"], ui["message"], api_name="benchmark_stop")
    gr.Timer(POLL_SECONDS).tick(bind(poll_benchmark, service), ui["job"], live, api_name="benchmark_poll",
                                show_progress="hidden", queue=False)
    on_page_load(bind(adapter_choices, manager), ui["adapters"], ui["adapters"])
    on_page_load(bind(latest_visible_job, service), None, ui["job"])
