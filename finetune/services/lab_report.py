"""The lab report a learner downloads: one self-contained HTML file (and a Markdown copy) with their runs'
settings, loss curves as embedded PNG images, the answers they voted on, the verdicts with their intervals, the
quantization table, the forgetting check and the course's "what to notice" sentences.

Only the visitor's own runs, votes and checks go in (the runs they own, not every run they may see), and no
server path: sources are shown by name (``paths.display_name``), images are embedded as data, nothing links to
the server.

    html, markdown = render(collect(manager, visitor, progress, feedback_db, benchmarks))
"""

from __future__ import annotations

import base64
import html
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.core.access import Visitor
from finetune.core.paths import display_name
from finetune.services.benchmarks import BenchmarkService, TableRow
from finetune.services.course import REPORT_SECTIONS
from finetune.services.evaluate import judge_accuracy, win_rate
from finetune.services.export import draw_loss_plot, losses
from finetune.services.feedback import FeedbackStore
from finetune.services.runs import RunManager

RUN_COLUMNS = ["run", "stage", "model", "data", "bits", "rank", "alpha", "dropout", "learning rate", "steps",
               "final loss", "final held-out loss", "time (s)", "state"]
QUANT_COLUMNS = ["format", "quantized layers (MB)", "perplexity"]
FORGETTING_COLUMNS = ["adapter", "task", "metric", "items", "base", "adapter score", "difference", "verdict"]


@dataclass
class ReportRun:
    cells: list[Any]
    curve_png: bytes | None


@dataclass
class ReportData:
    who: str
    made: str
    sentences: list[tuple[str, str]] = field(default_factory=list)   # (step title, sentence)
    runs: list[ReportRun] = field(default_factory=list)
    turns: list[dict[str, str]] = field(default_factory=list)        # prompt, base, tuned, vote
    verdicts: list[str] = field(default_factory=list)
    quantization: list[list[Any]] = field(default_factory=list)
    forgetting: list[list[Any]] = field(default_factory=list)


# --- what goes in -------------------------------------------------------------------------------------------

def _same_owner(owner: str | None, visitor: Visitor) -> bool:
    mine = visitor.owner
    return (owner or "").lower() == (mine or "").lower() if mine or owner else True


def own_runs(manager: RunManager, visitor: Visitor) -> list[str]:
    """The runs ``visitor`` owns (oldest first): an operator's report holds their own runs, not everyone's."""
    return [run_id for run_id in reversed(manager.visible_ids(visitor))
            if _same_owner(manager.owner_of(run_id), visitor)]


def _curve_png(run_dir: Path) -> bytes | None:
    with tempfile.TemporaryDirectory() as folder:
        path = draw_loss_plot(losses(run_dir), Path(folder) / "loss.png", size=(560, 300))
        return path.read_bytes() if path else None


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else float(f"{value:.{digits}g}")


def _run_row(manager: RunManager, run_id: str) -> ReportRun:
    run, folder = manager.summary(run_id), manager.run_dir(run_id)
    cfg = run.config
    settings = ([cfg.stage, display_name(cfg.model.source), display_name(cfg.data.source), cfg.model.bits,
                 cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.training.learning_rate]
                if cfg else ["?"] * 8)
    return ReportRun([run_id, *settings, f"{run.step}/{run.max_steps or '?'}", _round(run.final_loss),
                      _round(run.final_eval_loss), run.duration, run.state], _curve_png(folder))


def _verdicts(manager: RunManager, runs: list[str], progress: dict[str, Any],
              win_counts: dict[str, dict[str, int]]) -> list[str]:
    lines = []
    for run_id in runs:
        cfg = manager.summary(run_id).config
        if cfg is not None and cfg.stage == "reward":
            lines.append(f"Reward model {run_id}: {judge_accuracy(manager.run_dir(run_id)).text()}.")
        if run_id in win_counts:
            rate = win_rate(run_id, win_counts[run_id])
            if rate.votes:
                lines.append(f"Your votes on {run_id}: {rate.votes}, win rate {rate.rate:.2f} "
                             f"(95% interval {rate.low:.2f}-{rate.high:.2f}).")
    lines += list((progress.get("evaluate", {}).get("result") or {}).get("verdicts") or [])
    return lines


def _forgetting(benchmarks: BenchmarkService | None, visitor: Visitor) -> list[list[Any]]:
    """The newest forgetting check the visitor ran themselves (not one they may merely see)."""
    job = benchmarks.latest_job(visitor) if benchmarks is not None else None
    if not job or not _same_owner(benchmarks.owner_of(job), visitor):
        return []
    rows: list[TableRow] = benchmarks.table(job)
    return [[row.adapter, row.task, row.metric, row.items, _round(row.base), _round(row.tuned),
             _round(row.difference), row.verdict] for row in rows]


def collect(manager: RunManager, visitor: Visitor, progress: dict[str, Any], feedback_db: str | Path | None = None,
            benchmarks: BenchmarkService | None = None) -> ReportData:
    """Everything the report shows, for ``visitor`` only."""
    runs = own_runs(manager, visitor)
    counts: dict[str, dict[str, int]] = {}
    if feedback_db is not None and Path(feedback_db).is_file():
        store = FeedbackStore(feedback_db)
        try:  # the local user (owner None) reads every vote: they are all theirs
            counts = store.win_counts(visitor.owner if visitor.sign_in else None)
        finally:
            store.close()
    sentences = [(title, str((progress.get(key, {}).get("result") or {}).get("sentence")))
                 for key, title in REPORT_SECTIONS if (progress.get(key, {}).get("result") or {}).get("sentence")]
    quant = (progress.get("quantization", {}).get("result") or {}).get("table") or []
    turns = (progress.get("chat", {}).get("result") or {}).get("turns") or []
    return ReportData(visitor.label, time.strftime("%Y-%m-%d %H:%M"), sentences,
                      [_run_row(manager, run_id) for run_id in runs], list(turns),
                      _verdicts(manager, runs, progress, counts), [list(r) for r in quant],
                      _forgetting(benchmarks, visitor))


