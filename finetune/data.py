"""Dataset sources, format detection and conversion to chat messages.

Every accepted format becomes TRL's conversational prompt/completion shape::

    {"prompt": [{"role": "user", "content": ...}], "completion": [{"role": "assistant", "content": ...}]}

so that TRL's completion-only loss trains on the assistant's answer alone (SmolLM2's chat template has no
``{% generation %}`` markers, so ``assistant_only_loss`` is not available). Multi-turn conversations keep the
earlier turns in the prompt and train on the last assistant turn. Plain ``text`` rows stay plain text
(language-model loss on every token).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from datasets import Dataset, DatasetDict, load_dataset

from finetune.config import DataConfig
from finetune.paths import DATA_DIR, PathRefused, bundled_name

FILE_LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
VALIDATION_SPLITS = ("validation", "valid", "val", "test")

# Detection order matters: the most specific column sets first.
FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "prompt_response": ("prompt", "response"),
    "question_answer": ("question", "answer"),
    "text": ("text",),
}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bot": "assistant", "model": "assistant", "system": "system"}


class DataError(ValueError):
    """The dataset cannot be used; the message says why and what would work."""


@dataclass
class PreparedData:
    train: Dataset
    eval: Dataset | None
    format: str
    skipped_rows: int = 0        # rows with a missing or empty field
    dropped_too_long: int = 0    # rows longer than max_seq_length
    notes: list[str] = field(default_factory=list)


# --- loading raw rows --------------------------------------------------------------------------------------

def _is_preference_set(folder: Path) -> bool:
    with open(folder / "train.jsonl", encoding="utf-8") as rows:
        first = json.loads(rows.readline() or "{}")
    return "chosen" in first or "label" in first


def bundled_names(preference: bool = False) -> list[str]:
    """The bundled SFT datasets, or with ``preference`` the bundled preference sets (chosen/rejected, thumbs)."""
    return sorted(f"bundled:{p.name}" for p in DATA_DIR.iterdir()
                  if (p / "train.jsonl").is_file() and _is_preference_set(p) == preference)


def source_kind(source: str) -> str:
    if source.startswith("bundled:"):
        return "bundled"
    path = Path(source).expanduser()
    if path.suffix.lower() in FILE_LOADERS or path.exists() or source.startswith((".", "/", "~")):
        return "file"
    return "hub"


def max_file_bytes() -> int:
    """Largest data file accepted (LORA_LAB_MAX_DATA_MB, default 1024): a public Space must not be made to
    parse a multi-GB upload."""
    try:
        return int(float(os.environ.get("LORA_LAB_MAX_DATA_MB", "1024")) * 1024 * 1024)
    except ValueError:
        return 1024 * 1024 * 1024


def check_file(path: Path) -> str:
    """The cheap checks on a local data file (exists, type, size, text, JSON shape); returns its loader name."""
    if not path.is_file():
        raise DataError(f"Data file not found: {path}")
    loader = FILE_LOADERS.get(path.suffix.lower())
    if loader is None:
        raise DataError(f"Unsupported file type '{path.suffix}' for {path.name}; use one of "
                        f"{', '.join(FILE_LOADERS)}.")
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"Data file {path.name} is empty.")
    if size > max_file_bytes():
        raise DataError(f"Data file {path.name} is {size / 2**20:,.0f} MB; the limit is "
                        f"{max_file_bytes() / 2**20:,.0f} MB (LORA_LAB_MAX_DATA_MB). Use max samples on a "
                        "smaller extract, or a Hub dataset.")
    _check_is_text(path, loader)
    if loader == "json":
        _check_json_rows_are_objects(path)
        # datasets reports a cut-off file as "an error occurred": find the bad line (small files only; cheap).
        detail = _bad_json_line(path) if size <= 64 * 2**20 else None
        if detail:
            raise DataError(f"Could not read {path.name} as JSON: {detail}")
    return loader


def _load_file(path: Path) -> Dataset:
    loader = check_file(path)
    try:
        dataset = load_dataset(loader, data_files=str(path), split="train")
    except Exception as error:  # datasets raises many types for a malformed file; all mean "unreadable"
        detail = _bad_json_line(path) if loader == "json" else None
        raise DataError(f"Could not read {path.name} as {loader.upper()}: "
                        f"{detail or first_line(error)}") from None
    if len(dataset) == 0:
        raise DataError(f"Data file {path.name} has no rows.")
    return dataset


def _check_is_text(path: Path, loader: str) -> None:
    if loader == "parquet":
        return
    head = path.open("rb").read(65536)
    if b"\x00" in head:
        raise DataError(f"{path.name} looks like a binary file, not {loader.upper()} text.")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(head) - 4:  # a cut multi-byte character at the block's end is fine
            raise DataError(f"{path.name} is not UTF-8 text (bad byte at position {error.start}); "
                            "re-save it as UTF-8.") from None


def _check_json_rows_are_objects(path: Path) -> None:
    """datasets turns a JSON list of scalars into a 'text' column; a user meant objects, so say so."""
    head = path.open("rb").read(4096).decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    if path.suffix.lower() == ".json" and head.startswith("["):
        head = head[1:].lstrip()
        if head and not head.startswith(("{", "]")):
            raise DataError(f"{path.name} must be a JSON list of objects (one per row), like "
                            '[{"prompt": ..., "completion": ...}]; found a list of plain values.')
    elif head and not head.startswith("{"):
        raise DataError(f"{path.name} must hold one JSON object per line (or a list of objects); "
                        f"it starts with {head[:20]!r}.")


def _bad_json_line(path: Path) -> str | None:
    """Which line of a JSON Lines file does not parse (datasets only says 'an error occurred')."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() == ".json" and text.lstrip("\ufeff \t\r\n").startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as error:
            return f"invalid JSON at line {error.lineno} ({error.msg}); the file may be cut off."
        return None
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as error:
                return f"line {number} is not valid JSON ({error.msg}); the file may be cut off."
    return None


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an error's message (its type name when the message is empty), for a one-line report."""
    text = str(error).strip().splitlines()
    return text[0][:limit] if text else type(error).__name__


