"""GRPO's data when rules reward it: prompts with their reference columns (e.g. ``{"prompt": "...", "answer": "42"}``),
split into training prompts and held-out prompts the before/after verdict is measured on.

    rows = load_prompt_rows(DataConfig(source="bundled:lab_drills"))
    rows.train[0]   # {"prompt": [{"role": "user", "content": "..."}], "answer": "12"}

Basic module: data loading and the preference split's rule (one prompt never on both sides).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any

from finetune.core.config import ConfigError, DataConfig, RunConfig
from finetune.core.data_sources import load_raw
from finetune.core.data_files import DataError
from finetune.core.preference import prompt_key, split_by_prompt
from finetune.core.rewards import parse_rules, reference_problems

PROMPT_COLUMNS = ("prompt", "question", "instruction", "query")
HELD_OUT_DEFAULT = 32  # held-out prompts answered before and after training when max_eval_samples is not set


@dataclass
class PromptRows:
    train: list[dict[str, Any]]
    held_out: list[dict[str, Any]]
    columns: list[str]                       # the columns every row carries (what rules may name as reference)
    notes: list[str] = field(default_factory=list)


def is_preference_columns(columns: list[str]) -> bool:
    """Pairs or thumbs (chosen/rejected, label): GRPO then takes only their prompts."""
    return "chosen" in columns or "label" in columns


def _as_messages(value: Any) -> list[dict[str, str]] | None:
    if isinstance(value, str) and value.strip():
        return [{"role": "user", "content": value.strip()}]
    if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
        return [{"role": str(m.get("role", "user")), "content": str(m["content"])} for m in value]
    return None


def _rows(dataset: Any, prompt_column: str) -> list[dict[str, Any]]:
    rows = []
    for row in dataset:
        prompt = _as_messages(row.get(prompt_column))
        if prompt is None:
            continue
        rows.append({"prompt": prompt, **{k: ("" if v is None else str(v)) for k, v in row.items()
                                           if k != prompt_column}})
    return rows


def prompt_column(columns: list[str]) -> str:
    found = next((name for name in PROMPT_COLUMNS if name in columns), None)
    if found is None:
        raise DataError(f"GRPO needs a prompt column ({', '.join(PROMPT_COLUMNS)}); the data has: "
                        f"{', '.join(columns)}.")
    return found


def load_prompt_rows(cfg: DataConfig, seed: int = 42) -> PromptRows:
    """Prompt rows of ``cfg``'s split, and held-out rows: the source's validation split, else a seeded share
    (``validation_fraction``) of the prompts; at most ``max_eval_samples`` held out (HELD_OUT_DEFAULT if unset)."""
    train_set, validation_set = load_raw(dataclasses.replace(cfg, max_samples=None))
    column = prompt_column(train_set.column_names)
    train, notes = _rows(train_set, column), []
    if validation_set is not None and column in validation_set.column_names:
        trained = {prompt_key(row["prompt"]) for row in train}
        held = [row for row in _rows(validation_set, column) if prompt_key(row["prompt"]) not in trained]
    else:
        train, held = split_by_prompt(train, cfg.validation_fraction, seed)
    if cfg.max_samples:
        train = train[:cfg.max_samples]
    limit = cfg.max_eval_samples or HELD_OUT_DEFAULT
    if len(held) > limit:
        held = random.Random(seed).sample(held, limit)
        notes.append(f"{limit} held-out prompts sampled (data.max_eval_samples)")
    if not train:
        raise DataError("GRPO found no usable prompts in the data.")
    columns = ["prompt", *[c for c in train_set.column_names if c != column]]
    return PromptRows(train, held, columns, notes)


def check_reference_columns(cfg: RunConfig, columns: list[str]) -> None:
    """Refuse rules that compare with a column the data does not have, naming the rule's field."""
    problems = reference_problems(parse_rules(cfg.preference.rewards), columns)
    if problems:
        raise ConfigError({f"preference.{name}": message for name, message in problems.items()})
