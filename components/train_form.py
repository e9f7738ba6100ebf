"""The Train tab's form <-> a RunConfig, through forms.run_config_from_form as every tab that starts a job: every form
key "<section>_<field>" maps onto that config field; the keys in UI_ONLY are assembled here (the data source by kind
through the path gate, the column mapping), and which form fields feed more than the config (the PEFT method's own
fields, the LoRA aid, the estimate)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gradio as gr
import yaml

from components.forms import SFT_DATA_KINDS, form_sections, run_config_from_form
from finetune.core import paths
from finetune.core.config import BUNDLED_DATASET, EMBEDDED_MODEL, LORA_METHODS, ConfigError, RunConfig

UI_ONLY = ("data_kind", "data_bundled", "data_hub_name", "data_file", "prompt_column", "answer_column",
           "column_mapping_json", "model_kind")


def presets() -> list[str]:
    """The SFT presets: the RLHF stages (``stage:``) have their own tab, and compare-cpu is the Compare tab's base."""
    return sorted(p.stem for p in paths.CONFIGS_DIR.glob("*.yaml")
                  if p.stem != "compare-cpu" and (yaml.safe_load(p.read_text()) or {}).get("stage", "sft") == "sft")


def _data_source(form: dict[str, Any]) -> str:
    """The data source the form names, through the path gate: each kind accepts only its own kind of name."""
    kind = form.get("data_kind") or SFT_DATA_KINDS[0]
    if kind == "Hub dataset":
        return paths.hub_id(form.get("data_hub_name"))
    if kind == "Uploaded file":
        return paths.uploaded_file(form.get("data_file"))
    return paths.bundled_name(form.get("data_bundled") or BUNDLED_DATASET)


def column_mapping(form: dict[str, Any]) -> dict[str, str]:
    """The simple prompt/answer fields plus the JSON override (the JSON wins on conflicts)."""
    mapping = {}
    if (form.get("prompt_column") or "").strip():
        mapping[form["prompt_column"].strip()] = "prompt"
    if (form.get("answer_column") or "").strip():
        mapping[form["answer_column"].strip()] = "completion"
    text = (form.get("column_mapping_json") or "").strip()
    if text:
        try:
            extra = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError({"data.column_mapping": f"Column mapping is not valid JSON: {error.msg}"}) from None
        if not isinstance(extra, dict):
            raise ConfigError({"data.column_mapping": 'Column mapping must be a JSON object like {"q": "prompt"}'})
        mapping.update(extra)
    return mapping


def config_from_form(form: dict[str, Any]) -> RunConfig:
    """The RunConfig the form describes; ConfigError lists every bad field."""
    sections, problems = form_sections(form, skip=UI_ONLY), {}
    data = sections["data"]
    try:
        data["source"] = _data_source(form)
    except paths.PathRefused:
        problems["data.source"], data["source"] = paths.REFUSED, BUNDLED_DATASET
    try:
        if "source" in sections["model"]:
            sections["model"]["source"] = paths.model_source(sections["model"]["source"])
    except paths.PathRefused:
        problems["model.source"], sections["model"]["source"] = paths.REFUSED, EMBEDDED_MODEL
    try:
        data["column_mapping"] = column_mapping(form)
    except ConfigError as error:  # report it together with every other bad field
        problems, data["column_mapping"] = error.problems, {}
    for cap in ("max_samples", "max_eval_samples"):
        if not data.get(cap):
            data[cap] = None  # 0 / empty in the form means "all rows"
    return run_config_from_form(sections, problems=problems, run_name=(form.get("run_name") or "").strip() or "run")


def form_from_config(cfg: RunConfig) -> dict[str, Any]:
    """Form values for a config (presets and reloading a past run's settings)."""
    values: dict[str, Any] = {}
    for section in ("model", "lora", "data", "training"):
        for name, value in vars(getattr(cfg, section)).items():
            values[f"{section}_{name}"] = value
    source = cfg.data.source
    kind = "Bundled" if source.startswith("bundled:") else "Uploaded file" if Path(source).exists() else "Hub dataset"
    values.update(data_kind=kind, data_bundled=source if kind == "Bundled" else BUNDLED_DATASET,
                  data_hub_name=source if kind == "Hub dataset" else "", run_name=cfg.run_name,
                  column_mapping_json=json.dumps(cfg.data.column_mapping) if cfg.data.column_mapping else "",
                  prompt_column="", answer_column="",
                  model_kind="Embedded" if cfg.model.source == EMBEDDED_MODEL else
                  "Local folder" if Path(cfg.model.source).expanduser().is_dir() else "Hub id")
    values["data_hub_config"] = cfg.data.hub_config or ""
    values["data_max_samples"] = cfg.data.max_samples or 0
    values["data_max_eval_samples"] = cfg.data.max_eval_samples or 0
    return values


def show_method_fields(method: str) -> tuple[Any, ...]:
    """Only the fields the chosen PEFT method reads: rank/alpha/dropout/targets for the LoRA family, ..."""
    lora_like, ia3, prompt = method in LORA_METHODS, method == "ia3", method == "prompt_tuning"
    return (gr.update(visible=lora_like), gr.update(visible=lora_like), gr.update(visible=lora_like),
            gr.update(visible=lora_like or ia3), gr.update(visible=ia3), gr.update(visible=prompt),
            gr.update(visible=prompt), gr.update(visible=lora_like))


# The form fields that feed more than the config, each named once with what it feeds: "method" (shown only for the
# PEFT methods that read it; show_method_fields's order), "aid" (lora_aid_markdown's arguments, in their order),
# "estimate" (a change re-runs the estimate).
FIELD_USES: dict[str, tuple[str, ...]] = {
    "lora_method": ("estimate",),
    "model_source": ("aid", "estimate"),
    "lora_rank": ("method", "aid", "estimate"),
    "lora_alpha": ("method", "aid"),
    "lora_dropout": ("method",),
    "lora_target_modules": ("method", "aid", "estimate"),
    "lora_ia3_feedforward_modules": ("method", "estimate"),
    "lora_num_virtual_tokens": ("method", "estimate"),
    "lora_prompt_init_text": ("method",),
    "model_bits": ("aid", "estimate"),
    "model_quant_type": ("aid", "estimate"),
    "model_double_quant": ("aid", "estimate"),
    "training_optimizer": ("aid", "estimate"),
    "lora_init": ("method", "aid", "estimate"),
    "lora_bias": ("estimate",),
    "training_batch_size": ("estimate",),
    "data_max_seq_length": ("estimate",),
    "training_gradient_checkpointing": ("estimate",),
    "training_padding_free": ("estimate",),
    "training_liger_kernels": ("estimate",),
    "training_cpu_lm_head": ("estimate",),
    "model_compute_dtype": ("estimate",),
    "training_processes": ("estimate",),
    "training_strategy": ("estimate",),
    "training_gradient_accumulation": ("estimate",),
}


def fields_for(use: str) -> tuple[str, ...]:
    """The form keys that feed ``use`` ("method", "aid" or "estimate"), in FIELD_USES's order."""
    return tuple(key for key, uses in FIELD_USES.items() if use in uses)


METHOD_FIELDS = fields_for("method")
