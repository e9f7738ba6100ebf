"""Hyperparameter sweeps: lists of learning rates, ranks, alphas, dropouts and bit widths on a base SFT config, tried
as a grid or as a seeded random sample of that grid, each trial a normal run with the same step budget.

The trials go through the comparison's queue (finetune/services/compare.py): ``SweepQueue`` is a CompareQueue
persisted as ``runs/sweeps/<id>.json``, so a reloaded page re-attaches and a restarted app continues
(``ensure_worker``). It adds one thing: a trial that is clearly bad is stopped early. At each evaluation the trial's
held-out loss is compared with the best loss any finished trial had *at the same step*; worse by more than
``prune_margin`` nats (e^0.5 = 1.65x the perplexity by default) and the trial is stopped (its checkpoint and adapter
are kept, marked "pruned"). Comparing at the same step keeps it fair: an early loss is not held against a final one.

Trials are ranked by validation loss: the held-out loss of the saved adapter (the run's last evaluation; for a
run that keeps its best checkpoint, status.json's best_metric). A sweep without held-out data is refused.

    queue = SweepQueue(RunManager("runs"))
    sweep_id = queue.start_sweep(base_cfg, SweepRequest(learning_rates="1e-4, 5e-4", ranks="4, 8", max_steps=20))
    queue.wait(sweep_id)
    print(results(queue.manager, queue.load(sweep_id))[0])   # the best trial first
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import random
from dataclasses import dataclass
from typing import Any

from finetune.core.access import LOCAL, Visitor, owned_by
from finetune.core.config import LORA_METHODS, ConfigError, RunConfig, from_dict, to_dict
from finetune.core.data import DataError, prepare, data_source_kind
from finetune.core.models import ModelSourceError
from finetune.core.paths import check_config
from finetune.core.run_folder import SWEEP_DIR
from finetune.core.run_status import FINAL_STATES, read_metrics, read_status
from finetune.services.admission import check_sources
from finetune.services.compare import CompareError, CompareQueue, check_model

MAX_TRIALS_ENV = "LORA_LAB_MAX_TRIALS"
DEFAULT_MAX_TRIALS = 24
SEARCHES = ("grid", "random")
# The swept hyperparameters: request field -> (config section, field, label in tables and charts).
AXES = {"learning_rates": ("training", "learning_rate", "learning rate"),
        "ranks": ("lora", "rank", "rank"),
        "alphas": ("lora", "alpha", "alpha"),
        "dropouts": ("lora", "dropout", "dropout"),
        "bits": ("model", "bits", "bits")}


def max_trials() -> int:
    """The operator's limit on trials per sweep (each one is a full training run)."""
    try:
        return max(1, int(os.environ.get(MAX_TRIALS_ENV, DEFAULT_MAX_TRIALS)))
    except ValueError:
        return DEFAULT_MAX_TRIALS


@dataclass
class SweepRequest:
    """The lists to try (comma-separated text or lists), the search, and the budget of each trial. An alpha may be
    written as a multiple of the rank, e.g. "2r" (alpha = 2 x rank, the common start)."""

    learning_rates: str | list[Any] = "2e-4"
    ranks: str | list[Any] = "8"
    alphas: str | list[Any] = "2r"
    dropouts: str | list[Any] = "0.05"
    bits: str | list[Any] = "4"
    search: str = "grid"
    trials: int = 8          # random search: how many distinct combinations of the grid to try
    seed: int = 0            # random search: which ones (the same seed picks the same trials)
    max_steps: int = 20      # every trial's step budget
    prune_margin: float = 0.5  # nats worse than the best at the same step = stopped; 0 = never stop a trial


class SweepError(CompareError):
    """A sweep that cannot be carried out; the message is meant for the user."""


# --- the lists and the trials ---------------------------------------------------------------------------------

def _items(value: str | list[Any]) -> list[Any]:
    if isinstance(value, str):
        return [part.strip() for part in value.replace(";", ",").split(",") if part.strip()]
    return [v for v in (value or []) if not (isinstance(v, str) and not v.strip())]


def _number(token: Any, axis: str) -> float | str:
    """A list entry as a number (or "<k>r" for an alpha); raises ValueError with the entry in the message."""
    if axis == "alphas" and isinstance(token, str) and token.lower().endswith("r"):
        factor = float(token[:-1] or 1)
        if not math.isfinite(factor) or factor <= 0:
            raise ValueError(token)
        return f"{factor:g}r"
    if isinstance(token, bool):
        raise ValueError(token)
    number = float(token)
    return int(number) if axis in ("ranks", "bits") and number.is_integer() else number