# --- rendering ----------------------------------------------------------------------------------------------

def _cell(value: Any) -> str:
    return "–" if value is None else str(value)


def _html_table(columns: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _md_table(columns: list[str], rows: list[list[Any]]) -> str:
    def clean(value: Any) -> str:
        return _cell(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(clean(v) for v in row) + " |" for row in rows])


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


STYLE = ("body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#111}"
         "table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.9em}td,th{border:1px solid #ccc;"
         "padding:4px 8px;text-align:left;vertical-align:top}th{background:#f3f4f6}"
         ".pair{display:grid;grid-template-columns:1fr 1fr;gap:1em}.pair div{background:#f9fafb;padding:.5em;"
         "border:1px solid #e5e7eb;white-space:pre-wrap}li{margin:.3em 0}")


def _code_spans(escaped: str) -> str:
    """The sentences are written for Markdown (run names in `backticks`): in HTML they become <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)


def render_html(data: ReportData) -> str:
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>LoRA Lab report</title>"
             f"<style>{STYLE}</style></head><body><h1>LoRA Lab: lab report</h1>"
             f"<p>{e(data.who)} · {e(data.made)}</p>", "<h2>What to notice</h2>"]
    parts.append("<ul>" + "".join(f"<li><b>{e(t)}:</b> {_code_spans(e(s))}</li>" for t, s in data.sentences) + "</ul>"
                 if data.sentences else "<p>No course step done yet.</p>")
    parts.append("<h2>Runs</h2>" + (_html_table(RUN_COLUMNS, [r.cells for r in data.runs]) if data.runs
                                    else "<p>No runs yet.</p>"))
    for run in data.runs:
        if run.curve_png:
            parts.append(f"<h3>Loss of {e(str(run.cells[0]))}</h3><img alt='loss curve of {e(str(run.cells[0]))}' "
                         f"src='{_data_uri(run.curve_png)}'>")
    parts.append("<h2>The answers you voted on</h2>")
    for turn in data.turns:
        parts.append(f"<p><b>Prompt:</b> {e(turn.get('prompt', ''))} · <b>your vote:</b> "
                     f"{e(turn.get('vote') or '–')}</p><div class='pair'><div><b>Base</b>\n{e(turn.get('base', ''))}</div>"
                     f"<div><b>Tuned ({e(turn.get('adapter', ''))})</b>\n{e(turn.get('tuned', ''))}</div></div>")
    if not data.turns:
        parts.append("<p>No votes in the course yet.</p>")
    parts.append("<h2>Verdicts</h2>" + ("<ul>" + "".join(f"<li>{e(v)}</li>" for v in data.verdicts) + "</ul>"
                                        if data.verdicts else "<p>No verdicts yet.</p>"))
    parts.append("<h2>Quantization</h2>" + (_html_table(QUANT_COLUMNS, data.quantization) if data.quantization
                                            else "<p>Not measured yet.</p>"))
    parts.append("<h2>Forgetting check</h2>" + (_html_table(FORGETTING_COLUMNS, data.forgetting) if data.forgetting
                                                else "<p>No forgetting check yet (the Evaluate tab's Benchmarks)."
                                                     "</p>"))
    return "\n".join(parts) + "</body></html>\n"


def render_markdown(data: ReportData) -> str:
    parts = [f"# LoRA Lab: lab report\n\n{data.who} · {data.made}", "## What to notice"]
    parts.append("\n".join(f"- **{t}:** {s}" for t, s in data.sentences) or "No course step done yet.")
    runs = _md_table(RUN_COLUMNS, [r.cells for r in data.runs]) if data.runs else "No runs yet."
    parts.append("## Runs\n\n" + runs)
    parts += [f"![loss of {r.cells[0]}]({_data_uri(r.curve_png)})" for r in data.runs if r.curve_png]
    parts.append("## The answers you voted on")
    parts += [f"**Prompt:** {t.get('prompt', '')} · **your vote:** {t.get('vote') or '–'}\n\n"
              f"- **Base:** {t.get('base', '')}\n- **Tuned ({t.get('adapter', '')}):** {t.get('tuned', '')}"
              for t in data.turns] or ["No votes in the course yet."]
    parts.append("## Verdicts\n\n" + ("\n".join(f"- {v}" for v in data.verdicts) or "No verdicts yet."))
    parts.append("## Quantization\n\n" + (_md_table(QUANT_COLUMNS, data.quantization) if data.quantization
                                          else "Not measured yet."))
    parts.append("## Forgetting check\n\n" + (_md_table(FORGETTING_COLUMNS, data.forgetting) if data.forgetting
                                              else "No forgetting check yet (the Evaluate tab's Benchmarks)."))
    return "\n\n".join(parts) + "\n"


def write_report(data: ReportData, folder: str | Path) -> tuple[Path, Path]:
    """lab-report.html and lab-report.md in ``folder`` (the visitor's own course folder)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    page, text = folder / "lab-report.html", folder / "lab-report.md"
    page.write_text(render_html(data), encoding="utf-8")
    text.write_text(render_markdown(data), encoding="utf-8")
    return page, text
