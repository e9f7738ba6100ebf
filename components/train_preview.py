"""What the Train tab says about its form before Start, apart from its layout: the trainable-parameter and memory
estimate with the recipe this hardware gets, and the data preview (how the source is read, its first rows, and
how many rows will train, be held out and be skipped), counted by the code the run uses. Not a tab:
components/train_tab.py wires these handlers (its api_names) to its controls."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from components.train_form import column_mapping, config_from_form
from finetune.core import paths
from finetune.core.config import ConfigError, RunConfig
from finetune.core.data import DataError, DataPreview, hub_preview, preview_report
from finetune.core.distributed import check_launch
from finetune.core.estimate import estimate_run
from finetune.core.hardware import HardwareProfile
from finetune.core.lora_init import init_problems
from finetune.core.models import ModelSourceError, load_tokenizer
from finetune.core.recipe import resolve_recipe
from finetune.core.run_folder import memory_records

NO_TOKENIZER = "too-long rows not counted: the tokenizer is not available"


def update_estimate(profile: HardwareProfile, runs_root: Path | None = None, **form: Any) -> str:
    """The estimate beside the form; on the CPU calibrated on the peaks this machine's finished runs measured."""
    try:
        cfg = config_from_form(form)
        check_launch(cfg)  # processes this machine cannot run: the same refusal Start would give
        params, memory = estimate_run(cfg, profile, memory_records(runs_root) if runs_root else None)
        recipe = resolve_recipe(cfg, profile)
    except ConfigError as error:
        return "Estimate unavailable until the form is valid: " + "; ".join(error.problems.values())
    except Exception as error:  # offline Hub id, unreadable folder: say why, keep the form usable
        return f"Estimate unavailable: {error}"
    init_note = "".join(f"  \n**LoRA initialisation:** {problem}" for problem in init_problems(cfg))
    return (f"**Trainable parameters:** {params}  \n**Memory:** {memory.verdict}  \n"
            f"<small>weights {memory.weights_gb:.2f} GB · adapters + optimizer {memory.adapter_gb:.2f} GB · "
            f"activations {memory.activations_gb:.2f} GB · logits {memory.logits_gb:.2f} GB · "
            f"overhead {memory.overhead_gb:.2f} GB</small>  \n"
            f"**Recipe on this hardware:** {'; '.join(recipe.notes)}"
            f"{'; padding-free batches' if recipe.padding_free else ''}{init_note}")


def preview_dataset(**form: Any) -> tuple[str, pd.DataFrame]:
    """Before Start: how the source is read, its first rows, and how many rows will train, be held out and be
    skipped (and why), counted by the same code the run uses."""
    try:
        if form.get("data_kind") == "Hub dataset":
            report, cfg = _hub_report(form), None
        else:
            cfg = config_from_form(form)
            tokenizer, tokenizer_note = _tokenizer_for_preview(cfg)
            report = preview_report(cfg.data, tokenizer=tokenizer, seed=cfg.training.seed, rows=5)
            if tokenizer_note:
                report.notes.append(tokenizer_note)
    except ConfigError as error:
        return "Preview unavailable: " + "; ".join(error.problems.values()), _preview_table([])
    except (DataError, ModelSourceError, RuntimeError, OSError) as error:
        return f"**Cannot preview:** {paths.for_visitors(str(error))}", _preview_table([])
    return report.markdown(), _preview_table(report.rows)


def _hub_report(form: dict[str, Any]) -> DataPreview:
    """A Hub dataset's first rows, streamed; its row counts are known only once a run loads the whole split."""
    name = paths.hub_dataset(form.get("data_hub_name"))
    if not name:
        raise DataError("Type a Hub dataset name first, e.g. tatsu-lab/alpaca.")
    report = hub_preview(name, form.get("data_hub_config") or None, form.get("data_split") or "train", rows=5,
                         fmt=form.get("data_format") or "auto", column_mapping=column_mapping(form))
    report.notes.append("row counts (train, held out, skipped) are known once a run loads the whole split")
    return report


def _tokenizer_for_preview(cfg: RunConfig) -> tuple[Any, str]:
    """The run's tokenizer, so rows over max_seq_length are counted; a Hub model offline (or any unreadable
    model) must not stop the preview of the data itself."""
    try:
        return load_tokenizer(cfg.model), ""
    except Exception:  # ModelSourceError offline, OSError for a folder without a tokenizer, ...
        return None, NO_TOKENIZER


def _preview_table(rows: list[list[dict[str, str]]]) -> pd.DataFrame:
    return pd.DataFrame([(i + 1, m["role"], m["content"]) for i, row in enumerate(rows) for m in row],
                        columns=["row", "role", "content"])
