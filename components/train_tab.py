"""The Train tab: pick data and model, set hyperparameters, start a run and watch it live.

Every form control maps to one config field (its info text is the field's help). Handlers receive the form as
keyword arguments (``inputs_kwargs``), so ``gradio_client`` can call ``/start_run`` with just the fields it
wants to change, e.g. ``client.predict(model_source="...", training_max_steps=3, api_name="/start_run")``.

The tab never trains in-process: Start hands the config to the RunManager (a child process), and a ``gr.Timer``
polls the run folder. Because the watched run comes from disk, a reloaded page re-attaches to a running job.
"""

from __future__ import annotations

import functools
from typing import Any

import gradio as gr
import pandas as pd

from components.forms import MODEL_KINDS, SFT_DATA_KINDS
from components.lora_aid import lora_aid_markdown
from components.page_loads import on_page_load
from components.shared import (ESTIMATE_SLOT, PREVIEW_SLOT, bind, list_hub_options, progress_html, refusal, stop_run,
                               visitor_of)
from components.train_form import METHOD_FIELDS, fields_for, form_from_config, presets, show_method_fields
from components.train_preview import preview_dataset, update_estimate
from components.train_runs import (HISTORY_COLUMNS, NO_RUNS, ask_delete, compare_runs, delete_run, poll_run,
                                   resume_run, run_history, start_run)
from finetune.core import paths
from finetune.core.access import can_act
from finetune.core.config import (BUNDLED_DATASET, CHECKPOINTING, COMPUTE_DTYPES, DATA_FORMATS, EMBEDDED_MODEL,
                                  KEEP_CHOICES, LORA_BIAS, LORA_INITS, LORA_METHODS, OPTIMIZERS, PEFT_METHODS,
                                  REPORT_TO, SCHEDULERS, ConfigError, STRATEGIES, RunConfig, field_help,
                                  load_config)
from finetune.core.data import bundled_names
from finetune.core.distributed import offers_processes
from finetune.core.hardware import HardwareProfile
from finetune.core.run_folder import RUN_CONFIG
from finetune.services.runs import RunManager

POLL_SECONDS = 2.0


# --- handlers ------------------------------------------------------------------------------------------------

def load_preset(name: str) -> list[Any]:
    """Fill the form from configs/<name>.yaml (values in FORM order); only a listed preset's name is read."""
    if name not in presets():
        raise refusal(paths.REFUSED)
    values = form_from_config(load_config(paths.CONFIGS_DIR / f"{name}.yaml"))
    return [values.get(key, gr.skip()) for key in _FORM_KEYS]


def restore_form(manager: RunManager, request: gr.Request = None) -> list[Any]:
    """On page load, show the settings of the visitor's run in progress (the form is otherwise back to its
    defaults); another visitor's run is not theirs to copy."""
    active = manager.active_run()
    if active and not can_act(visitor_of(request), manager.owner_of(active)):
        active = None
    try:
        cfg = load_config(manager.run_dir(active) / RUN_CONFIG) if active else None
    except ConfigError:
        cfg = None
    # A reward/DPO/KTO/GRPO run is the RLHF tab's: its settings in this SFT form would start the wrong run.
    values = form_from_config(cfg) if cfg is not None and cfg.stage == "sft" else {}
    if paths.local_paths_mode() != "anywhere":  # every visitor sees this form: sources as names, no server path
        values.update({key: paths.display_name(values[key]) for key in ("model_source", "data_hub_name")
                       if isinstance(values.get(key), str)})
    return [values.get(key, gr.skip()) for key in _FORM_KEYS]


def toggle_data_kind(kind: str) -> tuple[Any, Any, Any]:
    return (gr.update(visible=kind == "Bundled"), gr.update(visible=kind == "Hub dataset"),
            gr.update(visible=kind == "Uploaded file"))


def choose_model_kind(kind: str, current: str) -> Any:
    if kind == "Embedded":
        return gr.update(value=EMBEDDED_MODEL, placeholder=EMBEDDED_MODEL)
    placeholder = "organisation/model-name" if kind == "Hub id" else "/path/to/saved/model"
    return gr.update(value="" if current == EMBEDDED_MODEL else current, placeholder=placeholder)


# --- layout --------------------------------------------------------------------------------------------------

def _info(key: str) -> str:
    section, _, name = key.partition("_")
    return field_help(section, name)


