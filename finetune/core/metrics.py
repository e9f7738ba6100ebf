"""The metric sink: progress leaves the trainer only through this callback, as files in the run folder.

- ``metrics.jsonl``: one JSON object per log or eval event, flushed per line, so a reader tailing the file
  (the Train tab) never waits for a buffer and at worst sees a partial last line, which it skips.
- ``status.json``: the run's state (queued, running, completed, failed, stopped, interrupted), replaced
  atomically so a reader never sees half a file.
- ``STOP``: a flag file the UI creates; the callback honours it at the next step end (checkpoint, then stop).

The status.json protocol itself (reading, writing, the states) is finetune/core/run_status.py's.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from finetune.core.run_folder import METRICS_FILE, STATUS_FILE, STOP_FILE
from finetune.core.run_status import HOSTNAME, run_pid, write_status

# A run that logs rarely (large logging_steps, slow steps) still touches status.json this often, so the run
# manager's stall detection (LORA_LAB_STALL_SECONDS, default 600) tells a slow run from a hung one.
HEARTBEAT_SECONDS = 60.0
# The ETA's pace: the mean of the latest training steps, not of the whole run, so a machine that gets busier (or
# quieter) shows within a few steps (the walk saw an ETA say 10:12 for a run that ended at 10:27).
RECENT_STEPS = 5
ETA_WRITE_SECONDS = 2.0  # status.json gets the re-measured ETA at most this often between log rows


def any_rank(flag: bool) -> bool:
    """True on every rank when it is True on any: a decision that ends training (the STOP file) must be taken
    at the same step by all ranks, or the ones that go on wait forever in their next collective."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    vote = torch.tensor([int(flag)], device=device)
    dist.all_reduce(vote, op=dist.ReduceOp.MAX)
    return bool(vote.item())


def _finite(value: Any) -> Any:
    """NaN and inf are not JSON; keep them readable as strings rather than crash or lie."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _number(value: Any) -> int | float | None:
    """Plain numbers as they are; numpy / torch scalars as Python floats; anything else (text, lists) None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if not callable(getattr(value, "item", None)):
        return None
    try:
        item = value.item()  # a numpy / torch scalar; a tensor of several values raises
    except (TypeError, ValueError, RuntimeError):
        return None
    return item if isinstance(item, (int, float)) and not isinstance(item, bool) else None


def eval_interval(args: TrainingArguments | None, state: TrainerState) -> int:
    """Steps between evaluations during training; 0 when the trainer evaluates only when told to."""
    strategy = getattr(args, "eval_strategy", "no")
    if args is None or getattr(strategy, "value", strategy) != "steps":  # an IntervalStrategy or its text
        return 0
    steps = state.eval_steps or args.eval_steps or 0  # the trainer turns a fraction of the run into steps
    return math.ceil(state.max_steps * steps) if 0 < steps < 1 else int(steps)


def evaluations_left(interval: int, step: int, max_steps: int, final_eval: bool) -> int:
    """How many evaluations a run still has after ``step``: one every ``interval`` steps during training, plus a
    final one when the last step is not on the interval (the trainer adds it when it evaluates every so many
    steps, the stage runners when ``final_eval``)."""
    during = max_steps // interval - step // interval if interval else 0
    ends_on_eval = bool(interval) and max_steps % interval == 0
    return max(during, 0) + int((bool(interval) or final_eval) and not ends_on_eval)


def _length(loader: Any) -> int | None:
    try:
        return len(loader) if loader is not None else None
    except TypeError:  # an iterable dataset has no length
        return None


def _for_status(eta: dict[str, Any]) -> dict[str, Any]:
    """status.json has always called the ETA eta_seconds (metrics rows call it eta)."""
    return {("eta_seconds" if key == "eta" else key): value for key, value in eta.items()}


