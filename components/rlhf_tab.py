"""The RLHF tab: the four steps in order — a pretrained model, human feedback, a reward model, and fine-tuning
guided by the preferences — each showing which data and models it uses.

Steps 3 and 4 train through the same RunManager as SFT (a child process, metrics.jsonl, Stop, history). The
tab watches the newest reward run and the newest DPO/KTO/GRPO run with a ``gr.Timer``; the new adapter lands in
``runs/<id>/adapter`` and so appears in the Chat tab, where new feedback closes the loop.

Handlers take the form as keyword arguments (``inputs_kwargs``), so ``gradio_client`` can call e.g.
``client.predict(model_source="...", reward_max_steps=3, api_name="/rlhf_start_reward")``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from components.forms import MODEL_KINDS, PREFERENCE_DATA_KINDS
from components.rlhf_form import BASE_CHOICE, GRPO_REWARD_KINDS, preset
from components.rlhf_playground import compare_policy, last_chat_turn, reward_choices, score_answers, start_choices
from components.rlhf_rules import (GRPO_DATA, bench_prompt_choices, bench_rescore, bench_sample, drills_rules_text,
                                   grpo_view, rules_config_check)
from components.rlhf_runs import (POLICY_METHODS, RLHF_COLOUR, pipeline_text, poll_rlhf, preview_data, start_stage,
                                  steps_box)
from components.page_loads import on_page_load
from components.shared import (PREVIEW_SLOT, bind, list_hub_options, progress_html, stop_run, visible_reward_models,
                               visitor_of)
from finetune.core.access import Visitor
from finetune.core.config import (DPO_LOSSES, EMBEDDED_MODEL, KEEP_CHOICES, KTO_LOSSES, REPORT_TO, RunConfig,
                                  field_help)
from finetune.core.distributed import offers_processes
from finetune.services.chat import ChatEngine
from finetune.services.reward_bench import MAX_BENCH_ANSWERS
from finetune.services.runs import RunManager
from finetune.services.scoring import ScorerCache

POLL_SECONDS = 2.0
RULES_INTRO = (
    "**RLHF or RLVR.** A reward model learned from votes (step 3) is RLHF: it scores taste, and can be fooled. A "
    "rule that checks the answer (the right number, a format, a length) is RLVR, reinforcement learning with "
    "verifiable rewards: it cannot be argued with, but it pays for exactly what it checks. GRPO samples several "
    "answers per prompt and compares each answer's reward with its group's mean: answers above the mean are "
    "made more likely. Rules are declared, not programmed: kinds `match`, `numeric` (extract: whole, "
    "last_number, answer_tag), `format` (pattern), `length` (min_words, max_words), `contains` / "
    "`not_contains` (text), each with a weight. The Learn tab puts your run's numbers next to this.")


# --- layout --------------------------------------------------------------------------------------------------------

def _info(section: str, name: str) -> str:
    return field_help(section, name)


STEP_TITLES = {1: "Step 1 · The pretrained model", 2: "Step 2 · Human feedback: preference data",
               3: "Step 3 · A reward model trained on the feedback", 4: "Step 4 · Fine-tuning guided by the preferences"}


def _step_box(number: int, boxes: list[Any]) -> Any:
    """A step's accordion, closed to its title (the pipeline above sums up every step) except the current one:
    step 3 until a reward model exists, then step 4 (``open_current_step`` says which on each page load)."""
    box = gr.Accordion(STEP_TITLES[number], open=number == 3, elem_id=f"rlhf-step-{number}")
    boxes.append(box)
    return box


def current_step(manager: RunManager, visitor: Visitor) -> int:
    """The step a visitor is at: 3 (train a reward model) until one of theirs exists, then 4."""
    return 4 if visible_reward_models(manager, visitor) else 3


def open_current_step(manager: RunManager, request: gr.Request = None) -> tuple[Any, ...]:
    current = current_step(manager, visitor_of(request))
    return tuple(gr.Accordion(open=number == current) for number in STEP_TITLES)


def _step1(form: dict[str, Any], boxes: list[Any]) -> None:
    with _step_box(1, boxes):
        gr.Markdown("The model whose answers people rated. DPO/KTO/GRPO can start from an SFT adapter of it.")
        with gr.Row():
            form["model_kind"] = gr.Radio(list(MODEL_KINDS), value="Embedded", label="Model source",
                                          elem_id="rlhf-model-kind")
            form["model_source"] = gr.Textbox(value=EMBEDDED_MODEL, label="Model", elem_id="rlhf-model",
                                              info=_info("model", "source"))
            form["model_bits"] = gr.Radio([4, 8, 16, 32], value=4, label="Bit width", info=_info("model", "bits"))
        with gr.Row():
            form["start_adapter"] = gr.Dropdown([BASE_CHOICE], value=BASE_CHOICE, label="Start DPO/KTO/GRPO from",
                                                info=_info("preference", "start_adapter"), elem_id="rlhf-start",
                                                allow_custom_value=True)


def _step2(form: dict[str, Any], boxes: list[Any]) -> dict[str, Any]:
    view: dict[str, Any] = {}
    with _step_box(2, boxes):
        gr.Markdown("Pairs (prompt, chosen, rejected) teach the reward model and DPO; thumbs (prompt, completion, "
                    "label) teach KTO. The bundled set has 150 course-style pairs and 24 held-out ones.")
        with gr.Row():
            form["data_kind"] = gr.Radio(list(PREFERENCE_DATA_KINDS), value=PREFERENCE_DATA_KINDS[0],
                                         label="Preferences from", elem_id="rlhf-data-kind")
            form["data_file"] = gr.File(label="Preference file", type="filepath", elem_id="rlhf-data-file",
                                        file_types=[".jsonl", ".json", ".csv", ".tsv", ".parquet"])
            form["data_hub_name"] = gr.Textbox(label="Hub dataset", placeholder="trl-lib/ultrafeedback_binarized")
            # Dropdowns that accept typed values: the Hub's lists once listed, any name while offline.
            form["data_hub_config"] = gr.Dropdown([], value="", label="Hub config (subset)",
                                                  info=_info("data", "hub_config"), allow_custom_value=True)
            form["data_split"] = gr.Dropdown(["train"], value="train", label="Split", info=_info("data", "split"),
                                             allow_custom_value=True)
        with gr.Row():
            form["data_skip_bad_rows"] = gr.Checkbox(False, label="Skip malformed rows",
                                                     info=_info("data", "skip_bad_rows"), elem_id="rlhf-skip-bad-rows")
            view["hub_list"] = gr.Button("List configs/splits", size="sm", elem_id="rlhf-hub-list")
            view["hub_info"] = gr.Markdown(elem_id="rlhf-hub-info")
        view["preview"] = gr.Button("Check and preview the data", size="sm", elem_id="rlhf-preview-button")
        view["info"] = gr.Markdown(elem_id="rlhf-data-info")
        view["table"] = gr.Dataframe(pd.DataFrame(), interactive=False, wrap=True, max_height=260)
    return view


def _plots(prefix: str, first_title: str, second_title: str) -> dict[str, Any]:
    view: dict[str, Any] = {}
    view["watching"] = gr.Textbox(label="Watching run", interactive=False, elem_id=f"rlhf-{prefix}-run")
    view["status"] = gr.Markdown(elem_id=f"rlhf-{prefix}-status")
    view["progress"] = gr.HTML(progress_html(f"rlhf-{prefix}-progress", {"state": "idle"}, [], colour=RLHF_COLOUR))
    with gr.Row():
        view["loss_plot"] = gr.LinePlot(None, x="step", y="loss", color="series", title=first_title, height=260,
                                        elem_id=f"rlhf-{prefix}-loss")
        view["metric_plot"] = gr.LinePlot(None, x="step", y="value", color="series", title=second_title,
                                          height=260, elem_id=f"rlhf-{prefix}-metrics")
    return view


def _step3(form: dict[str, Any], defaults: RunConfig, with_chat: bool, boxes: list[Any]) -> dict[str, Any]:
    with _step_box(3, boxes):
        gr.Markdown("TRL `RewardTrainer`: LoRA plus a one-output score head on the base model, trained so the "
                    "chosen answer scores above the rejected one. Watch the held-out accuracy rise above 50%.")
        with gr.Row():
            form["reward_learning_rate"] = gr.Number(defaults.training.learning_rate, label="Learning rate",
                                                     info=_info("training", "learning_rate"))
            form["reward_max_steps"] = gr.Number(defaults.training.max_steps, label="Steps", precision=0,
                                                 elem_id="rlhf-reward-steps")
        with gr.Row():
            start = gr.Button("Train the reward model", variant="primary", elem_id="rlhf-start-reward")
            stop = gr.Button("Stop", variant="stop", size="sm")
        view = _plots("reward", "Reward model loss", "Accuracy and margin (chosen vs rejected)")
        with gr.Accordion("Reward playground", open=True):
            with gr.Row():
                form["reward_run"] = gr.Dropdown([], label="Reward model (run)", elem_id="rlhf-reward-pick",
                                                 allow_custom_value=True, info=_info("preference", "reward_model"))
                view["refresh"] = gr.Button("Refresh lists", size="sm")
                view["take_chat"] = gr.Button("Take the last Chat turn", size="sm", elem_id="rlhf-take-chat",
                                              visible=with_chat)
            view["prompt"] = gr.Textbox(label="Prompt", elem_id="rlhf-play-prompt")
            with gr.Row():
                view["answer_a"] = gr.Textbox(label="Answer A", lines=3, elem_id="rlhf-play-a")
                view["answer_b"] = gr.Textbox(label="Answer B (optional)", lines=3, elem_id="rlhf-play-b")
            view["score"] = gr.Button("Score", elem_id="rlhf-score")
            view["scores"] = gr.Markdown(elem_id="rlhf-scores")
    return {**view, "start": start, "stop": stop}


def _step4(form: dict[str, Any], defaults: RunConfig, boxes: list[Any]) -> dict[str, Any]:
    with _step_box(4, boxes):
        gr.Markdown("TRL `DPOTrainer` on the pairs (or `KTOTrainer` on thumbs) makes a new LoRA adapter. Watch "
                    "rewards/margins rise: the tuned model prefers the chosen answers more than the reference does. "
                    "`GRPOTrainer` is the online way: it samples several answers per prompt, the reward model "
                    "picked in step 3 scores them, and the policy moves towards the answers scored above their "
                    "group's mean. Watch the mean reward rise.")
        with gr.Row():
            form["method"] = gr.Radio(list(POLICY_METHODS), value="DPO", label="Method", elem_id="rlhf-method")
            form["beta"] = gr.Number(defaults.preference.beta, label="Beta", info=_info("preference", "beta"))
            form["loss_type"] = gr.Dropdown(list(DPO_LOSSES + KTO_LOSSES), value=defaults.preference.loss_type,
                                            label="Loss", info=_info("preference", "loss_type"))
        with gr.Row():
            form["policy_learning_rate"] = gr.Number(defaults.training.learning_rate, label="Learning rate")
            form["policy_max_steps"] = gr.Number(defaults.training.max_steps, label="Steps", precision=0,
                                                 elem_id="rlhf-policy-steps")
            form["num_generations"] = gr.Number(defaults.preference.num_generations, precision=0,
                                                label="GRPO: answers per prompt", elem_id="rlhf-num-generations",
                                                info=_info("preference", "num_generations"))
            form["max_completion_length"] = gr.Number(defaults.preference.max_completion_length, precision=0,
                                                      label="GRPO: longest answer (tokens)",
                                                      elem_id="rlhf-max-completion",
                                                      info=_info("preference", "max_completion_length"))
        rules = _grpo_rewards(form)
        with gr.Row():
            start = gr.Button("Train with DPO / KTO / GRPO", variant="primary", elem_id="rlhf-start-policy")
            stop = gr.Button("Stop", variant="stop", size="sm")
        view = _plots("policy", "Policy loss", "Rewards (DPO/KTO: implicit; GRPO: reward model)")
        view.update(_grpo_results(rules))
        with gr.Accordion("Did the answers move in the preferred direction?", open=False):
            with gr.Row():
                view["compare_prompts"] = gr.Number(4, label="Held-out prompts", precision=0, minimum=1, maximum=24)
                view["compare_tokens"] = gr.Number(64, label="Max new tokens", precision=0, minimum=8, maximum=256)
                view["compare"] = gr.Button("Compare base, starting adapter and tuned on held-out prompts",
                                            elem_id="rlhf-compare")
            view["compare_summary"] = gr.Markdown(elem_id="rlhf-compare-summary")
            view["compare_table"] = gr.Dataframe(pd.DataFrame(), interactive=False, wrap=True, max_height=300)
    return {**view, "start": start, "stop": stop}


def _grpo_rewards(form: dict[str, Any]) -> dict[str, Any]:
    """GRPO's rewards (a reward model, rules, or both) and the reward bench that tests them before a run."""
    view: dict[str, Any] = {}
    with gr.Accordion("GRPO rewards: the reward model, rules, or both · reward bench", open=False,
                      elem_id="rlhf-grpo-rewards"):
        gr.Markdown(RULES_INTRO)
        with gr.Row():
            form["grpo_reward"] = gr.Radio(list(GRPO_REWARD_KINDS), value=GRPO_REWARD_KINDS[0], label="Reward",
                                           elem_id="rlhf-grpo-reward")
            form["grpo_data"] = gr.Radio(list(GRPO_DATA), value=GRPO_DATA[0], label="GRPO prompts (with rules)",
                                         elem_id="rlhf-grpo-data")
            form["reward_model_weight"] = gr.Number(1.0, label="Reward model weight (with Both)",
                                                    info=_info("preference", "reward_model_weight"))
        form["reward_rules"] = gr.Code(drills_rules_text(), language="yaml", label="Rules (YAML list)",
                                       elem_id="rlhf-reward-rules")
        view["check_rules"] = gr.Button("Check the rules", size="sm", elem_id="rlhf-check-rules")
        gr.Markdown("**Reward bench**: sample answers from the policy GRPO would start from (the base, or the "
                    "adapter picked in step 1) and see what each reward term gives them, before spending a run.")
        with gr.Row():
            form["bench_prompts"] = gr.Dropdown(bench_prompt_choices(), value=bench_prompt_choices()[:2],
                                                multiselect=True, label="Prompts (bundled drills)",
                                                elem_id="rlhf-bench-prompts")
            form["bench_answers"] = gr.Number(4, label=f"Answers per prompt (at most {MAX_BENCH_ANSWERS} in all)",
                                              precision=0, minimum=2, elem_id="rlhf-bench-answers")
        with gr.Row():
            view["bench_sample"] = gr.Button("Sample and score", variant="secondary", elem_id="rlhf-bench-sample")
            view["bench_rescore"] = gr.Button("Re-score with the edited rules (same answers)",
                                              elem_id="rlhf-bench-rescore")
        view["bench_summary"] = gr.Markdown(elem_id="rlhf-bench-summary")
        view["bench_table"] = gr.Dataframe(pd.DataFrame(), interactive=False, wrap=True, max_height=320,
                                           elem_id="rlhf-bench-table")
        view["bench_state"] = gr.State(None)
    return view