def _number(key: str, label: str, value: Any, **kwargs: Any) -> gr.Number:
    return gr.Number(value=value, label=label, info=_info(key), **kwargs)


def _short_info(key: str) -> str:
    """The first sentence of a field's help: the first screen keeps one line per control (the whole help is the
    config's, shown in the full form below)."""
    text = _info(key)
    head, dot, _ = text.partition(". ")
    return head + "." if dot else text


def _data_source_controls(form: dict[str, Any], hub: dict[str, Any]) -> None:
    """Where the data comes from (first screen): a bundled set, a Hub dataset or an uploaded file."""
    form["data_kind"] = gr.Radio(list(SFT_DATA_KINDS), value="Bundled", label="Dataset source", elem_id="data-kind",
                                 scale=2)
    form["data_bundled"] = gr.Dropdown(bundled_names() or [BUNDLED_DATASET], value=BUNDLED_DATASET,
                                       label="Bundled dataset", info=_short_info("data_source"), scale=2)
    with gr.Column(visible=False, scale=2) as hub["box"]:
        form["data_hub_name"] = gr.Textbox(value="", label="Hub dataset name", placeholder="tatsu-lab/alpaca",
                                           elem_id="hub-name")
        # Dropdowns that accept typed values: the Hub's lists when fetched, any name when offline.
        form["data_hub_config"] = gr.Dropdown([], value="", label="Hub config (subset)",
                                              info=_info("data_hub_config"), allow_custom_value=True)
        hub["list"] = gr.Button("List configs/splits", size="sm", elem_id="hub-list")
        hub["info"] = gr.Markdown(elem_id="hub-info")
    form["data_file"] = gr.File(label="Upload a dataset file", type="filepath", visible=False, scale=2,
                                file_types=list(paths.DATA_FILE_SUFFIXES), elem_id="data-file")


def _data_details(form: dict[str, Any], defaults: RunConfig) -> None:
    """How the rows are read: split, format, columns, malformed rows (collapsed: the defaults read the bundled
    data and most files)."""
    with gr.Accordion("Data details: split, format, columns", open=False, elem_id="data-details"):
        with gr.Row():
            form["data_split"] = gr.Dropdown([defaults.data.split], value=defaults.data.split, label="Split",
                                             info=_info("data_split"), allow_custom_value=True)
            form["data_format"] = gr.Dropdown(list(DATA_FORMATS), value="auto", label="Format",
                                              info=_info("data_format"))
            form["prompt_column"] = gr.Textbox(value="", label="Prompt column", placeholder="e.g. query",
                                               info="Your column holding the user's message (renamed to 'prompt').")
            form["answer_column"] = gr.Textbox(value="", label="Answer column", placeholder="e.g. reply",
                                               info="Your column holding the answer (renamed to 'completion').")
        with gr.Row():
            form["column_mapping_json"] = gr.Textbox(value="", label="Column mapping (JSON, optional)",
                                                     placeholder='{"query": "prompt", "reply": "completion"}',
                                                     info=_info("data_column_mapping"), scale=3)
            form["data_skip_bad_rows"] = gr.Checkbox(value=defaults.data.skip_bad_rows, label="Skip malformed rows",
                                                     info=_info("data_skip_bad_rows"), elem_id="skip-bad-rows")


def _model_controls(form: dict[str, Any], defaults: RunConfig) -> None:
    """Which model (first screen)."""
    with gr.Row():
        form["model_kind"] = gr.Radio(list(MODEL_KINDS), value="Embedded", label="Model source", scale=2,
                                      elem_id="model-kind")
        form["model_source"] = gr.Textbox(value=defaults.model.source, label="Model", elem_id="model-source",
                                          info=_short_info("model_source"), scale=3)
        form["model_bits"] = gr.Radio([4, 8, 16, 32], value=defaults.model.bits, label="Bit width",
                                      info=_short_info("model_bits"), elem_id="bit-width", scale=2)


def _quant_details(form: dict[str, Any], defaults: RunConfig) -> None:
    with gr.Accordion("Quantization details: 4-bit type, double quantization", open=False):
        with gr.Row():
            form["model_quant_type"] = gr.Radio(["nf4", "fp4"], value=defaults.model.quant_type,
                                                label="4-bit type", info=_info("model_quant_type"))
            form["model_double_quant"] = gr.Checkbox(value=defaults.model.double_quant, label="Double quant",
                                                     info=_info("model_double_quant"))