class MetricsCallback(TrainerCallback):
    """Appends log/eval events to metrics.jsonl, keeps status.json current and honours the STOP flag.

    The ETA charges training steps and evaluations separately, each at its own measured pace: an evaluation can
    take as long as many steps, so a per-step average taken across one would jump, and one taken before the
    first evaluation would leave every evaluation out. While an evaluation runs, status.json says so (phase
    "evaluating", with the batch it is on), so the progress bar does not seem to hang."""

    def __init__(self, run_dir: str | Path, stage: str = "sft", final_eval: bool = False):
        self.run_dir = Path(run_dir)
        self.stage = stage
        self.final_eval = final_eval  # the runner calls evaluate() after training (finetune/stages/runner.py)
        self.started = time.time()
        self.last_log_time = self.started
        self.last_log_tokens = 0
        self.start_step = 0
        self.last_eval_step = -1
        self.args: TrainingArguments | None = None  # known from on_train_begin on
        self.eval_started: float | None = None
        self.eval_batch = 0
        self.evaluated_at = -1
        self.eval_seconds: list[float] = []  # the duration of every evaluation so far, measured
        self.eval_seconds_in_training = 0.0  # the part of them that fell between on_train_begin and now
        self.last_batch_write = 0.0
        self.first_step_seconds: float | None = None  # the first step's one-off costs, kept out of the pace
        self.recent_steps: deque[float] = deque(maxlen=RECENT_STEPS)  # seconds of the latest training steps
        self.last_step_end: float | None = None
        self.last_eta_write = 0.0

    # Only the main process writes: under `accelerate launch` every rank runs the callback.
    def _is_writer(self, state: TrainerState) -> bool:
        return state.is_world_process_zero

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        self.started = self.last_log_time = time.time()
        self.last_step_end = None
        self.last_log_tokens = state.num_input_tokens_seen
        self.start_step = state.global_step
        self.eval_seconds_in_training = 0.0
        self.args = args
        if self._is_writer(state):
            write_status(self.run_dir, state="running", stage=self.stage, pid=run_pid(), hostname=HOSTNAME,
                         max_steps=state.max_steps, step=state.global_step, started_at=self.started,
                         phase="training", **_for_status(self._eta(state, self.started)))

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs and "eval_loss" in logs:  # every rank tracks this: they must agree on a final evaluate()
            self.last_eval_step = state.global_step
        now = time.time()
        evaluation = bool(logs) and any(key.startswith("eval_") for key in logs)
        if evaluation:
            self._end_evaluation(logs or {}, now)
            self.evaluated_at = state.global_step
        if not self._is_writer(state) or not logs:
            return
        row: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4),
                               "time": now, "elapsed": round(now - self.started, 2)}
        # Every numeric metric the trainer logs (TRL's rewards/margins, accuracy, eval_* ...), whatever its type.
        row.update({key: _finite(number) for key, number in ((k, _number(v)) for k, v in logs.items())
                    if number is not None and key != "epoch"})
        if "loss" in logs:
            seconds = max(now - self.last_log_time, 1e-9)
            tokens = state.num_input_tokens_seen - self.last_log_tokens
            if tokens > 0:
                row["tokens_per_second"] = round(tokens / seconds, 1)
            self.last_log_time, self.last_log_tokens = now, state.num_input_tokens_seen
        if evaluation:
            row["eval_seconds"] = round(self.eval_seconds[-1], 3)
        eta = self._eta(state, now)
        row.update({k: v for k, v in eta.items() if k in ("seconds_per_step", "eta") and v is not None})
        with (self.run_dir / METRICS_FILE).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
        if evaluation:  # the next tokens/s must not count the time spent evaluating
            self.last_log_time = time.time()
        write_status(self.run_dir, step=state.global_step, max_steps=state.max_steps, **_for_status(eta),
                     **({"phase": "training", "eval_batch": None, "eval_batches": None} if evaluation else {}))

    def _eta(self, state: TrainerState, now: float) -> dict[str, Any]:
        """eta (seconds) = steps left x measured seconds per training step + evaluations left x measured
        seconds per evaluation; evals_untimed counts the evaluations still to come before any was measured."""
        finished = self.args is None or self.evaluated_at >= state.max_steps  # the last step is evaluated
        left = 0 if finished else evaluations_left(eval_interval(self.args, state), state.global_step,
                                                   state.max_steps, self.final_eval)
        timed = bool(self.eval_seconds)
        per_eval = self.eval_seconds[-1] if timed else 0.0  # the latest measure: the machine as it is now
        fields: dict[str, Any] = {"evals_left": left, "evals_untimed": 0 if timed else left,
                                  "seconds_per_eval": round(per_eval, 3) if timed else None}
        done = state.global_step - self.start_step
        if self.eval_started is not None:  # the evaluation running now has already used part of its time
            left_now = max(per_eval - (now - self.eval_started), 0.0)
        else:
            left_now = 0.0
        if done <= 0 or not state.max_steps:
            return {**fields, "eta": None}
        training_seconds = max(now - self.started - self.eval_seconds_in_training, 0.0)
        # The first step also pays for one-off setup (allocations, kernel choice, data workers): measured on the
        # tiny model it took 3x a later step, which doubled the ETA shown at step 1. Pace from the later steps.
        if self.recent_steps:
            per_step = sum(self.recent_steps) / len(self.recent_steps)
        elif done >= 2 and self.first_step_seconds is not None:
            per_step = max(training_seconds - self.first_step_seconds, 0.0) / (done - 1)
        else:
            per_step = training_seconds / done
        eta = per_step * max(state.max_steps - state.global_step, 0) + per_eval * left + left_now
        return {**fields, "seconds_per_step": round(per_step, 3), "eta": round(eta, 1)}

    def _time_step(self, state: TrainerState) -> None:
        """Measure the step that just ended (the first is left out: it pays one-off costs) and put the
        re-measured ETA into status.json, so the bar's ETA follows the machine between log rows."""
        now = time.time()
        if self.last_step_end is not None:
            self.recent_steps.append(max(now - self.last_step_end, 0.0))
        self.last_step_end = now
        if self._is_writer(state) and now - self.last_eta_write >= ETA_WRITE_SECONDS:
            self.last_eta_write = now
            write_status(self.run_dir, step=state.global_step, **_for_status(self._eta(state, now)))

    def _begin_evaluation(self, state: TrainerState, batches: int | None = None) -> None:
        if self.eval_started is not None:
            return
        self.eval_started = time.time()
        if self._is_writer(state):
            write_status(self.run_dir, phase="evaluating", eval_started_at=self.eval_started, eval_batch=0,
                         eval_batches=batches)

    def _end_evaluation(self, logs: dict[str, Any], now: float) -> None:
        """Record how long the evaluation took, measured (see below)."""
        runtime = float(_number(logs.get("eval_runtime")) or 0.0)
        # An evaluation first seen at its first batch (not announced by on_step_end) started before that batch:
        # the trainer's own eval_runtime is then the longer, truer figure.
        seconds = max(now - self.eval_started if self.eval_started is not None else 0.0, runtime)
        self.eval_seconds.append(seconds)
        if self.args is not None:  # the training clock (self.started) was running during this evaluation
            self.eval_seconds_in_training += seconds
        if self.last_step_end is not None:  # the next step's duration must not include this evaluation
            self.last_step_end += seconds
        self.eval_started = None

    def on_prediction_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                           eval_dataloader: Any = None, **kwargs: Any) -> None:
        """Each evaluation batch: the first one marks an evaluation that no step end announced (the final
        evaluate()); later ones update the batch count at most twice a second (status.json is rewritten whole)."""
        batches = _length(eval_dataloader)
        if self.eval_started is None:
            self._begin_evaluation(state, batches)
        self.eval_batch += 1
        now = time.time()
        if self._is_writer(state) and now - self.last_batch_write >= 0.5:
            self.last_batch_write = now
            write_status(self.run_dir, phase="evaluating", eval_batch=self.eval_batch, eval_batches=batches)

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        self.eval_batch = 0
        if self.eval_started is not None:  # an evaluation whose metrics carried no eval_ key
            self._end_evaluation({}, time.time())
            if self._is_writer(state):
                write_status(self.run_dir, phase="training", eval_batch=None, eval_batches=None)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        stopping = any_rank((self.run_dir / STOP_FILE).exists())  # every rank stops at this same step
        if stopping:
            control.should_save = True
            control.should_training_stop = True
        if self.first_step_seconds is None and state.global_step > self.start_step:
            self.first_step_seconds = time.time() - self.started
        self._time_step(state)
        # DefaultFlowCallback ran before this one and set should_evaluate: an evaluation starts right after.
        if control.should_evaluate and not stopping:
            self._begin_evaluation(state, _length(kwargs.get("eval_dataloader")))
        self._heartbeat(state)

    def _heartbeat(self, state: TrainerState) -> None:
        try:
            quiet = time.time() - (self.run_dir / STATUS_FILE).stat().st_mtime
        except OSError:
            quiet = HEARTBEAT_SECONDS
        if quiet >= HEARTBEAT_SECONDS and self._is_writer(state):
            write_status(self.run_dir, step=state.global_step)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """The best evaluation so far, for the live plot's mark: the trainer decides it after on_evaluate and
        before this save (a run that tracks its best saves at every evaluation)."""
        if self._is_writer(state) and state.best_global_step:
            write_status(self.run_dir, best_step=state.best_global_step, best_metric=_finite(state.best_metric),
                         best_metric_name=args.metric_for_best_model)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if self._is_writer(state):
            write_status(self.run_dir, step=state.global_step, finished_at=time.time())


