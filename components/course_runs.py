"""The course's runs, apart from its layout: the configs it trains (this hardware's QLoRA preset at the learner's rank,
then the reward model and DPO as the RLHF tab builds them), each step's expected time said before it starts,
starting the runs through the run manager's admission, and the sentences that quote each run's own numbers. Not a
tab: components/course_tab.py wires these handlers (its api_names) to its controls."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from components.rlhf_form import stage_config_from_form
from components.shared import live_status, progress_html, refusal, visitor_of
from finetune.core import paths
from finetune.core.access import AccessDenied, Visitor, require_signed_in
from finetune.core.config import ConfigError, RunConfig, from_dict, load_config, to_dict
from finetune.core.course_progress import CourseProgress
from finetune.core.estimate import lora_parameter_count, model_shape
from finetune.core.hardware import HardwareProfile
from finetune.core.metrics import is_summary
from finetune.core.models import ModelSourceError
from finetune.core.paths import CONFIGS_DIR
from finetune.core.preference import BUNDLED_PREFERENCES, load_preferences
from finetune.core.run_folder import RUN_CONFIG, read_run_info
from finetune.core.run_status import FINAL_STATES, read_metrics, write_status
from finetune.services import course
from finetune.services.admission import RunError, check_sources
from finetune.services.deploy import default_preset
from finetune.services.evaluate import judge_accuracy
from finetune.services.runs import RunManager

RUN_STEPS = ("qlora", "reward", "dpo")
RANK_EXPERIMENT = course.RANK_EXPERIMENT
POLLED = RUN_STEPS + (RANK_EXPERIMENT,)


def notice(sentence: str) -> str:
    return f"**What to notice:** {sentence}"


def progress_of(manager: RunManager, request: gr.Request | None) -> CourseProgress:
    return CourseProgress(manager.root, visitor_of(request))


def acting_visitor(request: gr.Request | None, what: str) -> Visitor:
    visitor = visitor_of(request)
    try:
        require_signed_in(visitor, what)
    except AccessDenied as error:
        raise refusal(str(error)) from None
    return visitor


def qlora_config(profile: HardwareProfile, rank: int) -> RunConfig:
    """This hardware's QLoRA preset at the learner's rank (alpha = 2 x rank), at the course's size."""
    raw, size = to_dict(load_config(CONFIGS_DIR / f"{default_preset(profile)}.yaml")), course.CourseSize.from_env()
    raw["run_name"] = "course-qlora"
    raw["lora"].update(rank=int(rank), alpha=2 * int(rank))
    if size.train_steps:
        raw["training"].update(max_steps=size.train_steps, save_steps=size.train_steps)
    if size.batch_size:
        raw["training"]["batch_size"] = size.batch_size
    if size.max_seq_length:
        raw["data"]["max_seq_length"] = size.max_seq_length
    if size.validation_fraction:
        raw["data"]["validation_fraction"] = size.validation_fraction
    raw["data"]["max_eval_samples"] = size.eval_samples
    if size.bits:
        raw["model"]["bits"] = size.bits
    return from_dict(raw)


def preference_step_config(stage: str, base: RunConfig, start_adapter: str = "") -> RunConfig:
    """A reward or DPO config as the RLHF tab builds it (components/rlhf_form.py), on the QLoRA run's model, the
    bundled pairs, at the course's size."""
    size = course.CourseSize.from_env()
    embedded = base.model.source == load_config(CONFIGS_DIR / "cpu-quick.yaml").model.source
    form = {"model_kind": "Embedded" if embedded else "Local folder", "model_source": base.model.source,
            "model_bits": base.model.bits, "lora_rank": base.lora.rank, "reward_max_steps": size.preference_steps,
            "policy_max_steps": size.preference_steps, "start_adapter": start_adapter}
    if size.batch_size:
        form["batch_size"] = size.batch_size
    if size.max_seq_length:
        form["max_seq_length"] = size.max_seq_length + 64  # a pair's prompt and answer
    cfg = stage_config_from_form(stage, BUNDLED_PREFERENCES, form)
    cfg.data.max_eval_samples = size.eval_samples
    return cfg