def _method_controls(form: dict[str, Any], d: RunConfig) -> None:
    with gr.Row():
        form["lora_method"] = gr.Dropdown(list(PEFT_METHODS), value=d.lora.method, label="PEFT method",
                                          info=_info("lora_method"), elem_id="peft-method")
        form["lora_init"] = gr.Dropdown(list(LORA_INITS), value=d.lora.init, label="LoRA initialisation",
                                        info=_info("lora_init"), elem_id="lora-init",
                                        visible=d.lora.method in LORA_METHODS)
        form["lora_ia3_feedforward_modules"] = gr.Textbox(
            value=d.lora.ia3_feedforward_modules, label="IA3 feed-forward modules",
            info=_info("lora_ia3_feedforward_modules"), visible=d.lora.method == "ia3")
        form["lora_num_virtual_tokens"] = _number("lora_num_virtual_tokens", "Virtual tokens",
                                                  d.lora.num_virtual_tokens, precision=0,
                                                  visible=d.lora.method == "prompt_tuning")
        form["lora_prompt_init_text"] = gr.Textbox(value=d.lora.prompt_init_text, label="Prompt init text",
                                                   info=_info("lora_prompt_init_text"),
                                                   visible=d.lora.method == "prompt_tuning")


def _card_hyperparameters(form: dict[str, Any], d: RunConfig) -> None:
    """Four of the product card's five hyperparameters (the fifth, the bit width, sits beside the model) and how
    long to train, on the first screen."""
    with gr.Row(elem_id="card-hyperparameters"):
        form["training_learning_rate"] = gr.Number(d.training.learning_rate, label="Learning rate",
                                                   info=_short_info("training_learning_rate"),
                                                   elem_id="learning-rate", min_width=120)
        form["lora_rank"] = gr.Number(d.lora.rank, label="LoRA rank (r)", precision=0,
                                      info=_short_info("lora_rank"), elem_id="lora-rank",
                                      min_width=120)
        form["lora_alpha"] = gr.Number(d.lora.alpha, label="LoRA alpha", info=_short_info("lora_alpha"),
                                       elem_id="lora-alpha", min_width=120)
        form["lora_dropout"] = gr.Number(d.lora.dropout, label="LoRA dropout", info=_short_info("lora_dropout"),
                                         elem_id="lora-dropout", min_width=120)
        form["training_max_steps"] = gr.Number(d.training.max_steps, label="Max steps", precision=0,
                                               info=_short_info("training_max_steps"), elem_id="max-steps",
                                               min_width=120)


def _method_details(form: dict[str, Any], d: RunConfig) -> None:
    with gr.Accordion("PEFT method and target modules", open=False, elem_id="peft-details"):
        _method_controls(form, d)
        form["lora_target_modules"] = gr.Textbox(value=d.lora.target_modules, label="Target modules",
                                                 info=_info("lora_target_modules"))


def _length_controls(form: dict[str, Any], d: RunConfig) -> None:
    with gr.Accordion("Batch, epochs and sequence length", open=False, elem_id="length-details"):
        with gr.Row():
            form["training_num_epochs"] = _number("training_num_epochs", "Epochs", d.training.num_epochs)
            form["training_batch_size"] = _number("training_batch_size", "Batch size", d.training.batch_size,
                                                  precision=0, elem_id="batch-size")
            form["training_gradient_accumulation"] = _number("training_gradient_accumulation",
                                                             "Gradient accumulation",
                                                             d.training.gradient_accumulation, precision=0)
            form["data_max_seq_length"] = _number("data_max_seq_length", "Max sequence length",
                                                  d.data.max_seq_length, precision=0, elem_id="max-seq-length")
        # Past one device: offered with 2+ GPUs, and on the CPU (processes over gloo) when asked.
        with gr.Row(visible=offers_processes()):
            form["training_processes"] = _number("training_processes", "Processes (devices)", d.training.processes,
                                                 precision=0, minimum=1, elem_id="processes")
            form["training_strategy"] = gr.Dropdown(list(STRATEGIES), value=d.training.strategy, label="Strategy",
                                                    info=_info("training_strategy"), elem_id="strategy")


