"""The "Start here" tab: the course as a path of steps, each with a few sentences, ONE primary button that does
the step with sensible defaults through the same services the full tabs call (the estimate, the quantization
measurement, the run manager, the chat engine and feedback store, the reward model's judge, the held-out loss),
the learner's own result with a "what to notice" sentence computed from their numbers (finetune/services/course.py), the
expected time before it starts, and a link to the full tab.

Progress is kept per visitor on disk (finetune/core/course_progress.py), so a reload or an app restart finds it. The
training steps run as ordinary jobs in the queue: their runs appear in the Train, Chat, RLHF and Evaluate tabs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from components.course_runs import (POLLED, RANK_EXPERIMENT, RUN_STEPS, acting_visitor, course_timer, expected_times,
                                    finished_run, notice, path_markdown, poll_course, progress_of, qlora_config,
                                    start_dpo, start_qlora, start_rank_experiment, start_reward)
from components.downloads import downloadable
from components.page_loads import on_page_load
from components.shared import CHAT_SLOT, bind, progress_html, refusal, visitor_of
from finetune.core.config import BUNDLED_DATASET, ConfigError, LoraSettings, load_config
from finetune.core.course_progress import CourseProgress
from finetune.core.estimate import lora_parameter_count, model_shape, targeted_linears
from finetune.core.hardware import HardwareProfile
from finetune.core.models import ModelSourceError
from finetune.core.run_folder import ADAPTER_DIR, RUN_CONFIG
from finetune.services import course
from finetune.services.benchmarks import BenchmarkService
from finetune.services.chat import ChatEngine, SamplingSettings
from finetune.services.evaluate import (adapter_name, candidate_loss, candidates, load_eval_rows,
                                       loss_difference_interval, model_label)
from finetune.services.feedback import FeedbackError, FeedbackStore
from finetune.services.lab_report import collect, write_report
from finetune.services.quantize import FORMATS, MB, measure
from finetune.services.runs import RunManager

POLL_SECONDS = 2.0
VOTES = [("Tuned is better", "second"), ("Base is better", "first"), ("No difference", "tie")]
VOTE_WORDS = {"second": "tuned", "first": "base", "tie": "no difference"}
QUANT_KEYS = ("16bit", "nf4-dq")


# --- step 1: count ----------------------------------------------------------------------------------------------

def count_weights(manager: RunManager, profile: HardwareProfile, rank: float | None,
                  request: gr.Request = None) -> str:
    """LoRA's trainable weights at ``rank`` on the course's model, counted like the Train tab's estimate."""
    if not isinstance(rank, (int, float)) or rank < 1 or not float(rank).is_integer():
        raise refusal(f"The rank is a whole number of at least 1, got {rank!r}.")
    cfg = qlora_config(profile, int(rank))
    try:
        shape = model_shape(cfg.model)
        lora = LoraSettings(rank=int(rank), alpha=2 * int(rank), target_modules=cfg.lora.target_modules)
    except (ConfigError, ModelSourceError, OSError) as error:
        raise refusal(f"Cannot count: {error}") from None
    trainable, total = lora_parameter_count(shape, lora)
    sentence = course.lora_sentence(int(rank), trainable, total, len(targeted_linears(shape, lora)))
    progress_of(manager, request).record("lora", rank=int(rank), trainable=trainable, total=total, sentence=sentence)
    return notice(sentence)


# --- step 2: quantization ---------------------------------------------------------------------------------------

def compare_bits(manager: RunManager, profile: HardwareProfile, request: gr.Request = None,
                 progress: gr.Progress = gr.Progress()) -> tuple[str, pd.DataFrame]:
    """The course's model at 16-bit and in 4-bit NF4 (double quant), measured like the Quantization tab does."""
    acting_visitor(request, "run a quantization comparison")
    size, source = course.CourseSize.from_env(), qlora_config(profile, 16).model.source
    started = course.now()
    try:
        rows = load_eval_rows(BUNDLED_DATASET, "validation", size.quant_rows)
        results = {}
        for index, key in enumerate(QUANT_KEYS):
            progress(index / len(QUANT_KEYS), desc=f"loading and measuring {FORMATS[key].label(profile)}")
            results[key] = measure(FORMATS[key], source, rows, "What does LoRA train?", 8, profile=profile)
    except (ModelSourceError, ValueError, RuntimeError, OSError, ImportError) as error:
        raise refusal(f"Could not measure: {error}") from None
    half, four = results["16bit"], results["nf4-dq"]
    sentence = course.quant_sentence(half.label, half.layer_bytes, four.layer_bytes, half.perplexity,
                                     four.perplexity, len(rows))
    # Rounded as the sentence quotes them, so the table and the sentence read the same numbers.
    table = [[r.label, round(r.layer_bytes / MB, 1), round(r.perplexity, 2)] for r in results.values()]
    progress_of(manager, request).record("quantization", table=table, sentence=sentence,
                                       seconds=round(course.now() - started, 1))
    return notice(sentence), pd.DataFrame(table, columns=["format", "quantized layers (MB)", "perplexity"])


