"""The data pipeline the trainer and the Train tab use: a source's rows (data_sources.py) read as a format
(data_format.py) and turned into the training set and the held-out rows (the source's validation split, or a
seeded fraction of the rows), rows longer than the max sequence length dropped; the preview that reports those
same counts before Start; example prompts for the Chat tab.

    prepared = prepare(cfg.data, tokenizer)      # PreparedData: train, eval, format, what was skipped and why
    report = preview_report(cfg.data, tokenizer) # the same counts, before anything trains
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from datasets import Dataset

from finetune.core.config import DataConfig
from finetune.core.data_files import DataError, MalformedRowsError, Sample
from finetune.core.data_format import (ColumnReading, apply_reading, column_key, convert, detect_format, read_columns,
                                       row_to_messages)
from finetune.core.data_sources import (SAMPLE_ROWS, RawData, UsableCount, bundled_names, check_file, check_malformed,
                                        data_source_kind, first_line, hub_configs, hub_first_rows, hub_splits,
                                        load_source, mapped_rows)

# Importable from here as before data_sources.py and data_format.py were split off: callers catch the errors and
# use the source helpers through this module.
__all__ = ["DataError", "MalformedRowsError", "SAMPLE_ROWS", "UsableCount", "bundled_names", "check_file",
           "column_key", "data_source_kind", "detect_format", "first_line", "hub_configs", "hub_first_rows",
           "hub_splits", "load_source", "mapped_rows"]

PREVIEW_REASONS = 20  # malformed lines the preview explains one by one; the others it numbers


@dataclass
class PreparedData:
    train: Dataset
    eval: Dataset | None
    format: str
    skipped_rows: int = 0        # rows with a missing or empty field
    dropped_too_long: int = 0    # rows longer than max_seq_length
    notes: list[str] = field(default_factory=list)
    malformed_rows: int = 0      # lines of the file that could not be read (skipped with data.skip_bad_rows)
    bad_lines: list[str] = field(default_factory=list)          # each malformed line with its reason
    column_renames: dict[str, str] = field(default_factory=dict)  # file column -> column the format reads
    encoding: str | None = None  # the encoding assumed for a text file
    eval_dropped_too_long: int = 0  # held-out rows longer than max_seq_length (not evaluated)


def usable_row_count(cfg: DataConfig) -> UsableCount:
    """For a supervised run on ``cfg``: how many readable rows have the fields its format needs (the rows
    ``prepare`` keeps before any is held out), with the user's column mapping applied."""
    def count(rows: list[dict[str, Any]]) -> int:
        dataset = mapped_rows(rows, cfg)
        try:
            reading = read_columns(dataset.column_names, cfg.format)
        except DataError:
            return 0
        return len(convert(apply_reading(dataset, reading), reading.format)[0])
    return count


# --- the pipeline the trainer and the UI use ---------------------------------------------------------------

