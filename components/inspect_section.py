"""The Evaluate tab's "Inside the adapter" section: what a LoRA run changed, layer by layer, and how two runs relate.

One run: a heat map over layers x module types of the update's size relative to the frozen weight, the mean per
module type, how the update's energy spreads over its directions (against random B·A of the same shapes), and the
most changed matrices. Two runs on the same base: how much the directions their updates write into overlap.
All numbers come from finetune.services.adapter_inspect, on the CPU, from the saved adapter and the base's safetensors.
"""

from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd

from components.page_loads import on_page_load
from components.shared import bind, refusal, require_visible, visible_adapters, visitor_of
from finetune.core import paths
from finetune.core.access import AccessDenied, Visitor
from finetune.services.adapter_inspect import (ENERGY, AdapterReport, InspectError, RunComparison, compare_updates,
                                               energy_curve, inspect_run, random_singular_values)
from finetune.services.runs import RunManager

TOP_MATRICES = 5            # matrices drawn in the energy chart and listed first in the table
TOP_COLUMNS = ["matrix", "layer", "module", "rank set", "effective rank", "update / weight (%)"]
MATCH_COLUMNS = ["matrix", "layer", "module", "directions", "output overlap", "input overlap", "chance overlap",
                 "output angles (°)"]

LEARN_INSPECT = f"""**Inside the adapter.** A LoRA adapter adds ΔW = s·B·A to each frozen weight W it targets (s =
alpha/r, or alpha/√r for rsLoRA). *Update / weight* is ‖ΔW‖ / ‖W‖ (Frobenius norms): how big the change is next to the
weight it changes. ΔW has at most r independent directions; its singular values say how strongly each one is used,
and the **effective rank** is the fewest directions that hold {ENERGY:.0%} of its energy (the sum of squared singular
values). Random B and A of the same shapes would spread their energy over most of the r directions, so an effective
rank well below that means training concentrated the update. For two runs on the same base, the **overlap** of
their top-k directions is ‖U₁ᵀU₂‖² / k (1 = the same subspace, 0 = orthogonal; the principal angles say the same in
degrees); two random subspaces of that size would overlap about k / d."""


def inspect_runs(manager: RunManager, current: str | None = None,
                 other: str | None = None, request: gr.Request = None) -> tuple[Any, Any]:
    """The runs with a saved adapter that the visitor may see, for both pickers."""
    ids = list(visible_adapters(manager, visitor_of(request)))
    first = current if current in ids else (ids[0] if ids else None)
    second = other if other in ids else None
    return gr.Dropdown(choices=ids, value=first), gr.Dropdown(choices=ids, value=second)


def _run_dir(manager: RunManager, run_id: str | None, visitor: Visitor) -> Any:
    if not run_id:
        raise refusal("Pick a finished run to inspect (train one in the Train tab).")
    try:
        require_visible(manager, run_id, visitor, "inspect this run")
    except AccessDenied as error:
        raise refusal(str(error)) from None
    adapters = manager.finished_adapters()
    if run_id not in adapters:
        try:
            paths.run_id_or_folder(run_id)  # a path gets the gate's one message, never echoed back
        except paths.PathRefused as error:
            raise refusal(str(error)) from None
        raise refusal(f"No saved adapter for run '{run_id}': pick a finished run from the list.")
    return manager.run_dir(run_id)


HEAT_COLUMNS = ["module", "layer", "change percentile", "update / weight (%)", "effective rank", "matrix"]


def heat_frame(report: AdapterReport) -> pd.DataFrame:
    """One point per (layer, module type): the heat map's data. The colour is the matrix's percentile among all
    adapted matrices, not the raw ratio: one large outlier (often layer 0) would otherwise wash every other point
    out to the palest colour. The raw ratio is in the tooltip."""
    rows = [{"module": m.module, "layer": m.layer if m.layer is not None else -1,
             "update / weight (%)": round(100 * m.relative_norm, 4), "effective rank": m.effective_rank,
             "matrix": m.name} for m in report.modules]
    frame = pd.DataFrame(rows, columns=[c for c in HEAT_COLUMNS if c != "change percentile"])
    frame.insert(2, "change percentile", (frame["update / weight (%)"].rank(pct=True) * 100).round(1))
    return frame


def layer_frame(report: AdapterReport) -> pd.DataFrame:
    """Update / weight by layer, one line per module type."""
    rows = [{"layer": m.layer, "update / weight (%)": round(100 * m.relative_norm, 4), "module": m.module}
            for m in report.modules if m.layer is not None]
    return pd.DataFrame(rows, columns=["layer", "update / weight (%)", "module"])


def module_type_frame(report: AdapterReport) -> pd.DataFrame:
    return pd.DataFrame([{"module": name, "mean update / weight (%)": round(100 * value, 4)}
                         for name, value in report.by_module_type().items()],
                        columns=["module", "mean update / weight (%)"])


def energy_frame(report: AdapterReport) -> pd.DataFrame:
    """Cumulative energy by direction for the most changed matrices and for random B·A of the first one's shape."""
    rows = []
    for module in report.top_changed(TOP_MATRICES):
        rows += [{"directions": i + 1, "energy held (%)": round(100 * share, 2), "matrix": module.name}
                 for i, share in enumerate(energy_curve(module.singular_values))]
    if report.modules:
        first = report.top_changed(1)[0]
        random_curve = energy_curve(random_singular_values(first.shape, first.rank))
        rows += [{"directions": i + 1, "energy held (%)": round(100 * share, 2),
                  "matrix": f"random B·A ({first.module} shape)"} for i, share in enumerate(random_curve)]
    return pd.DataFrame(rows, columns=["directions", "energy held (%)", "matrix"])