# --- step 4: chat and vote ----------------------------------------------------------------------------------------

def ask_both(manager: RunManager, engine: ChatEngine, store: FeedbackStore | None, prompt: str | None,
             request: gr.Request = None) -> tuple[str, str, str]:
    """The base model and the course's adapter answer ``prompt`` greedily; the turn is stored for a vote."""
    visitor = acting_visitor(request, "chat with feedback")
    progress = CourseProgress(manager.root, visitor)
    if not (prompt or "").strip():
        raise refusal("Type a question first.")
    run_id = finished_run(manager, progress, "qlora", "3 (QLoRA)")
    cfg = load_config(manager.run_dir(run_id) / RUN_CONFIG)
    settings = SamplingSettings(max_new_tokens=course.CourseSize.from_env().answer_tokens, temperature=0.0)
    started = course.now()
    try:
        base, tuned = engine.answer_pair(prompt.strip(), [], [], cfg.model, run_id,
                                         manager.run_dir(run_id) / ADAPTER_DIR, settings)
    except (ValueError, RuntimeError) as error:
        raise refusal(str(error)) from None
    ids = store.record_turn(model=cfg.model.source, adapter=run_id, prompt=prompt.strip(), base_history=[],
                            tuned_history=[], settings=vars(settings).copy(), base_response=base,
                            tuned_response=tuned, user=visitor.owner,
                            session=getattr(request, "session_hash", None)) if store is not None else {}
    progress.record("chat", done="chat" in progress.done(), seconds=round(course.now() - started, 1),
                    pending={"ids": ids, "prompt": prompt.strip(), "base": base, "tuned": tuned, "adapter": run_id})
    return base, tuned, f"Which answer to “{prompt.strip()}” is better? Pick one and save your vote."


def save_vote(manager: RunManager, store: FeedbackStore | None, choice: str | None,
              request: gr.Request = None) -> tuple[str, str]:
    """Store the vote on the last course answer pair (base first, tuned second) and read all the learner's votes
    on that adapter back as a win rate."""
    visitor = acting_visitor(request, "give feedback")
    progress = CourseProgress(manager.root, visitor)
    pending = progress.result("chat").get("pending")
    if not pending:
        raise refusal("Ask both models a question first.")
    if choice not in VOTE_WORDS:
        raise refusal("Pick which answer is better first.")
    if store is None:
        raise refusal("This app keeps no feedback store.")
    try:
        store.add_preference(pending["ids"]["base"], pending["ids"]["tuned"], choice, user=visitor.owner,
                             session=getattr(request, "session_hash", None))
    except (FeedbackError, KeyError) as error:
        raise refusal(f"Could not save the vote: {error}") from None
    counts = store.win_counts(visitor.owner if visitor.sign_in else None).get(pending["adapter"], {})
    sentence = course.vote_sentence(pending["adapter"], counts)
    turns = progress.result("chat").get("turns") or []
    turn = {key: pending[key] for key in ("prompt", "base", "tuned", "adapter")}
    progress.record("chat", turns=turns + [{**turn, "vote": VOTE_WORDS[choice]}], pending=None, sentence=sentence)
    return notice(sentence), (f"Saved your vote ({VOTE_WORDS[choice]}) on “{pending['prompt']}”. Ask another "
                              "question to vote again.")


# --- step 7: evaluate ---------------------------------------------------------------------------------------------