def parse_axes(request: SweepRequest) -> tuple[dict[str, list[Any]], dict[str, str]]:
    """Each axis's distinct values in the order given, and a problem per axis that is empty or unreadable."""
    axes, problems = {}, {}
    for axis, (_, _, label) in AXES.items():
        tokens, values, bad = _items(getattr(request, axis)), [], []
        for token in tokens:
            try:
                values.append(_number(token, axis))
            except (TypeError, ValueError):
                bad.append(repr(token))
        if not tokens:
            problems[axis] = f"give at least one {label} to try"
        elif bad:
            problems[axis] = f"not a number: {', '.join(bad)}"
        axes[axis] = list(dict.fromkeys(values))
    return axes, problems


def trial_params(axes: dict[str, list[Any]], request: SweepRequest) -> list[dict[str, Any]]:
    """The combinations to try: the whole grid, or ``request.trials`` of them drawn with ``request.seed``."""
    grid = [dict(zip(AXES, values)) for values in itertools.product(*(axes[a] for a in AXES))]
    if request.search == "random" and request.trials < len(grid):
        picked = sorted(random.Random(request.seed).sample(range(len(grid)), request.trials))
        grid = [grid[i] for i in picked]
    return [{**p, "alphas": resolve_alpha(p["alphas"], p["ranks"])} for p in grid]


def resolve_alpha(alpha: float | str, rank: int) -> float:
    return float(alpha[:-1]) * rank if isinstance(alpha, str) else float(alpha)


def trial_config(base: RunConfig, params: dict[str, Any], number: int, max_steps: int) -> RunConfig:
    """The base config with one trial's hyperparameters and the sweep's step budget."""
    raw = to_dict(base)
    raw["run_name"] = f"sweep-t{number}"
    raw["training"]["max_steps"] = max_steps
    for axis, (section, name, _) in AXES.items():
        raw[section][name] = params[axis]
    return from_dict(raw)


def _value_problems(base: RunConfig, axes: dict[str, list[Any]], max_steps: Any) -> dict[str, str]:
    """Every value the config rejects, each tried alone on the base, all reported at once."""
    problems: dict[str, str] = {}
    for axis, (section, name, _) in AXES.items():
        messages = []
        for value in axes[axis]:
            raw = to_dict(base)
            raw[section][name] = resolve_alpha(value, base.lora.rank) if axis == "alphas" else value
            try:
                from_dict(raw)
            except ConfigError as error:
                messages += [m for m in error.problems.values() if m not in messages]
        if messages:
            problems[axis] = "; ".join(messages)
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        problems["max_steps"] = f"steps per trial must be a whole number above 0, got {max_steps!r}"
    return problems


def _base_problems(base: RunConfig) -> dict[str, str]:
    problems = {}
    if base.stage != "sft":
        problems["stage"] = f"a sweep tunes supervised fine-tuning runs; this config is a {base.stage} run"
    if base.lora.method not in LORA_METHODS:
        problems["lora.method"] = (f"a sweep tunes LoRA's rank, alpha and dropout: the method must be one of "
                                   f"{', '.join(LORA_METHODS)}, got {base.lora.method!r}")
    if base.data.validation_fraction == 0:
        problems["data.validation_fraction"] = ("a sweep ranks its trials by validation loss: set the validation "
                                                "fraction above 0 (for example 0.1)")
    return problems


def _search_problems(request: SweepRequest, grid_size: int) -> dict[str, str]:
    limit = max_trials()
    if request.search not in SEARCHES:
        return {"search": f"search must be one of {', '.join(SEARCHES)}, got {request.search!r}"}
    if request.search == "random":
        if isinstance(request.trials, bool) or not isinstance(request.trials, int) or request.trials < 1:
            return {"trials": f"random search needs a number of trials above 0, got {request.trials!r}"}
        if request.trials > limit:
            return {"trials": f"{request.trials} trials asked for; this server allows at most {limit} per sweep "
                              f"({MAX_TRIALS_ENV})"}
        if not isinstance(request.seed, int) or isinstance(request.seed, bool) or request.seed < 0:
            return {"seed": f"the search seed must be a whole number >= 0, got {request.seed!r}"}
    elif grid_size > limit:
        return {"trials": f"the grid has {grid_size} trials; this server allows at most {limit} per sweep "
                          f"({MAX_TRIALS_ENV}): shorten a list or use random search"}
    return {}