def _start(manager: RunManager, cfg: RunConfig, visitor: Visitor, stage: str) -> str:
    """Queue a course job like the full tabs do: sources checked first, then the run manager's admission."""
    try:
        check_sources(cfg)
        if stage in ("reward", "dpo"):  # malformed pairs are reported now, not by a failed child
            load_preferences(cfg.data, cfg.preference.format, want="paired", seed=cfg.training.seed)
        run_id = manager.start(cfg, visitor=visitor)
    except (ConfigError, RunError, AccessDenied, ModelSourceError, ValueError) as error:
        raise refusal(f"Not started: {error}") from None
    write_status(manager.run_dir(run_id), stage=cfg.stage)
    return run_id


def _train_time(manager: RunManager, profile: HardwareProfile, cfg: RunConfig, pairs: bool) -> str:
    measured = manager.expected_seconds(cfg)
    if measured is not None:
        return course.expected_time_text(measured, True)
    evaluations = course.evaluations(cfg.training.max_steps, cfg.training.eval_steps, at_start=pairs) \
        if cfg.data.validation_fraction > 0 else 0
    guess = course.guess_train_seconds(cfg.training.max_steps, cfg.training.batch_size, cfg.data.max_seq_length,
                                       pairs, profile.is_cuda, evaluations, held_out_rows(cfg),
                                       reference=cfg.stage == "dpo")
    return course.expected_time_text(guess, False)


def held_out_rows(cfg: RunConfig) -> int:
    """The rows each evaluation of a course run reads: the bundled set's validation split, at most the cap."""
    split = paths.DATA_DIR / cfg.data.source.removeprefix("bundled:") / "validation.jsonl"
    rows = sum(1 for line in split.read_text(encoding="utf-8").splitlines() if line.strip()) if split.is_file() else 0
    return min(rows, cfg.data.max_eval_samples or rows)


def _other_time(step: str, profile: HardwareProfile, last: dict[str, Any]) -> str:
    if isinstance(last.get("seconds"), (int, float)):
        return course.expected_time_text(last["seconds"], True)
    size = course.CourseSize.from_env()
    return course.expected_time_text(course.guess_seconds(step, size, profile.is_cuda), False)


def expected_times(manager: RunManager, profile: HardwareProfile, progress: CourseProgress, rank: int
                   ) -> dict[str, str]:
    """Every step's expected time on this hardware, said before it starts."""
    qlora = qlora_config(profile, rank)
    times = {step.key: _other_time(step.key, profile, progress.result(step.key)) for step in course.STEPS}
    times["qlora"] = _train_time(manager, profile, qlora, False)
    for stage in ("reward", "dpo"):
        times[stage] = _train_time(manager, profile, preference_step_config(stage, qlora), True)
    return times


def start_qlora(manager: RunManager, profile: HardwareProfile, rank: float | None, request: gr.Request = None) -> str:
    visitor = acting_visitor(request, "start a training run")
    rank = int(rank) if isinstance(rank, (int, float)) and rank >= 1 else 16
    run_id = _start(manager, qlora_config(profile, rank), visitor, "sft")
    CourseProgress(manager.root, visitor).record("qlora", done=False, run_id=run_id, sentence=None)
    return f"Started `{run_id}`; its loss curve is also in the **Train** tab."


def rank_experiment_config(learner: RunConfig) -> RunConfig:
    """The learner's QLoRA run at the experiment's other rank (alpha = 2 x rank as the course sets it): same data,
    split, steps and seed, so the rank is the one difference."""
    raw, rank = to_dict(learner), course.other_rank(learner.lora.rank)
    raw["run_name"] = f"course-rank{rank}"
    raw["lora"].update(rank=rank, alpha=2 * rank)
    return from_dict(raw)