def evaluate_course(manager: RunManager, engine: ChatEngine, request: gr.Request = None,
                    progress: gr.Progress = gr.Progress()) -> str:
    """Held-out loss of the base, the QLoRA adapter and (when trained) the DPO adapter on the same rows, each
    adapter against its baseline with a 95% paired-bootstrap interval (as the Evaluate tab computes it)."""
    visitor = acting_visitor(request, "evaluate")
    record = CourseProgress(manager.root, visitor)
    learner_run = finished_run(manager, record, "qlora", "3 (QLoRA)")
    experiment = [run for run in _finished_or_none(manager, record, RANK_EXPERIMENT)
                  if record.result(RANK_EXPERIMENT).get("against") == learner_run]
    run_dirs = {run_id: manager.run_dir(run_id) for run_id in
                [learner_run] + _finished_or_none(manager, record, "dpo") + experiment}
    started, size = course.now(), course.CourseSize.from_env()
    try:
        rows = load_eval_rows(BUNDLED_DATASET, "validation", size.eval_rows)
        chosen = candidates(run_dirs)
        results = {}
        for index, candidate in enumerate(chosen):
            progress(index / len(chosen), desc=f"held-out loss of {candidate.name}")
            results[candidate.name] = candidate_loss(engine, candidate, rows)
    except (ValueError, RuntimeError, OSError) as error:
        raise refusal(f"Could not evaluate: {error}") from None
    verdicts = [_verdict(results, c.name, against, len(rows)) for c in chosen if c.adapter_dir is not None
                for against in (model_label(c.model), c.start_name) if against in results]
    # The rank experiment's run against the learner's run it repeats: the only difference is the rank.
    verdicts += [f"Rank experiment: {_verdict(results, adapter_name(run), adapter_name(learner_run), len(rows))}"
                 for run in experiment if adapter_name(run) in results and adapter_name(learner_run) in results]
    sentence = " ".join(verdicts)
    record.record("evaluate", verdicts=verdicts, sentence=sentence, seconds=round(course.now() - started, 1))
    return notice(sentence)


def _finished_or_none(manager: RunManager, progress: CourseProgress, step: str) -> list[str]:
    run_id = progress.result(step).get("run_id")
    return [run_id] if run_id and manager.status(run_id).get("state") == "completed" else []


def _verdict(results: dict[str, Any], name: str, against: str, rows: int) -> str:
    return course.loss_verdict_sentence(name, against, results[name].loss, results[against].loss, rows,
                                        loss_difference_interval(results[name], results[against]))


def forgetting_markdown(service: BenchmarkService | None, request: gr.Request = None) -> str:
    """PEFT's promise that the base keeps what it knew, in the learner's own numbers: the newest benchmark job's
    (of those the visitor may see) base-vs-adapter differences, or where to run the check."""
    job = service.latest_job(visitor_of(request)) if service is not None else None
    rows = service.table(job) if job else []
    if not rows:
        return ("**Does PEFT keep what the base knew? Your numbers:** no forgetting check yet. Run one in the "
                "**Evaluate** tab (Benchmarks -> Forgetting check): the base and your adapter answer the same "
                "general questions, unrelated to your training data.")
    lines = ["**Does PEFT keep what the base knew? Your numbers** (newest forgetting check, general questions "
             "unrelated to your data):"]
    for row in rows:
        lines.append(f"- `{row.adapter}`, {row.task} ({row.metric}, {row.items} questions): base {row.base:.3f}, "
                     f"adapter {row.tuned:.3f}, difference {row.difference:+.3f} ({row.interval_text()}): "
                     f"**{row.verdict}**")
    return "\n".join(lines)


# --- step 8: the report -------------------------------------------------------------------------------------------

def lab_report(manager: RunManager, feedback_db: Path | None, benchmarks: BenchmarkService | None,
               request: gr.Request = None) -> tuple[list[str], str]:
    """The visitor's lab report, as HTML and Markdown downloads, and what it holds."""
    visitor = acting_visitor(request, "download a lab report")
    progress = CourseProgress(manager.root, visitor)
    data = collect(manager, visitor, progress.load(), feedback_db, benchmarks)
    votes = sum(1 for _ in data.turns)
    sentence = course.report_sentence(len(data.runs), votes, len(progress.done()) + ("report" not in progress.done()))
    progress.record("report", sentence=sentence)
    data = collect(manager, visitor, progress.load(), feedback_db, benchmarks)  # with this step's sentence
    assert progress.path is not None  # _acting: a visitor who may act has a record
    page, text = write_report(data, progress.folder / progress.path.stem)
    return [downloadable(page), downloadable(text)], notice(sentence)


# --- page load -----------------------------------------------------------------------------------------------------