def validate_sweep(base: RunConfig, request: SweepRequest) -> list[tuple[dict[str, Any], RunConfig]]:
    """Every trial's hyperparameters and config, or one ConfigError naming every problem at once."""
    axes, problems = parse_axes(request)
    for name, message in _value_problems(base, axes, request.max_steps).items():
        problems[name] = f"{problems[name]}; {message}" if name in problems else message
    problems.update(_base_problems(base))
    if not isinstance(request.prune_margin, (int, float)) or not math.isfinite(request.prune_margin) \
            or request.prune_margin < 0:
        problems["prune_margin"] = f"the pruning margin must be a number >= 0, got {request.prune_margin!r}"
    grid_size = math.prod(len(v) for v in axes.values())
    if not any(a in problems for a in AXES):
        problems.update(_search_problems(request, grid_size))
    if problems:
        raise ConfigError(problems)
    params = trial_params(axes, request)
    configs = [trial_config(base, p, n, request.max_steps) for n, p in enumerate(params, 1)]
    return list(zip(params, configs))


def check_each_bit_width(trials: list[tuple[dict[str, Any], RunConfig]]) -> None:
    """The base's LoRA initialisation at every bit width swept (LoftQ needs a 4-bit base, PiSSA and OLoRA a 16 or
    32-bit one): the Train tab's own check (admission.check_sources), once per bit width, every refusal at once."""
    problems: dict[str, str] = {}
    for bits in dict.fromkeys(cfg.model.bits for _, cfg in trials):
        cfg = next(cfg for _, cfg in trials if cfg.model.bits == bits)
        try:
            check_sources(cfg)
        except ConfigError as error:
            if "lora.init" in error.problems:
                problems["bits"] = " ".join(filter(None, [problems.get("bits"),
                                                          f"At {bits} bits: {error.problems['lora.init']}"]))
    if problems:
        raise ConfigError(problems)


def check_held_out_rows(cfg: RunConfig) -> None:
    """A local dataset too small to hold rows out (under 10 rows) would give no validation loss to rank by. A Hub
    dataset is not loaded here (that is the run's download); its trials say so if they have no loss."""
    if data_source_kind(cfg.data.source) == "hub":
        return
    try:
        prepared = prepare(cfg.data, seed=cfg.training.seed)
    except (DataError, ModelSourceError, OSError, ValueError) as error:
        raise ConfigError({"data.source": str(error)}) from None
    if prepared.eval is None:
        raise ConfigError({"data.validation_fraction": "this dataset holds no rows out for validation (too few rows, "
                                                       "under 10), and a sweep ranks its trials by validation loss"})


# --- the queue --------------------------------------------------------------------------------------------------

class SweepQueue(CompareQueue):
    """The comparison queue with its own folder, holding trials; stops clearly bad trials early."""

    FOLDER = SWEEP_DIR
    PREFIX = "sweep"
    NOUN = "Sweep"

    def start_sweep(self, base: RunConfig, request: SweepRequest, visitor: Visitor = LOCAL) -> str:
        """Validate every trial, check the sources once, persist the sweep and start its first trial."""
        trials = validate_sweep(base, request)
        check_config(base)  # the path gate: the base's model and data sources
        check_sources(base)
        check_each_bit_width(trials)
        check_held_out_rows(base)
        check_model(base)
        items = [{"technique": trial_label(n, params), "params": params, "config": to_dict(cfg)}
                 for n, (params, cfg) in enumerate(trials, 1)]
        return self.enqueue(items, {**dataclasses.asdict(request), "base": to_dict(base)}, visitor)

    def watch_run(self, sweep_id: str, index: int, run_id: str) -> None:
        state = self.load(sweep_id)
        item = state["items"][index]
        if item.get("pruned") or state.get("stop_requested"):
            return
        reason = prune_reason(self.manager, state, index, run_id)
        if reason:
            self._update_item(sweep_id, index, pruned=reason)
            self.manager.request_stop(run_id, owned_by(state.get("owner")))


def trial_label(number: int, params: dict[str, Any]) -> str:
    return (f"t{number}: lr {params['learning_rates']:g}, r {params['ranks']}, alpha {params['alphas']:g}, "
            f"dropout {params['dropouts']:g}, {params['bits']}-bit")


def eval_losses(rows: list[dict[str, Any]]) -> dict[int, float]:
    """step -> held-out loss, from a run's metrics rows."""
    return {int(r["step"]): float(r["eval_loss"]) for r in rows
            if isinstance(r.get("eval_loss"), (int, float)) and math.isfinite(r["eval_loss"])}