def _advanced_controls(form: dict[str, Any], d: RunConfig) -> None:
    t = d.training
    with gr.Accordion("Advanced settings", open=False):
        with gr.Row():
            form["run_name"] = gr.Textbox(value="run", label="Run name", info="Prefix of the run folder's name.")
            form["model_compute_dtype"] = gr.Dropdown(list(COMPUTE_DTYPES), value=d.model.compute_dtype,
                                                      label="Compute dtype", info=_info("model_compute_dtype"))
            form["model_trust_remote_code"] = gr.Checkbox(value=False, label="Trust remote code",
                                                          info=_info("model_trust_remote_code"))
            form["lora_bias"] = gr.Dropdown(list(LORA_BIAS), value=d.lora.bias, label="LoRA bias",
                                            info=_info("lora_bias"))
        with gr.Row():
            form["training_lr_scheduler"] = gr.Dropdown(list(SCHEDULERS), value=t.lr_scheduler, label="Scheduler",
                                                        info=_info("training_lr_scheduler"))
            form["training_warmup_ratio"] = _number("training_warmup_ratio", "Warmup ratio", t.warmup_ratio)
            form["training_optimizer"] = gr.Dropdown(list(OPTIMIZERS), value=t.optimizer, label="Optimizer",
                                                     info=_info("training_optimizer"))
            form["training_weight_decay"] = _number("training_weight_decay", "Weight decay", t.weight_decay)
            form["training_max_grad_norm"] = _number("training_max_grad_norm", "Max grad norm", t.max_grad_norm)
        with gr.Row():
            form["training_gradient_checkpointing"] = gr.Radio(
                list(CHECKPOINTING), value=t.gradient_checkpointing, label="Gradient checkpointing",
                info=_info("training_gradient_checkpointing"))
            form["training_padding_free"] = gr.Checkbox(value=t.padding_free, label="Padding-free batches",
                                                        info=_info("training_padding_free"))
            form["training_liger_kernels"] = gr.Checkbox(value=t.liger_kernels, label="Liger kernels (GPU)",
                                                         info=_info("training_liger_kernels"))
            form["training_cpu_lm_head"] = gr.Checkbox(value=t.cpu_lm_head, label="Answer-only LM head (CPU)",
                                                       info=_info("training_cpu_lm_head"))
            form["training_seed"] = _number("training_seed", "Seed", t.seed, precision=0)
            form["training_logging_steps"] = _number("training_logging_steps", "Logging steps", t.logging_steps,
                                                     precision=0)
            form["training_eval_steps"] = _number("training_eval_steps", "Eval steps", t.eval_steps, precision=0,
                                                  elem_id="eval-steps")
            form["training_save_steps"] = _number("training_save_steps", "Save steps", t.save_steps, precision=0)
        with gr.Row():
            form["data_validation_fraction"] = _number("data_validation_fraction", "Validation fraction",
                                                       d.data.validation_fraction)
            form["data_max_samples"] = _number("data_max_samples", "Max samples (0 = all)", 0, precision=0)
            form["data_max_eval_samples"] = _number("data_max_eval_samples", "Max held-out rows (0 = all)", 0,
                                                    precision=0)
            form["training_early_stopping_patience"] = _number(
                "training_early_stopping_patience", "Early stopping patience (evaluations, 0 = off)",
                t.early_stopping_patience, precision=0, elem_id="early-stopping-patience")
            form["training_keep"] = gr.Radio(list(KEEP_CHOICES), value=t.keep, label="Saved adapter holds",
                                             info=_info("training_keep"), elem_id="keep-weights")
            form["training_report_to"] = gr.Dropdown(list(REPORT_TO), value=t.report_to, label="Report to",
                                                     info=_info("training_report_to"), elem_id="report-to")


def _default_config() -> RunConfig:
    try:
        return load_config(paths.CONFIGS_DIR / "cpu-quick.yaml")
    except ConfigError:
        return RunConfig()


_FORM_KEYS: list[str] = []  # filled by build_train_tab: the order load_preset returns values in


def _run_state(view: dict[str, Any]) -> None:
    """The run's status line and progress bar, right under Start."""
    view["status"] = gr.Markdown(NO_RUNS, elem_id="run-status")
    view["progress"] = gr.HTML(progress_html("train-progress", {"state": "idle"}, []))