def _grpo_results(rules: dict[str, Any]) -> dict[str, Any]:
    """A GRPO run's reward terms and health over the steps, and its held-out verdict."""
    with gr.Row():
        rules["term_plot"] = gr.LinePlot(None, x="step", y="value", color="series", height=240,
                                         title="GRPO: mean reward per term", elem_id="rlhf-grpo-terms")
        rules["health_plot"] = gr.LinePlot(None, x="step", y="value", color="series", height=240,
                                           title="GRPO: no-signal share, KL, answer length",
                                           elem_id="rlhf-grpo-health")
    rules["verdict"] = gr.Markdown(elem_id="rlhf-grpo-verdict")
    return rules


def _advanced(form: dict[str, Any], defaults: RunConfig) -> None:
    with gr.Accordion("Settings shared by steps 3 and 4", open=False):
        with gr.Row():
            form["lora_rank"] = gr.Number(defaults.lora.rank, label="LoRA rank (alpha = 2 x rank)", precision=0,
                                          info=_info("lora", "rank"))
            form["batch_size"] = gr.Number(defaults.training.batch_size, label="Batch size (pairs)", precision=0,
                                           elem_id="rlhf-batch")
            form["eval_steps"] = gr.Number(defaults.training.eval_steps, label="Held-out eval every N steps",
                                           precision=0, elem_id="rlhf-eval-steps",
                                           info=_info("training", "eval_steps"))
            form["max_seq_length"] = gr.Number(defaults.data.max_seq_length, label="Max sequence length",
                                               precision=0, info=_info("data", "max_seq_length"))
        with gr.Row():
            form["early_stopping_patience"] = gr.Number(
                defaults.training.early_stopping_patience, label="Early stopping patience (evaluations, 0 = off)",
                precision=0, elem_id="rlhf-early-stopping", info=_info("training", "early_stopping_patience"))
            form["keep"] = gr.Radio(list(KEEP_CHOICES), value=defaults.training.keep, label="Saved weights",
                                    elem_id="rlhf-keep", info=_info("training", "keep"))
            form["report_to"] = gr.Dropdown(list(REPORT_TO), value=defaults.training.report_to, label="Report to",
                                            elem_id="rlhf-report-to", info=_info("training", "report_to"))
        with gr.Row(visible=offers_processes()):  # past one device: 2+ GPUs, or CPU processes over gloo
            form["processes"] = gr.Number(1, label="Processes (data parallel)", precision=0,
                                          elem_id="rlhf-processes",
                                          info="Each process trains on its share of every batch (DDP; effective "
                                               "batch = batch size x processes). One per GPU; on the CPU, over gloo.")