def _load_bundled(name: str) -> DatasetDict:
    try:
        bundled_name(name)  # a plain name under data/: 'bundled:../..' never leaves it
    except PathRefused as error:
        raise DataError(str(error)) from None
    folder = DATA_DIR / name.removeprefix("bundled:")
    if not (folder / "train.jsonl").is_file():
        raise DataError(f"No bundled dataset '{name}'; available: {', '.join(bundled_names())}.")
    splits = {split.stem: str(split) for split in folder.glob("*.jsonl")}
    return load_dataset("json", data_files=splits)


def _load_hub(cfg: DataConfig) -> DatasetDict:
    from finetune.models import ModelSourceError, require_hub

    try:
        require_hub(cfg.source, "dataset")
    except ModelSourceError as error:
        raise DataError(str(error)) from None
    try:
        return load_dataset(cfg.source, cfg.hub_config)
    except Exception as error:  # DatasetNotFoundError, ValueError for a bad config, connection errors
        raise DataError(f"Could not load Hub dataset '{cfg.source}': {first_line(error)}") from None


def load_raw(cfg: DataConfig) -> tuple[Dataset, Dataset | None]:
    """(train rows, validation rows if the source has a validation split) with columns renamed."""
    kind = source_kind(cfg.source)
    if kind == "file":
        train, validation = _load_file(Path(cfg.source).expanduser()), None
    else:
        splits = _load_bundled(cfg.source) if kind == "bundled" else _load_hub(cfg)
        if cfg.split not in splits:
            raise DataError(f"Dataset '{cfg.source}' has no split '{cfg.split}'; it has: {', '.join(splits)}.")
        train = splits[cfg.split]
        validation = next((splits[s] for s in VALIDATION_SPLITS if s in splits and s != cfg.split), None)
    return _rename(train, cfg.column_mapping), (_rename(validation, cfg.column_mapping) if validation else None)


def _rename(dataset: Dataset, mapping: dict[str, str]) -> Dataset:
    missing = [old for old in mapping if old not in dataset.column_names]
    if missing:
        raise DataError(f"Column mapping names columns that do not exist: {', '.join(missing)}. "
                        f"Columns found: {', '.join(dataset.column_names)}.")
    renames = {old: new for old, new in mapping.items() if old != new}
    clashes = [new for new in renames.values() if new in dataset.column_names and new not in renames]
    if clashes:
        dataset = dataset.remove_columns(clashes)
    return dataset.rename_columns(renames) if renames else dataset


# --- format detection and conversion -----------------------------------------------------------------------

def detect_format(columns: Iterable[str]) -> str:
    present = set(columns)
    for name, needed in FORMAT_COLUMNS.items():
        if set(needed) <= present:
            return name
    accepted = "; ".join(f"{name}: {' + '.join(cols)}" for name, cols in FORMAT_COLUMNS.items())
    raise DataError(f"No usable columns. Found: {', '.join(sorted(present)) or 'none'}. "
                    f"Accepted formats: {accepted}. Use the column mapping to rename yours.")


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    return text if text.strip() else None


def _pair(prompt: Any, answer: Any) -> list[dict[str, str]] | None:
    prompt_text, answer_text = _text(prompt), _text(answer)
    if prompt_text is None or answer_text is None:
        return None
    return [{"role": "user", "content": prompt_text}, {"role": "assistant", "content": answer_text}]


def _messages_from_list(turns: Any, role_key: str, content_key: str,
                        roles: dict[str, str] | None = None) -> list[dict[str, str]] | None:
    if not isinstance(turns, list):
        return None
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            return None
        role, content = turn.get(role_key), _text(turn.get(content_key))
        role = (roles or {}).get(str(role).lower(), role) if role is not None else None
        if role not in ("system", "user", "assistant") or content is None:
            return None
        messages.append({"role": role, "content": content})
    return messages