def _live_view(view: dict[str, Any]) -> dict[str, Any]:
    view["watching"] = gr.Textbox(label="Watching run", interactive=False, elem_id="watching-run")
    with gr.Row():
        view["loss_plot"] = gr.LinePlot(None, x="step", y="loss", color="series", title="Loss",
                                        elem_id="loss-plot", height=300)
        view["lr_plot"] = gr.LinePlot(None, x="step", y="learning_rate", title="Learning rate",
                                      elem_id="lr-plot", height=300)
    with gr.Accordion("Training log (last lines)", open=False) as view["log_box"]:
        view["log"] = gr.Textbox(lines=12, max_lines=12, show_label=False, interactive=False, elem_id="train-log")
    return view


def _history_view() -> dict[str, Any]:
    view: dict[str, Any] = {}
    with gr.Accordion("Run history", open=True):
        view["history"] = gr.Dataframe(pd.DataFrame(columns=HISTORY_COLUMNS), interactive=False, wrap=False,
                                       elem_id="run-history")
        with gr.Row():
            view["compare_ids"] = gr.Dropdown([], multiselect=True, label="Compare loss curves of runs",
                                              allow_custom_value=True)  # API clients: see inspect_section
            view["refresh"] = gr.Button("Refresh history", size="sm")
        view["compare_plot"] = gr.LinePlot(None, x="step", y="loss", color="run",
                                           title="Training loss by run", height=280)
        view["disk"] = gr.Markdown(elem_id="disk-usage")
        with gr.Row():
            # Custom values pass to the handler, which checks the owner itself (an API caller may name any run).
            view["delete_id"] = gr.Dropdown([], label="Delete a run", elem_id="delete-run-id",
                                            allow_custom_value=True,
                                            info="Runs you may delete: your own (an operator: any run).")
            view["delete"] = gr.Button("Delete run…", size="sm", variant="stop", elem_id="delete-run")
            view["confirm_delete"] = gr.Button("Confirm delete", size="sm", variant="stop", visible=False,
                                               elem_id="confirm-delete")
        view["delete_note"] = gr.Markdown(elem_id="delete-note")
    return view


def build_train_tab(manager: RunManager, profile: HardwareProfile) -> dict[str, Any]:
    """Lay out the tab and wire its handlers; returns its components by name. The first screen holds what a
    learner chooses (preset, data, model, the card's five hyperparameters) and Start, with the estimate beside
    them; every other setting is one click away in a collapsed group."""
    defaults, form, hub = _default_config(), {}, {}
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            with gr.Row():
                preset = gr.Dropdown(presets(), value="cpu-quick" if "cpu-quick" in presets() else None,
                                     label="Preset", info="Fill the form from configs/*.yaml", scale=1,
                                     elem_id="preset")
                _data_source_controls(form, hub)
            _model_controls(form, defaults)
            _card_hyperparameters(form, defaults)
            with gr.Row():
                start = gr.Button("Start training", variant="primary", elem_id="start-button", scale=2)
                stop = gr.Button("Stop", variant="stop", elem_id="stop-button", scale=1)
                resume = gr.Button("Resume from last checkpoint", elem_id="resume-button", scale=1)
            view: dict[str, Any] = {}
            _run_state(view)
        with gr.Column(scale=1):
            estimate = gr.Markdown(elem_id="estimate")
            lora_aid = gr.Markdown(elem_id="lora-aid")  # learning aid: W + (alpha/r)·B·A with this form's numbers
    _data_details(form, defaults)
    with gr.Accordion("Data preview", open=True):
        preview_info = gr.Markdown(elem_id="data-preview")
        preview_table = gr.Dataframe(pd.DataFrame(columns=["row", "role", "content"]), interactive=False, wrap=True)
        preview_button = gr.Button("Preview data", size="sm")
    _quant_details(form, defaults)
    _method_details(form, defaults)
    _length_controls(form, defaults)
    _advanced_controls(form, defaults)
    _FORM_KEYS[:] = list(form)
    view, history = _live_view(view), _history_view()
    _wire(manager, profile, form, preset, estimate, preview_info, preview_table, preview_button, start, stop,
          view, history)
    _wire_hub(form, hub)
    # Shares Start's concurrency slot: a resume and a start pressed together still give one training job.
    resume.click(bind(resume_run, manager), view["watching"], [view["watching"], view["status"]],
                 api_name="resume_run", concurrency_limit=1, concurrency_id="train-start")
    _wire_lora_aid(form, lora_aid)
    return {**form, "preset": preset, "estimate": estimate, "start": start, "stop": stop, "resume": resume,
            "lora_aid": lora_aid,
            **view, **history}


