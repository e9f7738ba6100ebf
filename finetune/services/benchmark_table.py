"""The benchmark table: base vs adapter per (task, metric), from the harness's results of one job, with the verdict.

Base and adapter answer the same items, so the difference's standard error is the PAIRED one,
sd(adapter_i - base_i) / sqrt(n) over the items' per-item scores (the harness's samples). It is smaller than
the combined sqrt(se_base^2 + se_adapter^2), which would treat the two runs as independent samples. A group of
tasks (mmlu) has no per-item samples of its own: its difference gets the combined error, which overstates the
uncertainty of a paired difference (the table says which one it used). "no measurable change" when
|difference| <= 1.96 x that error; with fewer than MIN_ITEMS items, no verdict at all.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from finetune.services.benchmark_plan import MIN_ITEMS, Z_95, BenchmarkPlan

@dataclass
class TableRow:
    task: str
    metric: str
    adapter: str
    base: float
    base_stderr: float | None      # the harness's standard error of each score
    tuned: float
    tuned_stderr: float | None
    difference: float
    difference_stderr: float | None
    stderr_kind: str               # "paired" (per-item differences) or "combined" (independent runs)
    items: int
    verdict: str

    def interval_text(self) -> str:
        """The difference's 95% interval, or why there is none: a zero spread is not "± 0.000" (which reads as
        a certainty) but items that all scored alike, from which no uncertainty can be estimated."""
        se = self.difference_stderr
        if se is None:
            return "no interval: the harness gave no standard error"
        if not math.isfinite(se):
            return f"no interval: {self.items} paired item(s) are too few to estimate one"
        if se == 0:
            alike = "the same" if self.difference == 0 else "by the same amount"
            return (f"no interval: every one of the {self.items} items scored {alike} for base and adapter, so "
                    "their spread gives no uncertainty to estimate")
        return f"95% interval ± {Z_95 * se:.3f}"


def _metric_values(result: dict[str, Any], task: str) -> dict[str, tuple[float, float | None]]:
    """{"acc": (value, stderr), "exact_match (flexible-extract)": ...} for one task of a harness result."""
    values = {}
    for key, value in (result.get("results", {}).get(task) or {}).items():
        if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
            continue
        metric, filter_name = key.split(",", 1)
        stderr = result["results"][task].get(f"{metric}_stderr,{filter_name}")
        name = metric if filter_name == "none" else f"{metric} ({filter_name})"
        values[name] = (float(value), float(stderr) if isinstance(stderr, (int, float)) else None)
    return values


def _per_item(result: dict[str, Any], task: str, metric: str) -> dict[tuple[Any, str], float]:
    name, _, filter_name = metric.partition(" (")
    filter_name = filter_name.rstrip(")") or "none"
    return {(row.get("doc_id"), row.get("filter", "none")): float(row[name])
            for row in (result.get("samples") or {}).get(task, [])
            if isinstance(row.get(name), (int, float, bool)) and row.get("filter", "none") == filter_name}


def paired_difference(base: dict[Any, float], tuned: dict[Any, float]) -> tuple[float, float, int]:
    """(mean difference, its standard error, n) over the items both scored."""
    diffs = [tuned[key] - base[key] for key in base.keys() & tuned.keys()]
    if len(diffs) < 2:
        return (diffs[0] if diffs else 0.0), math.inf, len(diffs)
    return statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs)), len(diffs)


def verdict(difference: float, stderr: float | None, items: int, higher_is_better: bool = True) -> str:
    if stderr is None or items < MIN_ITEMS:
        return f"no verdict: {items} items are too few (need {MIN_ITEMS})" if stderr is not None else \
            "no verdict: the harness gave no standard error"
    if abs(difference) <= Z_95 * stderr:
        return "no measurable change"
    better = (difference > 0) == higher_is_better
    return f"{'better' if better else 'worse'} (beyond {Z_95} x the standard error)"


def _compare(task: str, metric: str, label: str, base: dict[str, Any], tuned: dict[str, Any]) -> TableRow | None:
    base_values, tuned_values = _metric_values(base, task), _metric_values(tuned, task)
    if metric not in base_values or metric not in tuned_values:
        return None
    (b, b_se), (t, t_se) = base_values[metric], tuned_values[metric]
    base_items, tuned_items = _per_item(base, task, metric), _per_item(tuned, task, metric)
    if base_items and tuned_items:
        _, se, n = paired_difference(base_items, tuned_items)
        kind = "paired"
    else:
        se = math.sqrt(b_se ** 2 + t_se ** 2) if b_se is not None and t_se is not None else None
        n, kind = int((base.get("n-samples", {}).get(task) or {}).get("effective", MIN_ITEMS)), "combined"
    higher = (base.get("higher_is_better", {}).get(task) or {}).get(metric.split(" (")[0], True)
    return TableRow(task, metric, label, b, b_se, t, t_se, t - b, se, kind, n, verdict(t - b, se, n, higher))


def build_table(plan: BenchmarkPlan, results: dict[int, dict[str, Any]]) -> list[TableRow]:
    """One row per (adapter, task, metric) whose base and adapter results are both in."""
    bases = {(u.base_key, u.task): i for i, u in enumerate(plan.units) if u.adapter_dir is None}
    rows = []
    for index, unit in enumerate(plan.units):
        base_index = bases.get((unit.base_key, unit.task))
        if unit.adapter_dir is None or index not in results or base_index not in results:
            continue
        base, tuned = results[base_index], results[index]
        for task in tuned.get("results", {}):
            for metric in _metric_values(tuned, task):
                row = _compare(task, metric, unit.label.removeprefix("adapter: "), base, tuned)
                if row is not None:
                    rows.append(row)
    return rows


def base_only_rows(plan: BenchmarkPlan, results: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Scores of the base units (a run with no adapter chosen still shows what the base scored)."""
    rows = []
    for index, unit in enumerate(plan.units):
        if unit.adapter_dir is None and index in results:
            for task in results[index].get("results", {}):
                for metric, (value, stderr) in _metric_values(results[index], task).items():
                    rows.append({"model": unit.label, "task": task, "metric": metric, "score": value,
                                 "stderr": stderr})
    return rows


def format_table(rows: list[TableRow]) -> str:
    def number(value: float | None) -> str:
        return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"

    lines = ["| task | metric | adapter | base ± se | adapter ± se | difference, 95% interval (kind) | items | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.task} | {r.metric} | {r.adapter} | {number(r.base)} ± {number(r.base_stderr)} | "
                     f"{number(r.tuned)} ± {number(r.tuned_stderr)} | {r.difference:+.3f}, {r.interval_text()} "
                     f"({r.stderr_kind}) | {r.items} | {r.verdict} |")
    return "\n".join(lines)