def restore_course(manager: RunManager, profile: HardwareProfile, request: gr.Request = None) -> tuple[Any, ...]:
    """Everything the course shows, from the visitor's record: sentences, times, the last answers and tables."""
    progress = progress_of(manager, request)
    record = progress.load()
    rank = (record.get("lora", {}).get("result") or {}).get("rank") or 16
    times = expected_times(manager, profile, progress, rank)
    sentences = {step.key: notice(s) if (s := (record.get(step.key, {}).get("result") or {}).get("sentence"))
                 else "" for step in course.STEPS}
    quant = (record.get("quantization", {}).get("result") or {}).get("table") or []
    return (rank, *(times[step.key] for step in course.STEPS), *(sentences[step.key] for step in course.STEPS),
            pd.DataFrame(quant, columns=["format", "quantized layers (MB)", "perplexity"]), path_markdown(progress))


# --- layout ----------------------------------------------------------------------------------------------------------

INTRO = ("# Start here\nThe course in eight steps, on your own runs: PEFT and LoRA, quantization, QLoRA, RLHF "
         "(feedback → reward model → DPO) and evaluation. Each step has one button that does it with sensible "
         "settings and says what to notice in **your** numbers; **Open the … tab** shows every control.")


EXPERIMENT_TEXT = ("Your QLoRA run trained once more with only the rank changed: rank 4, or 16 if yours is 4. Same "
                   "rows, steps and seed, about as long as step 3. Rank sets how many weights the adapter has; "
                   "whether more of them help depends on how much there is to learn. Step 7 then scores both "
                   "runs on the same held-out questions with an interval.")


def tab_link_js(tab: str) -> str:
    """Client-side jump to a tab by its label (no server round trip, no dependency on how app.py nests tabs)."""
    return ("() => { const tab = [...document.querySelectorAll('button[role=tab]')]"
            f".find(b => b.innerText.trim() === {tab!r}); if (tab) {{ tab.click(); window.scrollTo(0, 0); }} }}")


def _step_box(number: int, step: course.CourseStep, ui: dict[str, Any]) -> None:
    """One step: its words, its inputs (by step), its button, expected time, result and the full tab's link."""
    key = step.key
    gr.Markdown(f"### {number}. {step.title} · *{step.competency}*\n{step.text}", elem_id=f"course-{key}-text")
    if key == "lora":
        ui["rank"] = gr.Number(16, label="LoRA rank (r)", precision=0, minimum=1, elem_id="course-rank")
    if key == "chat":
        ui["prompt"] = gr.Textbox(label="Your question", placeholder="e.g. What does a LoRA adapter change?",
                                  elem_id="course-prompt")
    with gr.Row():
        ui[f"{key}_go"] = gr.Button(step.button, variant="primary", elem_id=f"course-{key}-go", scale=3)
        ui[f"{key}_tab"] = gr.Button(f"Open the {step.tab} tab →", size="sm", elem_id=f"course-{key}-tab", scale=1)
        ui[f"{key}_tab"].click(None, js=tab_link_js(step.tab))
    ui[f"{key}_time"] = gr.Markdown(elem_id=f"course-{key}-time")
    if key in RUN_STEPS:
        ui[f"{key}_started"] = gr.Markdown(elem_id=f"course-{key}-started")
        ui[f"{key}_progress"] = gr.HTML(progress_html(f"course-{key}-progress", {"state": "idle"}, []))
    if key == "chat":
        with gr.Row():
            ui["base_answer"] = gr.Textbox(label="Base model", lines=4, interactive=False, elem_id="course-base")
            ui["tuned_answer"] = gr.Textbox(label="Your adapter", lines=4, interactive=False, elem_id="course-tuned")
        with gr.Row():
            ui["vote"] = gr.Radio(VOTES, label="Which answer is better?", elem_id="course-vote", scale=3)
            ui["save_vote"] = gr.Button("Save my vote", elem_id="course-save-vote", scale=1)
        ui["vote_hint"] = gr.Markdown(elem_id="course-vote-hint")
    ui[f"{key}_notice"] = gr.Markdown(elem_id=f"course-{key}-notice")
    if key == "qlora":
        _rank_experiment_box(ui)
    if key == "quantization":
        ui["quant_table"] = gr.Dataframe(pd.DataFrame(columns=["format", "quantized layers (MB)", "perplexity"]),
                                         interactive=False, elem_id="course-quant-table")
    if key == "evaluate":
        ui["forgetting"] = gr.Markdown(elem_id="course-forgetting")
    if key == "report":
        ui["report_files"] = gr.File(label="Your lab report", file_count="multiple", interactive=False,
                                     elem_id="course-report-files")


