"""The admission rules for jobs on the device: who may start one and see or act on a run (owners and visibility),
the operator's per-visitor limits (jobs held, steps, minutes), the disk's minimum free space, and the source
pre-checks a form runs before a child starts (a model or data file that cannot be had fails here, named by its
field, not as a failed run later).

``RunAdmission`` is a part of ``RunManager`` (finetune/services/runs.py): it uses the manager's ``root``,
``list_ids()``, ``run_dir()`` and the queue's ``job_ids()`` and ``_job_seconds()``. A benchmark job is admitted
by the same rules (``check_device_job``) and counts among the jobs a visitor holds.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from finetune.core.access import JobLimits, Visitor, can_view, public_runs, require_owner, require_signed_in
from finetune.core.config import ConfigError, RunConfig
from finetune.core.data import DataError, check_file, data_source_kind, usable_row_count
from finetune.core.distributed import launch_problems_here
from finetune.core.lora_init import LOFTQ_NEEDS_WEIGHTS, init_problems
from finetune.core.models import ModelSourceError, local_weights_folder, model_source_kind, require_hub, resolve_source
from finetune.core.preference import usable_preference_count
from finetune.core.run_folder import MODEL_CONFIG
from finetune.core.run_status import WAITING, read_status
from finetune.core.storage import DiskFull, enforce_budget, require_free


class RunError(RuntimeError):
    """A run request that cannot be carried out; the message is meant for the user."""


class RunLimitError(RunError):
    """A job over the operator's per-visitor limits (jobs held, steps, minutes)."""


def usable_rows_counter(cfg: RunConfig) -> Any:
    """How a refusal counts the rows a run of this stage could train on: pairs or thumbs for the preference
    stages, the supervised format's rows for SFT."""
    if cfg.stage == "sft":
        return usable_row_count(cfg.data)
    return usable_preference_count(cfg.data, cfg.preference.format, "unpaired" if cfg.stage == "kto" else "paired")


def check_sources(cfg: RunConfig) -> None:
    """Fail before a child starts when the model or data cannot be had (offline Hub, missing or bad file):
    ConfigError names the field, so the form shows the reason at once instead of a failed run later."""
    problems: dict[str, str] = {}
    try:
        if model_source_kind(cfg.model.source) == "hub":
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(try_to_load_from_cache(cfg.model.source, MODEL_CONFIG), str):
                require_hub(cfg.model.source, "model")
        elif model_source_kind(cfg.model.source) == "local":
            resolve_source(cfg.model.source)
    except ModelSourceError as error:
        problems["model.source"] = str(error)
    try:
        kind = data_source_kind(cfg.data.source)
        if kind == "file":
            check_file(Path(cfg.data.source).expanduser(), cfg.data.skip_bad_rows,  # the form's choice
                       usable_rows_counter(cfg))
        elif kind == "hub":
            require_hub(cfg.data.source, "dataset")  # probes the Hub itself
    except (DataError, ModelSourceError) as error:
        problems["data.source"] = str(error)
    if cfg.stage == "sft" and "model.source" not in problems:
        weights = local_weights_folder(cfg.model) if cfg.lora.init == "loftq" else None
        if cfg.lora.init == "loftq" and weights is None:
            problems["lora.init"] = LOFTQ_NEEDS_WEIGHTS
        elif reasons := init_problems(cfg, weights):
            problems["lora.init"] = " ".join(reasons)
    problems.update(launch_problems_here(cfg))  # more processes than this machine has devices
    if problems:
        raise ConfigError(problems)


class RunAdmission:
    """Refusals before a job is queued or started, and who may see and act on a run."""

    def check_job(self, cfg: RunConfig, visitor: Visitor) -> None:
        """Refuse a job before it is queued: a signed-out visitor, one over their limits, a full disk."""
        require_signed_in(visitor, "start a training run")
        self._check_limits(visitor, cfg.training.max_steps if cfg.training.max_steps > 0 else None,
                           self._job_seconds(cfg))
        self._check_disk("start a run")

    def check_device_job(self, visitor: Visitor, what: str, seconds: float | None) -> None:
        """Refuse another kind of device job (``what``: "run a benchmark") by the same rules: signed out, over the
        visitor's limits (jobs held, its expected minutes), a full disk."""
        require_signed_in(visitor, what)
        self._check_limits(visitor, None, seconds, trains=False)
        self._check_disk(what)

    def _check_limits(self, visitor: Visitor, steps: int | None, seconds: float | None, trains: bool = True) -> None:
        """``trains``: the job has training steps (the operator's step limit applies to runs, not benchmarks)."""
        if visitor.operator:
            return
        statuses = (read_status(self.run_dir(job_id)) for job_id in self.job_ids())
        held = sum(1 for status in statuses
                   if status.get("owner") == visitor.owner and status.get("state") in (WAITING, "queued", "running"))
        limits = JobLimits.from_env() if trains else replace(JobLimits.from_env(), max_steps=None)
        problems = limits.problems(visitor, held, steps, seconds / 60 if seconds else None)
        if problems:
            raise RunLimitError(" ".join(problems))

    def _check_disk(self, what: str) -> None:
        """RunError unless the disk keeps its minimum free; pruning to the budget is tried first only when it is
        short (walking the whole runs folder on every check would be work done for nothing)."""
        try:
            require_free(self.root, 0, what)
        except DiskFull:
            enforce_budget(self.root)
            try:
                require_free(self.root, 0, what)
            except DiskFull as error:
                raise RunError(str(error)) from None

    # --- owners -------------------------------------------------------------------------------------------

    def owner_of(self, run_id: str) -> str | None:
        return read_status(self.run_dir(run_id)).get("owner")

    def visible_ids(self, visitor: Visitor) -> list[str]:
        """The runs ``visitor`` may see: their own, or every run for an operator (the local user) or when runs
        are public; only then are owners read (a page polls this every few seconds)."""
        if visitor.operator or public_runs():
            return self.list_ids()
        return [run_id for run_id in self.list_ids() if can_view(visitor, self.owner_of(run_id))]

    def can_see(self, run_id: str, visitor: Visitor) -> bool:
        """Whether run ``run_id`` exists and ``visitor`` may see it (one status read, not every run's)."""
        try:
            folder = self.run_dir(run_id)
        except RunError:
            return False
        return folder.is_dir() and can_view(visitor, read_status(folder).get("owner"))

    def require_can_act(self, run_id: str, visitor: Visitor, what: str) -> None:
        require_owner(visitor, self.owner_of(run_id), what, f"run {run_id}")