def start_rank_experiment(manager: RunManager, profile: HardwareProfile, request: gr.Request = None) -> str:
    """Step 3's experiment: queue the learner's QLoRA run again at rank 4 (16 when theirs is 4)."""
    visitor = acting_visitor(request, "start a training run")
    progress = CourseProgress(manager.root, visitor)
    learner_run = progress.result("qlora").get("run_id")
    if not learner_run:
        raise refusal("Start step 3's QLoRA run first: the experiment repeats it at another rank.")
    try:
        learner = load_config(manager.run_dir(learner_run) / RUN_CONFIG)
    except (RunError, ConfigError, OSError):
        raise refusal(f"Run `{learner_run}` no longer exists: start step 3 again.") from None
    cfg = rank_experiment_config(learner)
    run_id = _start(manager, cfg, visitor, "sft")
    progress.record(RANK_EXPERIMENT, done=False, run_id=run_id, against=learner_run, sentence=None)
    return (f"Started `{run_id}`: your run `{learner_run}` again at rank {cfg.lora.rank} instead of "
            f"{learner.lora.rank}. It waits in the queue behind your other runs.")


def finished_run(manager: RunManager, progress: CourseProgress, step: str, before: str) -> str:
    """The run a step builds on, once it completed; a clear refusal otherwise."""
    run_id = progress.result(step).get("run_id")
    if not run_id or manager.status(run_id).get("state") != "completed":
        raise refusal(f"Finish step {before} first: its run has not completed yet.")
    return run_id


def start_reward(manager: RunManager, profile: HardwareProfile, request: gr.Request = None) -> str:
    visitor = acting_visitor(request, "start a training run")
    progress = CourseProgress(manager.root, visitor)
    qlora = load_config(manager.run_dir(finished_run(manager, progress, "qlora", "3 (QLoRA)")) / RUN_CONFIG)
    run_id = _start(manager, preference_step_config("reward", qlora), visitor, "reward")
    progress.record("reward", done=False, run_id=run_id, sentence=None)
    return f"Started `{run_id}` on the bundled course pairs; the full view is in the **RLHF** tab."


def start_dpo(manager: RunManager, profile: HardwareProfile, request: gr.Request = None) -> str:
    visitor = acting_visitor(request, "start a training run")
    progress = CourseProgress(manager.root, visitor)
    start = finished_run(manager, progress, "qlora", "3 (QLoRA)")
    qlora = load_config(manager.run_dir(start) / RUN_CONFIG)
    run_id = _start(manager, preference_step_config("dpo", qlora, start), visitor, "dpo")
    progress.record("dpo", done=False, run_id=run_id, sentence=None)
    return f"Started `{run_id}` from your adapter `{start}`; the full view is in the **RLHF** tab."