def _rank_experiment_box(ui: dict[str, Any]) -> None:
    """Step 3's small experiment: the learner's run again at another rank, through the same run queue."""
    with gr.Accordion("Experiment: does a bigger adapter learn more here? (rank 4 against 16)", open=False,
                      elem_id="course-rank-experiment"):
        gr.Markdown(EXPERIMENT_TEXT)
        ui["rank_go"] = gr.Button("Train my run again at the other rank", elem_id="course-rank-go")
        ui["rank_started"] = gr.Markdown(elem_id="course-rank-started")
        ui["rank_progress"] = gr.HTML(progress_html("course-rank-progress", {"state": "idle"}, []))
        ui["rank_notice"] = gr.Markdown(elem_id="course-rank-notice")


def build_course_tab(manager: RunManager, profile: HardwareProfile, engine: ChatEngine,
                     store: FeedbackStore | None = None, benchmarks: BenchmarkService | None = None
                     ) -> dict[str, Any]:
    ui: dict[str, Any] = {"intro": gr.Markdown(INTRO), "path": gr.Markdown(elem_id="course-path")}
    for number, step in enumerate(course.STEPS, start=1):
        with gr.Group(elem_id=f"course-{step.key}"):
            _step_box(number, step, ui)
    _wire(manager, profile, engine, store, benchmarks, ui)
    return ui


def _wire(manager: RunManager, profile: HardwareProfile, engine: ChatEngine, store: FeedbackStore | None,
          benchmarks: BenchmarkService | None, ui: dict[str, Any]) -> None:
    ui["lora_go"].click(bind(count_weights, manager, profile), ui["rank"], ui["lora_notice"], api_name="course_count")
    ui["quantization_go"].click(bind(compare_bits, manager, profile), None, [ui["quantization_notice"],
                                ui["quant_table"]], api_name="course_quantize", concurrency_limit=1,
                                concurrency_id="quantize")
    timer, look = gr.Timer(POLL_SECONDS), bind(course_timer, manager)
    for key, handler, inputs in (("qlora", start_qlora, [ui["rank"]]), ("reward", start_reward, None),
                                 ("dpo", start_dpo, None)):
        ui[f"{key}_go"].click(bind(handler, manager, profile), inputs, ui[f"{key}_started"],
                              api_name=f"course_{key}", concurrency_limit=1, concurrency_id="train-start"
                              ).then(look, None, timer, api_visibility="private", queue=False)
    ui["rank_go"].click(bind(start_rank_experiment, manager, profile), None, ui["rank_started"],
                        api_name="course_rank_experiment", concurrency_limit=1, concurrency_id="train-start"
                        ).then(look, None, timer, api_visibility="private", queue=False)
    ui["chat_go"].click(bind(ask_both, manager, engine, store), ui["prompt"],
                        [ui["base_answer"], ui["tuned_answer"], ui["vote_hint"]], api_name="course_ask",
                        **CHAT_SLOT)  # the Chat tab's slot: answers take turns on the one model
    ui["save_vote"].click(bind(save_vote, manager, store), ui["vote"], [ui["chat_notice"], ui["vote_hint"]],
                          api_name="course_vote")
    ui["evaluate_go"].click(bind(evaluate_course, manager, engine), None, ui["evaluate_notice"],
                            api_name="course_evaluate", concurrency_limit=1, concurrency_id="chat"
                            ).then(bind(forgetting_markdown, benchmarks), None, ui["forgetting"],
                                   api_visibility="private")
    ui["report_go"].click(bind(lab_report, manager, store.path if store else None, benchmarks), None,
                          [ui["report_files"], ui["report_notice"]], api_name="course_report")
    live = [ui[f"{key}_{part}"] for key in POLLED for part in ("progress", "notice")] + [ui["path"]]
    poll = bind(poll_course, manager)
    timer.tick(poll, None, live, api_name="course_poll", show_progress="hidden", queue=False
               ).then(look, None, timer, api_visibility="private", queue=False, show_progress="hidden")
    on_page_load(look, None, timer)
    restored = ([ui["rank"]] + [ui[f"{s.key}_time"] for s in course.STEPS]
                + [ui[f"{s.key}_notice"] for s in course.STEPS] + [ui["quant_table"], ui["path"]])
    on_page_load(bind(restore_course, manager, profile), None, restored)
    on_page_load(bind(forgetting_markdown, benchmarks), None, ui["forgetting"])
    ui["refresh_forgetting"] = bind(forgetting_markdown, benchmarks)