def build_rlhf_tab(manager: RunManager, feedback_db: str | Path | None = None,
                   chat: dict[str, Any] | None = None, engine: ChatEngine | None = None,
                   scorers: ScorerCache | None = None) -> dict[str, Any]:
    """Lay out the four steps and wire them; ``chat`` (the Chat tab's components) lets the playground take
    the last chat turn, ``engine`` (the Chat tab's models) answers step 4's comparison without loading a
    second copy of the base, and ``scorers`` holds the reward model the Evaluate tab uses too. Returns the
    components by name."""
    feedback_db = Path(feedback_db) if feedback_db else None
    form: dict[str, Any] = {}
    gr.Markdown("## RLHF in four steps\nEach step below uses what the step before produced.")
    pipeline = gr.Markdown(elem_id="rlhf-pipeline")
    boxes: list[Any] = []  # the four steps' accordions: the current one open, the others closed to a line
    _step1(form, boxes)
    data_view = _step2(form, boxes)
    reward = _step3(form, preset("reward"), chat is not None, boxes)
    policy = _step4(form, preset("dpo"), boxes)
    _advanced(form, preset("dpo"))
    log = gr.Textbox(label="Training log (last lines)", lines=8, max_lines=8, interactive=False,
                     elem_id="rlhf-log")
    _wire(manager, feedback_db, form, pipeline, data_view, reward, policy, log, chat, engine or ChatEngine(),
          scorers or ScorerCache())
    on_page_load(bind(open_current_step, manager), None, boxes)
    return {**form, "pipeline": pipeline, "log": log, **{f"data_{k}": v for k, v in data_view.items()},
            **{f"reward_{k}": v for k, v in reward.items()}, **{f"policy_{k}": v for k, v in policy.items()}}