def prune_reason(manager: Any, state: dict[str, Any], index: int, run_id: str) -> str | None:
    """Why the trial should stop now, or None: its newest evaluation is worse than the best finished trial's at the
    same step by more than the sweep's margin."""
    margin = float(state.get("request", {}).get("prune_margin") or 0)
    mine = eval_losses(read_metrics(manager.run_dir(run_id)))
    if margin <= 0 or not mine:
        return None
    step = max(mine)
    others = [eval_losses(read_metrics(manager.run_dir(item["run_id"])))
              for i, item in enumerate(state["items"])
              if i != index and item.get("run_id") and item["state"] == "completed" and not item.get("pruned")]
    at_step = [losses[step] for losses in others if step in losses]
    if not at_step or mine[step] <= min(at_step) + margin:
        return None
    return (f"stopped at step {step}: held-out loss {mine[step]:.3f} is {mine[step] - min(at_step):.2f} nats worse "
            f"than the best finished trial's {min(at_step):.3f} at that step (margin {margin:g})")


# --- the results ------------------------------------------------------------------------------------------------

RESULT_COLUMNS = ["rank in sweep", "trial", "state", "val loss", "learning rate", "rank", "alpha", "dropout",
                  "bits", "final train loss", "note", "run id"]


def validation_loss(manager: Any, run_id: str) -> float | None:
    """The held-out loss of the run's saved adapter: the best evaluation's for a run that kept its best checkpoint,
    else the last evaluation's (the runner evaluates the last step)."""
    folder = manager.run_dir(run_id)
    status = read_status(folder)
    if status.get("kept") == "best" and status.get("best_metric_name") in ("eval_loss", "loss") \
            and isinstance(status.get("best_metric"), (int, float)):
        return float(status["best_metric"])
    losses = eval_losses(read_metrics(folder))
    return losses[max(losses)] if losses else None


def trial_result(manager: Any, item: dict[str, Any]) -> dict[str, Any]:
    params = item.get("params", {})
    row: dict[str, Any] = dict.fromkeys(RESULT_COLUMNS)
    row.update({"trial": item["technique"].split(":")[0], "state": item["state"], "run id": item.get("run_id") or "",
                "note": item.get("pruned") or item.get("error") or ""})
    row.update({label: params.get(axis) for axis, (_, _, label) in AXES.items()})
    if item.get("run_id"):
        rows = read_metrics(manager.run_dir(item["run_id"]))
        losses = [r["loss"] for r in rows if isinstance(r.get("loss"), (int, float))]
        loss = validation_loss(manager, item["run_id"])
        status = manager.status(item["run_id"])
        row.update({"val loss": None if loss is None else round(loss, 4),
                    "final train loss": round(losses[-1], 4) if losses else None,
                    "state": "pruned" if item.get("pruned") and item["state"] in FINAL_STATES
                    else status.get("state", item["state"])})
        if loss is None and row["state"] == "completed":
            row["note"] = row["note"] or "no held-out loss was logged: this trial cannot be ranked"
    return row


def results(manager: Any, state: dict[str, Any]) -> list[dict[str, Any]]:
    """Every trial, the lowest validation loss first (trials without one last, in queue order)."""
    rows = [trial_result(manager, item) for item in state.get("items", [])]
    rows.sort(key=lambda r: (r["val loss"] is None, r["val loss"] if r["val loss"] is not None else 0.0))
    for place, row in enumerate(rows, 1):
        row["rank in sweep"] = place if row["val loss"] is not None else None
    return rows


def best_trial(manager: Any, state: dict[str, Any]) -> dict[str, Any] | None:
    """The finished, unpruned trial with the lowest validation loss (its item, with its config), or None."""
    candidates = []
    for item in state.get("items", []):
        if item["state"] == "completed" and not item.get("pruned") and item.get("run_id"):
            loss = validation_loss(manager, item["run_id"])
            if loss is not None:
                candidates.append((loss, item))
    return min(candidates, key=lambda pair: pair[0])[1] if candidates else None


def best_config(manager: Any, state: dict[str, Any]) -> RunConfig | None:
    item = best_trial(manager, state)
    return from_dict(item["config"]) if item else None


def loss_by_hyperparameter(manager: Any, state: dict[str, Any]) -> dict[str, list[tuple[float, float, str]]]:
    """For each swept hyperparameter with more than one value: (value, validation loss, trial) per ranked trial.
    The learning rate is given as log10, since its values are spread over orders of magnitude."""
    rows = [r for r in results(manager, state) if r["val loss"] is not None]
    points: dict[str, list[tuple[float, float, str]]] = {}
    for _, _, label in AXES.values():
        values = {r[label] for r in rows}
        if len(values) > 1:
            to_x = (lambda v: math.log10(v)) if label == "learning rate" else float
            points[label] = [(to_x(r[label]), r["val loss"], r["trial"]) for r in rows]
    return points


def progress(state: dict[str, Any]) -> tuple[int, int]:
    """(trials finished, trials queued)."""
    items = state.get("items", [])
    return sum(i["state"] in FINAL_STATES or i["state"] == "skipped" for i in items), len(items)