# What each stage's run is judged by, best evidence first: a held-out figure when the run evaluated, else the
# training one. A reward model is judged by how often it ranks the chosen answer first, not by its loss; a DPO or
# KTO policy by how far it prefers the chosen answer (its reward margin); GRPO by the reward of its samples.
HEADLINE_METRICS: dict[str, tuple[tuple[str, str], ...]] = {
    "sft": (("eval_loss", "eval loss"), ("loss", "train loss")),
    "reward": (("eval_accuracy", "held-out accuracy"), ("accuracy", "train accuracy")),
    "dpo": (("eval_rewards/margins", "held-out reward margin"), ("rewards/margins", "train reward margin"),
            ("eval_loss", "eval loss"), ("loss", "train loss")),
    "kto": (("eval_rewards/margins", "held-out reward margin"), ("rewards/margins", "train reward margin"),
            ("eval_loss", "eval loss"), ("loss", "train loss")),
    "grpo": (("reward", "mean reward"),),
}


@dataclass(frozen=True)
class BestMetric:
    """The held-out metric a stage's early stopping and best checkpoint go by (transformers' metric_for_best_model)."""

    key: str                 # as the trainer logs it
    greater_is_better: bool
    label: str


# SFT, DPO and KTO go by their held-out loss: it is the objective each one minimises, so it turns up as soon as the
# model fits its training rows at the held-out rows' expense. For DPO/KTO the mean held-out reward margin (their
# headline) would be the other choice, but a mean margin can keep growing while more pairs flip the wrong way
# (a few pairs pushed far apart outweigh them); the loss, -log sigmoid(beta x margin) per pair, counts each wrong
# pair and saturates on the easy ones. A reward model goes by held-out accuracy: what it is for, and its loss can
# keep falling on scores that already rank the pairs right. GRPO has no held-out set (finetune.core.config refuses it).
BEST_METRICS: dict[str, BestMetric] = {
    "sft": BestMetric("eval_loss", False, "eval loss"),
    "reward": BestMetric("eval_accuracy", True, "held-out accuracy"),
    "dpo": BestMetric("eval_loss", False, "eval loss"),
    "kto": BestMetric("eval_loss", False, "eval loss"),
}