def _wire_hub(form: dict[str, Any], hub: dict[str, Any]) -> None:
    form["data_kind"].change(toggle_data_kind, form["data_kind"], [form["data_bundled"], hub["box"], form["data_file"]],
                             api_visibility="private")
    hub["list"].click(list_hub_options, [form["data_hub_name"], form["data_hub_config"]],
                      [form["data_hub_config"], form["data_split"], hub["info"]], api_name="hub_listing")


def _wire_lora_aid(form: dict[str, Any], lora_aid: Any) -> None:
    inputs = [form[k] for k in fields_for("aid")]
    gr.on([c.change for c in inputs], lora_aid_markdown, inputs, lora_aid, api_name="lora_aid",
          show_progress="hidden", trigger_mode="always_last")
    on_page_load(lora_aid_markdown, inputs, lora_aid)


def _wire(manager: RunManager, profile: HardwareProfile, form: dict[str, Any], preset: Any, estimate: Any,
          preview_info: Any, preview_table: Any, preview_button: Any, start: Any, stop: Any,
          view: dict[str, Any], history: dict[str, Any]) -> None:
    form_list = list(form.values())
    preset.change(load_preset, preset, form_list, api_name="load_preset")
    # .input, not .change: only a person's pick clears the source; a preset or a reload that restores a run's form
    # sets the kind and the source together, and a .change raced that and emptied the restored source.
    form["model_kind"].input(choose_model_kind, [form["model_kind"], form["model_source"]], form["model_source"],
                             api_visibility="private")
    form["lora_method"].change(show_method_fields, form["lora_method"], [form[k] for k in METHOD_FIELDS],
                               api_visibility="private")
    estimate_inputs = [form[k] for k in fields_for("estimate")]
    estimate_fn = functools.partial(update_estimate, profile, manager.root)  # calibrated on this folder's runs
    gr.on([c.change for c in estimate_inputs], estimate_fn, inputs_kwargs=form,
          outputs=estimate, api_name="estimate", show_progress="hidden", trigger_mode="always_last", **ESTIMATE_SLOT)
    data_inputs = [form[k] for k in ("data_kind", "data_bundled", "data_file", "data_split", "data_format",
                                     "column_mapping_json", "data_skip_bad_rows")]
    gr.on([preview_button.click] + [c.change for c in data_inputs], preview_dataset, inputs_kwargs=form,
          outputs=[preview_info, preview_table], api_name="preview_data", trigger_mode="always_last", **PREVIEW_SLOT)
    start.click(bind(start_run, manager), inputs_kwargs=form,
                outputs=[view["watching"], view["status"]], api_name="start_run",
                concurrency_limit=1, concurrency_id="train-start")
    stop.click(bind(stop_run, manager), view["watching"], view["status"], api_name="stop_run")
    live = [view[k] for k in ("watching", "status", "progress", "loss_plot", "lr_plot", "log", "log_box")]
    timer = gr.Timer(POLL_SECONDS)
    timer.tick(bind(poll_run, manager), view["watching"], live, api_name="poll_run",
               show_progress="hidden", queue=False)
    refresh = bind(run_history, manager)
    history_out = [history["history"], history["compare_ids"], history["delete_id"], history["disk"]]
    history["refresh"].click(refresh, history["compare_ids"], history_out, api_name="run_history")
    history["delete"].click(bind(ask_delete, manager), history["delete_id"],
                            [history["delete_note"], history["confirm_delete"]], api_name="ask_delete")
    history["confirm_delete"].click(bind(delete_run, manager), history["delete_id"],
                                    [history["delete_note"], history["confirm_delete"]], api_name="delete_run"
                                    ).then(refresh, history["compare_ids"], history_out, api_visibility="private")
    view["status"].change(refresh, history["compare_ids"], history_out, api_visibility="private",
                          show_progress="hidden")
    history["compare_ids"].change(bind(compare_runs, manager), history["compare_ids"],
                                  history["compare_plot"], api_name="compare_runs")
    on_page_load(bind(poll_run, manager), view["watching"], live)  # re-attaches to the active run
    on_page_load(refresh, history["compare_ids"], history_out)
    on_page_load(bind(restore_form, manager), None, form_list)
    on_page_load(estimate_fn, inputs_kwargs=form, outputs=estimate)