def top_frame(report: AdapterReport) -> pd.DataFrame:
    rows = [[m.name, m.layer, m.module, m.rank, m.effective_rank, round(100 * m.relative_norm, 4)]
            for m in report.top_changed(len(report.modules))]
    return pd.DataFrame(rows, columns=TOP_COLUMNS)


def _report_markdown(report: AdapterReport) -> str:
    captions = "\n".join(f"- {m.caption()}" for m in report.top_changed(3))
    return f"{report.summary()}\n\nMost changed:\n{captions}\n\n*Computed in {report.seconds:.1f} s.*"


def inspect_adapter(manager: RunManager, run_id: str | None, request: gr.Request = None
                    ) -> tuple[str, pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Inspect one run: (summary, heat map, per module type, by layer, energy by direction, matrices by change)."""
    try:
        report = inspect_run(_run_dir(manager, run_id, visitor_of(request)))
    except InspectError as error:
        raise refusal(str(error)) from None
    return (_report_markdown(report), heat_frame(report), module_type_frame(report), layer_frame(report),
            energy_frame(report), top_frame(report))


def match_frame(comparison: RunComparison) -> pd.DataFrame:
    rows = [[m.name, m.layer, m.module, m.k, round(m.output_similarity, 3), round(m.input_similarity, 3),
             round(m.output_chance, 4), ", ".join(f"{a:.0f}" for a in m.output_angles)]
            for m in comparison.matches]
    return pd.DataFrame(rows, columns=MATCH_COLUMNS)


def inspect_compare(manager: RunManager, run_id: str | None, other_id: str | None, top_k: float | None,
                    request: gr.Request = None) -> tuple[str, pd.DataFrame]:
    """Overlap of two runs' update subspaces, matrix by matrix."""
    if not other_id:
        raise refusal("Pick a second run to compare with.")
    if top_k is None or not float(top_k).is_integer() or top_k < 1:
        raise refusal(f"Directions to compare must be a whole number of at least 1, got {top_k!r}.")
    try:
        visitor = visitor_of(request)
        comparison = compare_updates(_run_dir(manager, run_id, visitor), _run_dir(manager, other_id, visitor),
                                     int(top_k))
    except InspectError as error:
        raise refusal(str(error)) from None
    return comparison.summary(), match_frame(comparison)


def build_inspect_section(manager: RunManager) -> None:
    """Layout and wiring of the section; call inside the Evaluate tab's layout."""
    with gr.Accordion("Inside the adapter: what LoRA changed", open=False):
        gr.Markdown(LEARN_INSPECT)
        with gr.Row():
            # allow_custom_value: an API client names a run it may see without loading this page's list first
            # (the handlers check the visitor's right to it).
            run = gr.Dropdown([], label="Run to inspect", elem_id="inspect-run", scale=3, allow_custom_value=True)
            other = gr.Dropdown([], label="Compare with (same base model)", elem_id="inspect-other", scale=3,
                                allow_custom_value=True)
            top_k = gr.Number(4, label="Directions to compare", precision=0, minimum=1, elem_id="inspect-top-k",
                              scale=1)
            refresh = gr.Button("Refresh runs", size="sm", scale=1)
        with gr.Row():
            inspect_button = gr.Button("Inspect the adapter", variant="primary", elem_id="inspect-button")
            compare_button = gr.Button("Compare the two runs", elem_id="inspect-compare-button")
        summary = gr.Markdown(elem_id="inspect-summary")
        with gr.Row():
            heat = gr.ScatterPlot(x="module", y="layer", color="change percentile", tooltip="all", height=520,
                                  label="Where the adapter changed most: each point one matrix, darker = a larger "
                                        "update / weight than most others (hover for the numbers)",
                                  elem_id="inspect-heat", scale=3)
            by_type = gr.BarPlot(x="module", y="mean update / weight (%)", y_lim=[0, None],
                                 label="Mean change per module type", elem_id="inspect-types", scale=2)
        by_layer = gr.LinePlot(x="layer", y="update / weight (%)", color="module", y_lim=[0, None],
                               label="Update / weight by layer, one line per module type", elem_id="inspect-layers")
        energy = gr.LinePlot(x="directions", y="energy held (%)", color="matrix", y_lim=[0, 100],
                             label=f"Energy held by the first k directions (effective rank: where a line crosses "
                                   f"{ENERGY:.0%})", elem_id="inspect-energy")
        table = gr.Dataframe(headers=TOP_COLUMNS, label="Matrices, most changed first", elem_id="inspect-table",
                             interactive=False, max_height=320)
        compare_summary = gr.Markdown(elem_id="inspect-compare-summary")
        matches = gr.Dataframe(headers=MATCH_COLUMNS, label="Overlap of the two runs' update subspaces",
                               elem_id="inspect-matches", interactive=False, max_height=320)
    pickers = bind(inspect_runs, manager)
    refresh.click(pickers, [run, other], [run, other], api_name="inspect_runs")
    on_page_load(pickers, [run, other], [run, other])
    inspect_button.click(bind(inspect_adapter, manager), run,
                         [summary, heat, by_type, by_layer, energy, table],
                         api_name="inspect_adapter", concurrency_limit=1, concurrency_id="inspect")
    compare_button.click(bind(inspect_compare, manager), [run, other, top_k],
                         [compare_summary, matches], api_name="inspect_compare", concurrency_limit=1,
                         concurrency_id="inspect")