def _values(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [r[key] for r in rows if isinstance(r.get(key), (int, float)) and not is_summary(r)]


def _trainable(folder: Path, cfg: RunConfig) -> int:
    """The trainable weights a run counted in its run info, else the estimate's count for its settings."""
    info = read_run_info(folder)
    if isinstance(info.get("trainable_parameters"), int):
        return info["trainable_parameters"]
    return lora_parameter_count(model_shape(cfg.model), cfg.lora)[0]


def rank_experiment_sentence(manager: RunManager, run_id: str, learner_run: str) -> str:
    folder, learner_folder = manager.run_dir(run_id), manager.run_dir(learner_run)
    cfg, learner = load_config(folder / RUN_CONFIG), load_config(learner_folder / RUN_CONFIG)
    losses = [_values(read_metrics(f), "eval_loss") for f in (learner_folder, folder)]
    return course.rank_sentence(learner.lora.rank, _trainable(learner_folder, learner), cfg.lora.rank,
                                _trainable(folder, cfg), losses[0][-1] if losses[0] else None,
                                losses[1][-1] if losses[1] else None, held_out_rows(cfg))


def completed_run_sentence(manager: RunManager, step: str, run_id: str, against: str | None = None) -> str:
    """The step's sentence from a completed run's own folder (the rank experiment's also reads ``against``, the
    learner's run it repeats)."""
    if step == RANK_EXPERIMENT and against:
        return rank_experiment_sentence(manager, run_id, against)
    folder, status = manager.run_dir(run_id), manager.status(run_id)
    rows, cfg = read_metrics(folder), load_config(folder / RUN_CONFIG)
    if step == "reward":
        judge = judge_accuracy(folder)
        return course.reward_sentence(judge.accuracy, judge.pairs)
    if step == "dpo":
        accuracies = _values(rows, "eval_rewards/accuracies")
        return course.dpo_sentence(int(status.get("step") or 0), _values(rows, "eval_rewards/margins"),
                                   accuracies[-1] if accuracies else None, cfg.preference.beta)
    losses = _values(rows, "loss")
    if not losses:
        return "The run completed without logging a training loss."
    return course.run_sentence(int(status.get("step") or 0), status.get("duration"), losses[0], losses[-1],
                               _values(rows, "eval_loss"), cfg.model.bits)


def _run_view(manager: RunManager, progress: CourseProgress, step: str) -> tuple[str, str]:
    """(progress bar, notice) of one run step, read from its folder; a completed run's sentence is kept."""
    entry = progress.result(step)
    run_id, elem = entry.get("run_id"), f"course-{step}-progress"
    if not run_id:
        return progress_html(elem, {"state": "idle"}, []), ""
    try:
        status = live_status(manager, run_id)
        rows = read_metrics(manager.run_dir(run_id))
    except RunError:  # deleted from the Train tab's history
        return progress_html(elem, {"state": "idle"}, []), f"Run `{run_id}` no longer exists: start the step again."
    if status.get("state") == "failed":
        why = paths.for_visitors(status.get("error") or "see its log in the Train tab")
        return progress_html(elem, status, rows), f"Run `{run_id}` **failed**: {why}"
    if status.get("state") != "completed":
        return progress_html(elem, status, rows), ""
    sentence = entry.get("sentence")
    if not sentence:
        try:
            sentence = completed_run_sentence(manager, step, run_id, entry.get("against"))
        except (RunError, ConfigError, OSError):  # the learner's run it compares with was deleted
            return progress_html(elem, status, rows), f"Run `{entry.get('against')}` no longer exists."
        progress.record(step, done=step in course.STEP_KEYS, sentence=sentence, seconds=status.get("duration"))
    return progress_html(elem, status, rows), notice(sentence)


def poll_course(manager: RunManager, request: gr.Request = None) -> tuple[str, ...]:
    """The three run steps' and the rank experiment's bars and sentences, and the path line (cheap enough for a 2 s timer)."""
    progress = progress_of(manager, request)
    views = [part for step in POLLED for part in _run_view(manager, progress, step)]
    return (*views, path_markdown(progress))


def course_timer(manager: RunManager, request: gr.Request = None) -> gr.Timer:
    """The course's timer ticks while one of its runs is underway and stops when none is (an idle page polled
    every 2 s for nothing). A step's Start, a page load and opening the tab turn it back on to look."""
    progress = progress_of(manager, request)
    run_ids = [progress.result(step).get("run_id") for step in POLLED]
    return gr.Timer(active=any(_underway(manager, run_id) for run_id in run_ids if run_id))


def _underway(manager: RunManager, run_id: str) -> bool:
    try:
        return manager.status(run_id).get("state") not in FINAL_STATES
    except RunError:  # deleted from the Train tab's history
        return False


def path_markdown(progress: CourseProgress) -> str:
    done = set(progress.done()) & set(course.STEP_KEYS)
    marks = [f"**✓ {number}. {step.title}**" if step.key in done else f"{number}. {step.title}"
             for number, step in enumerate(course.STEPS, start=1)]
    kept = "" if progress.kept else " (sign in to keep your progress)"
    return f"**Your path** ({len(done)} of {len(course.STEPS)} done{kept}): " + " · ".join(marks)