def token_length(row: dict[str, Any], tokenizer: Any) -> int:
    if "text" in row:
        return len(tokenizer(row["text"])["input_ids"])
    ids = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True)
    return len(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def prepare(cfg: DataConfig, tokenizer: Any = None, seed: int = 42) -> PreparedData:
    return _prepare(load_source(cfg, count_usable=usable_row_count(cfg)), cfg, tokenizer, seed)


def _prepare(raw: RawData, cfg: DataConfig, tokenizer: Any, seed: int) -> PreparedData:
    reading = read_columns(raw.train.column_names, cfg.format)
    train_raw = apply_reading(raw.train, reading)
    fmt = reading.format
    train, skipped = convert(train_raw, fmt)
    if len(train) == 0:
        raise DataError(f"None of the {len(train_raw)} rows has usable '{fmt}' content (missing or empty fields).")
    notes = raw.notes() + _reading_notes(reading)
    if skipped:
        notes.append(f"{skipped} row(s) skipped: missing or empty fields")
    if cfg.max_samples is not None and len(train) > cfg.max_samples:
        notes.append(f"max samples: {cfg.max_samples} of the {len(train)} usable rows kept")
        train = train.shuffle(seed=seed).select(range(cfg.max_samples))
    evaluation = None
    if raw.validation is not None and cfg.validation_fraction > 0:
        held_reading = read_columns(raw.validation.column_names, cfg.format)
        evaluation, _ = convert(apply_reading(raw.validation, held_reading), held_reading.format)
    elif cfg.validation_fraction > 0 and len(train) >= 10:
        parts = train.train_test_split(test_size=cfg.validation_fraction, seed=seed)
        train, evaluation = parts["train"], parts["test"]
    elif cfg.validation_fraction > 0:
        notes.append("too few rows to hold out a validation split; eval loss is off")
    if evaluation is not None and cfg.max_eval_samples is not None and len(evaluation) > cfg.max_eval_samples:
        notes.append(f"max held-out rows: {cfg.max_eval_samples} of the {len(evaluation)} evaluated")
        evaluation = evaluation.shuffle(seed=seed).select(range(cfg.max_eval_samples))
    prepared = PreparedData(train, evaluation if evaluation is not None and len(evaluation) else None,
                            fmt, skipped, 0, notes, raw.malformed,
                            [str(b) for b in raw.file.bad_lines] if raw.file else [], dict(reading.renames),
                            raw.file.encoding if raw.file else None)
    if tokenizer is not None:
        _drop_too_long(prepared, cfg.max_seq_length, tokenizer)
    return prepared


def _reading_notes(reading: ColumnReading) -> list[str]:
    renamed = [f"columns read as: {reading.describe()}"] if reading.renames else []
    return renamed + reading.notes


def _drop_too_long(prepared: PreparedData, max_length: int, tokenizer: Any) -> None:
    lengths = [token_length(row, tokenizer) for row in prepared.train]
    keep = [i for i, n in enumerate(lengths) if n <= max_length]
    if not keep:
        raise DataError(f"All {len(lengths)} rows are longer than the max sequence length of {max_length} "
                        f"tokens (shortest: {min(lengths)}); raise max sequence length.")
    prepared.dropped_too_long = len(lengths) - len(keep)
    if prepared.dropped_too_long:
        prepared.train = prepared.train.select(keep)
        prepared.notes.append(f"{prepared.dropped_too_long} row(s) longer than {max_length} tokens dropped")
    if prepared.eval is not None:
        eval_keep = [i for i, row in enumerate(prepared.eval) if token_length(row, tokenizer) <= max_length]
        prepared.eval_dropped_too_long = len(prepared.eval) - len(eval_keep)
        prepared.eval = prepared.eval.select(eval_keep) if eval_keep else None


def preview(cfg: DataConfig, rows: int = 5) -> tuple[str, list[list[dict[str, str]]], list[str]]:
    """(detected format, first rows as chat messages, original columns) for the UI's data preview."""
    raw = load_source(cfg)
    reading = read_columns(raw.train.column_names, cfg.format)
    return reading.format, _shown_rows(raw.train, reading, rows), list(raw.train.column_names)


def _shown_rows(dataset: Any, reading: ColumnReading, rows: int) -> list[list[dict[str, str]]]:
    shown = []
    for row in dataset:
        if len(shown) >= rows:
            break
        row = {reading.renames.get(k, k): v for k, v in row.items()}
        if reading.format == "text":
            shown.append([{"role": "text", "content": str(row.get("text"))}])
        else:
            shown.append(row_to_messages(row, reading.format) or [])
    return shown


# --- the preview that tells the truth about training -------------------------------------------------------

@dataclass
class DataPreview:
    """What the Train tab shows before Start: how the source is read, its first rows, and how many rows will
    train, be held out and be skipped (and why). Counts are None where they could not be known (a Hub
    dataset previewed by streaming, or a source that is refused)."""
    format: str
    rows: list[list[dict[str, str]]]
    columns: list[str]
    column_renames: dict[str, str] = field(default_factory=dict)
    encoding: str | None = None
    shape: str | None = None
    notes: list[str] = field(default_factory=list)
    bad_lines: list[str] = field(default_factory=list)
    source_rows: int | None = None
    train_rows: int | None = None
    held_out_rows: int | None = None
    held_out_from: str = ""
    skipped_malformed: int = 0
    skipped_missing: int | None = None
    skipped_too_long: int | None = None   # None: not counted (no tokenizer given)
    max_seq_length: int = 0
    refusal: str | None = None            # what Start will answer, when it will refuse this source
    sample: Sample | None = None          # the counts are of the file's first rows only

    def markdown(self) -> str:
        lines = [f"**Detected format:** `{self.format}` · **columns:** "
                 f"{', '.join(f'`{c}`' for c in self.columns)}"]
        if self.column_renames:
            lines.append("**Columns read as:** " + ", ".join(f"`{old}` → `{new}`"
                                                            for old, new in self.column_renames.items()))
        if self.shape:
            lines.append(f"**File:** {self.shape}, encoding {self.encoding}")
        if self.train_rows is not None:
            lines.append(self._counts())
        lines += [f"- {note}" for note in self.notes]
        if self.bad_lines:
            lines.append(f"**Malformed ({len(self.bad_lines)}):** {self._bad_lines_text()}")
        if self.refusal:
            lines.append(f"**Start will refuse this file:** {self.refusal}")
        return "  \n".join(lines)

    def _bad_lines_text(self) -> str:
        """Reasons for the first PREVIEW_REASONS, then the rest by where they are (all in ``bad_lines``)."""
        shown = "; ".join(self.bad_lines[:PREVIEW_REASONS])
        rest = [line.split(" ", 2)[:2] for line in self.bad_lines[PREVIEW_REASONS:]]
        return shown + (f"; and {len(rest)} more: {rest[0][0]}s {', '.join(n for _, n in rest)}" if rest else "")

    def _counts(self) -> str:
        skipped = [f"{self.skipped_malformed} malformed"] if self.skipped_malformed else []
        if self.skipped_missing:
            skipped.append(f"{self.skipped_missing} with missing or empty fields")
        if self.skipped_too_long:
            skipped.append(f"{self.skipped_too_long} longer than {self.max_seq_length} tokens")
        too_long = ("" if self.skipped_too_long is not None
                    else f" (rows longer than {self.max_seq_length} tokens are not counted here)")
        held = (f"{self.held_out_rows} held out for validation ({self.held_out_from})" if self.held_out_rows
                else "none held out (no eval loss)")
        # While Start would refuse the file, the count is what ticking "Skip malformed rows" would train.
        verb = "will train" if self.refusal is None else "would train with Skip malformed rows ticked"
        source = (f"a sample, the {self.sample.text()}; of these" if self.sample
                  else f"{self.source_rows} in the source")
        counted = (" The rest of the file is not read here: the run reads and checks all of it when it starts "
                   "(malformed lines, rows too long)." if self.sample else "")
        return (f"**Rows:** {source} → **{self.train_rows} {verb}**, {held}, "
                f"{sum([self.skipped_malformed, self.skipped_missing or 0, self.skipped_too_long or 0])} skipped"
                f"{': ' + ', '.join(skipped) if skipped else ''}{too_long}.{counted}")


def preview_report(cfg: DataConfig, tokenizer: Any = None, seed: int = 42, rows: int = 5) -> DataPreview:
    """The Train tab's preview: ``prepare``'s own counts for this config (with the run's tokenizer, rows longer
    than max_seq_length are counted too), of a big file's first SAMPLE_ROWS rows only (the report says so). A
    partly broken file is still previewed, with every malformed line and the refusal Start will give unless
    skip_bad_rows is on. Raises DataError when nothing can be read."""
    # Past the bad lines, to list them all (over half bad still raises); of a big file its first rows only.
    raw = load_source(cfg, skip_bad_rows=True, sample=True)
    refusal = None
    if raw.file is not None and not cfg.skip_bad_rows:
        try:
            check_malformed(raw.file, Path(cfg.source).name, False, usable_row_count(cfg))
        except MalformedRowsError as error:
            refusal = str(error)
    reading = read_columns(raw.train.column_names, cfg.format)
    report = DataPreview(reading.format, _shown_rows(raw.train, reading, rows), list(raw.train.column_names),
                         dict(reading.renames), raw.file.encoding if raw.file else None,
                         raw.file.shape if raw.file else None, refusal=refusal, max_seq_length=cfg.max_seq_length,
                         bad_lines=[str(b) for b in raw.file.bad_lines] if raw.file else [])
    prepared = _prepare(raw, cfg, tokenizer, seed)
    held_from = ("the source's validation split" if raw.validation is not None
                 else f"{cfg.validation_fraction:.0%} of the rows")
    shown_elsewhere = set(raw.notes())  # the file's shape and malformed lines have their own lines above
    report.notes = [n for n in prepared.notes if n not in shown_elsewhere and not n.startswith("columns read as")]
    report.source_rows = len(raw.train) + raw.malformed
    report.train_rows = len(prepared.train)
    report.held_out_rows = len(prepared.eval) if prepared.eval is not None else 0
    report.held_out_from = held_from
    report.sample = raw.sample
    report.skipped_malformed = raw.malformed
    report.skipped_missing = prepared.skipped_rows
    too_long = prepared.dropped_too_long + prepared.eval_dropped_too_long
    report.skipped_too_long = too_long if tokenizer is not None else None
    return report


def hub_preview(name: str, config: str | None = None, split: str = "train", rows: int = 5,
                fmt: str = "auto", column_mapping: dict[str, str] | None = None) -> DataPreview:
    """The first rows of a Hub dataset as chat messages, with the format and column reading; the row counts stay
    unknown (None) until training loads the whole split."""
    first = hub_first_rows(name, config, split, rows)
    for old, new in (column_mapping or {}).items():
        for row in first:
            if old in row:
                row[new] = row.pop(old)
    columns = list(first[0])
    reading = read_columns(columns, fmt)
    return DataPreview(reading.format, _shown_rows(first, reading, rows), columns, dict(reading.renames),
                       notes=list(reading.notes))


def validation_prompts(cfg: DataConfig, limit: int = 8) -> list[str]:
    """The user turns of held-out rows: example prompts for the Chat tab."""
    try:
        prepared = prepare(cfg)
    except DataError:
        return []
    rows = prepared.eval if prepared.eval is not None else prepared.train
    prompts = []
    for row in rows.select(range(min(limit, len(rows)))):
        if "prompt" in row:
            prompts.append(row["prompt"][-1]["content"])
    return prompts


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