def row_to_messages(row: dict[str, Any], fmt: str) -> list[dict[str, str]] | None:
    """A row as chat messages ending with the assistant's answer, or None if the row is unusable."""
    if fmt == "messages":
        return _messages_from_list(row.get("messages"), "role", "content")
    if fmt == "sharegpt":
        return _messages_from_list(row.get("conversations"), "from", "value", SHAREGPT_ROLES)
    if fmt == "alpaca":
        extra = _text(row.get("input"))
        instruction = _text(row.get("instruction"))
        prompt = f"{instruction}\n\n{extra}" if instruction and extra else instruction
        return _pair(prompt, row.get("output"))
    if fmt in ("prompt_completion", "prompt_response", "question_answer"):
        prompt_key, answer_key = FORMAT_COLUMNS[fmt]
        prompt, answer = row.get(prompt_key), row.get(answer_key)
        if isinstance(prompt, list) and isinstance(answer, list):  # already conversational
            return _messages_from_list(prompt + answer, "role", "content")
        return _pair(prompt, answer)
    raise DataError(f"Format '{fmt}' has no chat form")


def split_prompt_completion(messages: list[dict[str, str]]) -> dict[str, list[dict[str, str]]] | None:
    last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    if last_assistant <= 0 or not any(m["role"] == "user" for m in messages[:last_assistant]):
        return None
    return {"prompt": messages[:last_assistant], "completion": [messages[last_assistant]]}


def convert(dataset: Dataset, fmt: str) -> tuple[Dataset, int]:
    """(converted rows, number of unusable rows skipped)."""
    rows = []
    for row in dataset:
        if fmt == "text":
            text = _text(row.get("text"))
            converted = {"text": text} if text else None
        else:
            messages = row_to_messages(row, fmt)
            converted = split_prompt_completion(messages) if messages else None
        if converted is not None:
            rows.append(converted)
    return Dataset.from_list(rows) if rows else Dataset.from_dict({}), len(dataset) - len(rows)


def _resolve_format(cfg: DataConfig, columns: list[str]) -> str:
    if cfg.format != "auto":
        needed = FORMAT_COLUMNS.get(cfg.format, ())
        missing = [c for c in needed if c not in columns]
        if missing:
            raise DataError(f"Format '{cfg.format}' needs the column(s) {', '.join(missing)}; "
                            f"found: {', '.join(columns)}.")
        return cfg.format
    return detect_format(columns)


# --- the pipeline the trainer and the UI use ---------------------------------------------------------------

def token_length(row: dict[str, Any], tokenizer: Any) -> int:
    if "text" in row:
        return len(tokenizer(row["text"])["input_ids"])
    ids = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True)
    return len(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def prepare(cfg: DataConfig, tokenizer: Any = None, seed: int = 42) -> PreparedData:
    train_raw, validation_raw = load_raw(cfg)
    fmt = _resolve_format(cfg, train_raw.column_names)
    train, skipped = convert(train_raw, fmt)
    if len(train) == 0:
        raise DataError(f"None of the {len(train_raw)} rows has usable '{fmt}' content (missing or empty fields).")
    notes = [f"{skipped} row(s) skipped: missing or empty fields"] if skipped else []
    if cfg.max_samples is not None and len(train) > cfg.max_samples:
        train = train.shuffle(seed=seed).select(range(cfg.max_samples))
    evaluation = None
    if validation_raw is not None and cfg.validation_fraction > 0:
        evaluation, _ = convert(validation_raw, _resolve_format(cfg, validation_raw.column_names))
    elif cfg.validation_fraction > 0 and len(train) >= 10:
        parts = train.train_test_split(test_size=cfg.validation_fraction, seed=seed)
        train, evaluation = parts["train"], parts["test"]
    elif cfg.validation_fraction > 0:
        notes.append("too few rows to hold out a validation split; eval loss is off")
    prepared = PreparedData(train, evaluation if evaluation is not None and len(evaluation) else None,
                            fmt, skipped, 0, notes)
    if tokenizer is not None:
        _drop_too_long(prepared, cfg.max_seq_length, tokenizer)
    return prepared


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
        prepared.eval = prepared.eval.select(eval_keep) if eval_keep else None


def preview(cfg: DataConfig, rows: int = 5) -> tuple[str, list[list[dict[str, str]]], list[str]]:
    """(detected format, first rows as chat messages, original columns) for the UI's data preview."""
    train_raw, _ = load_raw(cfg)
    fmt = _resolve_format(cfg, train_raw.column_names)
    sample = train_raw.select(range(min(rows, len(train_raw))))
    if fmt == "text":
        shown = [[{"role": "text", "content": str(r.get("text"))}] for r in sample]
    else:
        shown = [row_to_messages(r, fmt) or [] for r in sample]
    return fmt, shown, list(train_raw.column_names)


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