def _wire(manager: RunManager, feedback_db: Path | None, form: dict[str, Any], pipeline: Any,
          data_view: dict[str, Any], reward: dict[str, Any], policy: dict[str, Any], log: Any,
          chat: dict[str, Any] | None, engine: ChatEngine, cache: ScorerCache) -> None:
    summary = bind(pipeline_text, manager)
    gr.on([form[k].change for k in ("model_kind", "model_source", "model_bits", "start_adapter", "data_kind",
                                    "data_file", "data_hub_name", "method", "reward_run")],
          summary, inputs_kwargs=form, outputs=pipeline, api_visibility="private", show_progress="hidden")
    form["model_kind"].input(lambda kind: gr.update(value=EMBEDDED_MODEL if kind == "Embedded" else ""),
                             form["model_kind"], form["model_source"], api_visibility="private")  # see train_tab
    data_view["preview"].click(bind(preview_data, manager, feedback_db), inputs_kwargs=form,
                               outputs=[data_view["info"], data_view["table"]], api_name="rlhf_preview_data",
                               **PREVIEW_SLOT)
    data_view["hub_list"].click(list_hub_options, [form["data_hub_name"], form["data_hub_config"]],
                                [form["data_hub_config"], form["data_split"], data_view["hub_info"]],
                                api_name="rlhf_hub_listing")
    for view, stage, steps in ((reward, "reward", "reward_max_steps"), (policy, "policy", "policy_max_steps")):
        view["start"].click(bind(start_stage, manager, feedback_db, stage), inputs_kwargs=form,
                            outputs=[view["watching"], view["status"]], api_name=f"rlhf_start_{stage}",
                            concurrency_limit=1, concurrency_id="train-start"
                            ).then(bind(steps_box, manager), [view["watching"], form[steps]], form[steps],
                                   api_name=f"rlhf_steps_{stage}", show_progress="hidden")
    for view, name in ((reward, "rlhf_stop_reward"), (policy, "rlhf_stop_policy")):
        view["stop"].click(bind(stop_run, manager), view["watching"], view["status"], api_name=name)
    live = [reward[k] for k in ("watching", "status", "progress", "loss_plot", "metric_plot")] + \
           [policy[k] for k in ("watching", "status", "progress", "loss_plot", "metric_plot")] + [log]
    poll = bind(poll_rlhf, manager)
    gr.Timer(POLL_SECONDS).tick(poll, [reward["watching"], policy["watching"]], live, api_name="rlhf_poll",
                                show_progress="hidden", queue=False)
    lists = [form["reward_run"], form["start_adapter"]]

    def refresh_lists(reward_run: str | None, start: str | None, request: gr.Request = None) -> tuple[Any, Any]:
        visitor = visitor_of(request)
        return reward_choices(manager, reward_run, visitor), start_choices(manager, start, visitor)

    reward["refresh"].click(refresh_lists, lists, lists, api_name="rlhf_lists")
    # A finished run changes its status line: refresh the pickers so the new reward model / adapter is there.
    for view in (reward, policy):
        view["status"].change(refresh_lists, lists, lists, api_visibility="private", show_progress="hidden")
    reward["score"].click(bind(score_answers, manager, cache),
                          [form["reward_run"], reward["prompt"], reward["answer_a"], reward["answer_b"]],
                          reward["scores"], api_name="rlhf_score", concurrency_limit=1, concurrency_id="reward")
    if chat is not None:
        reward["take_chat"].click(bind(last_chat_turn, feedback_db),
                                  [chat["base_chat"], chat["tuned_chat"]],
                                  [reward["prompt"], reward["answer_a"], reward["answer_b"]],
                                  api_visibility="private")
    _wire_grpo_rewards(manager, form, policy, engine, cache)
    policy["compare"].click(bind(compare_policy, manager, cache, engine),
                            [form["reward_run"], policy["watching"], policy["compare_prompts"],
                             policy["compare_tokens"]], [policy["compare_summary"], policy["compare_table"]],
                            api_name="rlhf_compare", concurrency_limit=1, concurrency_id="reward")
    on_page_load(poll, [reward["watching"], policy["watching"]], live)  # re-attaches to running jobs
    on_page_load(refresh_lists, lists, lists)
    on_page_load(summary, inputs_kwargs=form, outputs=pipeline)


def _wire_grpo_rewards(manager: RunManager, form: dict[str, Any], policy: dict[str, Any], engine: ChatEngine,
                       cache: ScorerCache) -> None:
    policy["check_rules"].click(rules_config_check, inputs_kwargs=form, outputs=policy["bench_summary"],
                                api_name="rlhf_check_rules")
    policy["bench_sample"].click(bind(bench_sample, manager, engine, cache), inputs_kwargs=form,
                                 outputs=[policy["bench_summary"], policy["bench_table"], policy["bench_state"]],
                                 api_name="rlhf_bench_sample", concurrency_limit=1, concurrency_id="reward")
    policy["bench_rescore"].click(bind(bench_rescore, manager, cache),
                                  inputs_kwargs={**form, "sample": policy["bench_state"]}, outputs=[policy["bench_summary"], policy["bench_table"]],
                                  api_name="rlhf_bench_rescore", concurrency_limit=1, concurrency_id="reward")
    policy["status"].change(bind(grpo_view, manager), policy["watching"],
                            [policy["term_plot"], policy["health_plot"], policy["verdict"]],
                            api_name="rlhf_grpo_view", show_progress="hidden")