def early_stop_note(status: dict[str, Any]) -> str:
    """'stopped early at step k (best: step j)' for a run whose early stopping ended it, '' for any other run."""
    stopped_at = status.get("stopped_early_at")
    if not isinstance(stopped_at, int) or isinstance(stopped_at, bool):
        return ""
    best = status.get("best_step")
    return f"stopped early at step {stopped_at}" + (f" (best: step {best})" if isinstance(best, int) else "")


def is_summary(row: dict[str, Any]) -> bool:
    """The trainer's end-of-training summary (train_loss, the run's mean loss): not a point of any curve. Not
    told by train_runtime: transformers 5 puts that on every training log row."""
    return "train_loss" in row


def rows_of_saved_model(rows: list[dict[str, Any]], status: dict[str, Any]) -> list[dict[str, Any]]:
    """The metrics up to the weights the run saved: for a run that kept its best checkpoint, the rows up to that
    step, so the figures shown are the saved adapter's, not those of the later steps it threw away."""
    best = status.get("best_step")
    if status.get("kept") != "best" or not isinstance(best, int) or isinstance(best, bool):
        return rows
    return [r for r in rows if isinstance(r.get("step"), (int, float)) and r["step"] <= best and not is_summary(r)]


def headline_metric(stage: str, rows: list[dict[str, Any]]) -> tuple[str, float | None]:
    """(name, last value) of the stage's headline metric; the end-of-training summary row is skipped, as are
    non-numbers. ('', None) when the run logged none of them yet."""
    for key, name in HEADLINE_METRICS.get(stage, HEADLINE_METRICS["sft"]):
        values = [r[key] for r in rows if not is_summary(r) and isinstance(r.get(key), (int, float))
                  and not isinstance(r.get(key), bool)]
        if values:
            return name, values[-1]
    return "", None


def loss_key(stage: str) -> str:
    """The training curve a stage's runs are compared on: loss, except GRPO whose loss says little (it starts
    at zero by construction), so its mean reward."""
    return "reward" if stage == "grpo" else "loss"
