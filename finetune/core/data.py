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
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import pyarrow as pa
from datasets import Dataset, DatasetDict, Features, Json, load_dataset

from finetune.core.config import DataConfig
from finetune.core.data_files import (IN_MEMORY_LIMIT, TEXT_LOADERS, DataError, FileRows, MalformedRowsError, Sample,
                                      check_bad_lines, read_text_file, read_text_sample)
from finetune.core.paths import DATA_DIR, PathRefused, bundled_name

__all__ = ["DataError", "MalformedRowsError"]  # re-exported: callers catch them from here

FILE_LOADERS = {**TEXT_LOADERS, ".parquet": "parquet"}
# Not read, on purpose: openpyxl would be a new dependency that parses XML from a zip a visitor uploads (its docs
# ask for defusedxml against XML attacks, and the zip can inflate far past the upload cap), while "Save as CSV" is
# one step in every spreadsheet program. The message says so.
SPREADSHEET_SUFFIXES = (".xlsx", ".xlsm", ".xls", ".ods", ".numbers")
PREVIEW_REASONS = 20  # malformed lines the preview explains one by one; the others it numbers
# A request reads at most this much of a data file (the preview, Start's checks): its work must not grow with an
# upload of up to hundreds of MB while other visitors wait. The training child reads and checks the whole file.
SAMPLE_BYTES = 2**20
SAMPLE_ROWS = 2000
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
OPTIONAL_COLUMNS = {"alpaca": ("input",)}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bot": "assistant", "model": "assistant", "ai": "assistant",
                  "system": "system"}

# Column names as public instruction datasets spell them, compared after column_key(): lower case, separators
# as '_', a trailing '_text' dropped. Earlier names win when a file has several.
TURN_NAMES = ("messages", "conversations", "conversation", "dialogue", "dialog", "chat", "turns")
INSTRUCTION_NAMES = ("instruction", "instructions", "task")
PROMPT_NAMES = ("prompt", "question", "query", "input", "human", "user", "request", "inputs", "source")
ANSWER_NAMES = ("completion", "response", "answer", "output", "assistant", "gpt", "bot", "reply", "target",
                "chosen", "outputs", "targets")
CONTEXT_NAMES = ("input", "context")  # extra text after the instruction (Alpaca's input, Dolly's context)
TEXT_NAMES = ("text", "content", "document")
SYSTEM_NAMES = ("system", "system_prompt")
NAME_SUFFIXES = ("_text", "_str", "_string")


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


@dataclass
class RawData:
    """A source's rows before conversion, and what was assumed to read a file."""
    train: Dataset
    validation: Dataset | None
    file: FileRows | None = None
    sample: Sample | None = None  # only the file's beginning was read (a preview)

    @property
    def malformed(self) -> int:
        return len(self.file.bad_lines) if self.file else 0

    def notes(self) -> list[str]:
        return self.file.notes() if self.file else []


# --- loading raw rows --------------------------------------------------------------------------------------

def _is_preference_set(folder: Path) -> bool:
    with open(folder / "train.jsonl", encoding="utf-8") as rows:
        first = json.loads(rows.readline() or "{}")
    return "chosen" in first or "label" in first


def bundled_names(preference: bool = False) -> list[str]:
    """The bundled SFT datasets, or with ``preference`` the bundled preference sets (chosen/rejected, thumbs)."""
    return sorted(f"bundled:{p.name}" for p in DATA_DIR.iterdir()
                  if (p / "train.jsonl").is_file() and _is_preference_set(p) == preference)


def data_source_kind(source: str) -> str:
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


def _check_file_type_and_size(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"Data file not found: {path}")
    if path.suffix.lower() in SPREADSHEET_SUFFIXES:
        raise DataError(f"Unsupported file type '{path.suffix}' for {path.name}: spreadsheet files are not read. "
                        "Save the sheet as CSV UTF-8 (File > Save as, or Download > CSV) and use that file.")
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
    return loader


def _read_in_memory(path: Path, loader: str) -> bool:
    """Text files up to IN_MEMORY_LIMIT are decoded and parsed here (any encoding, every bad line listed)."""
    return loader != "parquet" and path.stat().st_size <= IN_MEMORY_LIMIT


UsableCount = Callable[[list[dict[str, Any]]], int]  # readable rows -> how many a run of its kind can train on


def check_file(path: Path, skip_bad_rows: bool = False, count_usable: UsableCount | None = None) -> str:
    """The checks on a local data file before a run starts (exists, type, size, text, shape, malformed lines,
    refused unless ``skip_bad_rows``); returns its loader name. Reads at most SAMPLE_BYTES of it.
    ``count_usable`` lets a refusal quote how many rows skipping the malformed ones would train on."""
    loader = _check_file_type_and_size(path)
    if loader != "parquet" and path.stat().st_size > SAMPLE_BYTES:
        # A request checks the beginning only; the training child reads the whole file and fails with the same
        # message if a later line is malformed.
        _check_bad_lines(read_text_sample(path, SAMPLE_BYTES, SAMPLE_ROWS), path.name, skip_bad_rows, count_usable)
    elif _read_in_memory(path, loader):
        _check_bad_lines(read_text_file(path), path.name, skip_bad_rows, count_usable)
    if loader != "parquet" and not _read_in_memory(path, loader):  # datasets' loaders will read it: UTF-8 only
        _check_is_text(path, loader)
        if loader == "json":
            _check_json_rows_are_objects(path)
    return loader


def _check_bad_lines(read: FileRows, name: str, skip_bad_rows: bool, count_usable: UsableCount | None) -> None:
    """check_bad_lines, counting the usable rows only when it will refuse (counting reads every row)."""
    refusing = bool(read.bad_lines) and not skip_bad_rows
    check_bad_lines(read, name, skip_bad_rows, count_usable(read.rows) if count_usable and refusing else None)


def mapped_rows(rows: list[dict[str, Any]], cfg: DataConfig) -> Dataset:
    """A file's readable rows as a dataset with the user's column mapping applied, as load_source gives them."""
    return _rename(rows_to_dataset(rows, Path(cfg.source).name), cfg.column_mapping)


def usable_row_count(cfg: DataConfig) -> UsableCount:
    """For a supervised run on ``cfg``: how many readable rows have the fields its format needs (the rows
    ``prepare`` keeps before any is held out), with the user's column mapping applied."""
    def count(rows: list[dict[str, Any]]) -> int:
        dataset = mapped_rows(rows, cfg)
        try:
            reading = read_columns(dataset.column_names, cfg.format)
        except DataError:
            return 0
        return len(convert(_apply_reading(dataset, reading), reading.format)[0])
    return count


def _load_file(path: Path, skip_bad_rows: bool = False,
               count_usable: UsableCount | None = None) -> tuple[Dataset, FileRows | None]:
    loader = _check_file_type_and_size(path)
    if _read_in_memory(path, loader):
        read = read_text_file(path)
        _check_bad_lines(read, path.name, skip_bad_rows, count_usable)
        if not read.rows:
            raise DataError(f"Data file {path.name} has no rows.")
        return rows_to_dataset(read.rows, path.name), read
    if loader != "parquet":
        _check_is_text(path, loader)
        if loader == "json":
            _check_json_rows_are_objects(path)
    options = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    try:
        dataset = _load_dataset(loader, data_files=str(path), split="train", **options)
    except Exception as error:  # datasets raises many types for a malformed file; all mean "unreadable"
        raise DataError(f"Could not read {path.name} as {loader.upper()}: {first_line(error)} (files over "
                        f"{IN_MEMORY_LIMIT // 2**20} MB must be clean UTF-8)") from None
    if len(dataset) == 0:
        raise DataError(f"Data file {path.name} has no rows.")
    return dataset, None


def _load_file_sample(path: Path, skip_bad_rows: bool, count_usable: UsableCount | None
                      ) -> tuple[Dataset, FileRows | None, Sample | None]:
    """A file's first rows (see load_source's ``sample``): the whole file when it is small."""
    loader = _check_file_type_and_size(path)
    if loader == "parquet":
        return _parquet_sample(path)
    read = read_text_sample(path, SAMPLE_BYTES, SAMPLE_ROWS)
    _check_bad_lines(read, path.name, skip_bad_rows, count_usable)
    if not read.rows:
        raise DataError(f"Data file {path.name} has no rows" + (" in its first part." if read.sample else "."))
    return rows_to_dataset(read.rows, path.name), read, read.sample


def _parquet_sample(path: Path) -> tuple[Dataset, None, Sample | None]:
    """A Parquet file's first SAMPLE_ROWS rows, one record batch; its metadata gives the exact row count."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        total = parquet.metadata.num_rows
        batch = next(parquet.iter_batches(batch_size=SAMPLE_ROWS), None)
    except Exception as error:  # pyarrow's many refusals of a damaged file all mean "unreadable"
        raise DataError(f"Could not read {path.name} as PARQUET: {first_line(error)}") from None
    if batch is None or total == 0:
        raise DataError(f"Data file {path.name} has no rows.")
    seen = Sample(batch.num_rows, 0, path.stat().st_size, exact_rows=total) if batch.num_rows < total else None
    return Dataset(pa.Table.from_batches([batch])), None, seen


# datasets resolves data files with tqdm's thread_map, whose shared lock one thread can delete while another uses
# it ("type object 'tqdm' has no attribute '_lock'") when two visitors load at once: loads take turns.
_DATASETS_LOADS = threading.Lock()


def _load_dataset(*args: Any, **kwargs: Any) -> Any:
    """datasets.load_dataset, one call at a time in this process."""
    with _DATASETS_LOADS:
        return load_dataset(*args, **kwargs)


def rows_to_dataset(rows: list[dict[str, Any]], name: str) -> Dataset:
    """A Dataset with every column any row has (Dataset.from_list keeps only the first row's); a column whose
    rows hold different kinds of value (text in one, a list in another) keeps each value as it is, as datasets'
    JSON loader does, so each row is judged on its own later."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    data = {column: [row.get(column) for row in rows] for column in columns}
    features = Features({column: _feature(values) for column, values in data.items()})
    try:
        return Dataset.from_dict(data, features=features)
    except Exception as error:  # pyarrow's own refusals; not expected once mixed columns are Json
        raise DataError(f"Could not read {name}: {first_line(error)}") from None


def _feature(values: list[Any]) -> Any:
    try:
        kind = pa.array(values).type
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return Json()
    return Features.from_arrow_schema(pa.schema([("column", kind)]))["column"]


def _check_is_text(path: Path, loader: str) -> None:
    head = path.open("rb").read(65536)
    if b"\x00" in head:
        raise DataError(f"{path.name} looks like a binary file, not {loader.upper()} text.")
    try:
        head.removeprefix(b"\xef\xbb\xbf").decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(head) - 4:  # a cut multi-byte character at the block's end is fine
            raise DataError(f"{path.name} is not UTF-8 text (bad byte at position {error.start}); files over "
                            f"{IN_MEMORY_LIMIT // 2**20} MB must be UTF-8: re-save it as UTF-8.") from None


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
    return _load_dataset("json", data_files=splits)


def _load_hub(cfg: DataConfig) -> DatasetDict:
    from finetune.core.models import ModelSourceError, require_hub

    try:
        require_hub(cfg.source, "dataset")
    except ModelSourceError as error:
        raise DataError(str(error)) from None
    try:
        return _load_dataset(cfg.source, cfg.hub_config)
    except Exception as error:  # DatasetNotFoundError, ValueError for a bad config, connection errors
        raise DataError(f"Could not load Hub dataset '{cfg.source}': {first_line(error)}") from None


def load_source(cfg: DataConfig, skip_bad_rows: bool | None = None,
                count_usable: UsableCount | None = None, sample: bool = False) -> RawData:
    """The source's training rows (and validation rows if it has that split) with the user's column mapping
    applied, and for a local file what was assumed to read it. ``count_usable``: see check_file. ``sample``: of
    a local file, read only its first SAMPLE_ROWS rows (at most SAMPLE_BYTES), for a preview."""
    skip = cfg.skip_bad_rows if skip_bad_rows is None else skip_bad_rows
    kind = data_source_kind(cfg.source)
    read = None
    if kind == "file" and sample:
        train, read, seen = _load_file_sample(Path(cfg.source).expanduser(), skip, count_usable)
        mapping = cfg.column_mapping
        return RawData(_rename(train, mapping), None, read, seen)
    if kind == "file":
        (train, read), validation = _load_file(Path(cfg.source).expanduser(), skip, count_usable), None
    else:
        splits = _load_bundled(cfg.source) if kind == "bundled" else _load_hub(cfg)
        if cfg.split not in splits:
            raise DataError(f"Dataset '{cfg.source}' has no split '{cfg.split}'; it has: {', '.join(splits)}.")
        train = splits[cfg.split]
        validation = next((splits[s] for s in VALIDATION_SPLITS if s in splits and s != cfg.split), None)
    mapping = cfg.column_mapping
    return RawData(_rename(train, mapping), _rename(validation, mapping) if validation else None, read)


def load_raw(cfg: DataConfig) -> tuple[Dataset, Dataset | None]:
    """(train rows, validation rows if the source has a validation split) with columns renamed."""
    raw = load_source(cfg)
    return raw.train, raw.validation


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


# --- which columns mean what -------------------------------------------------------------------------------

@dataclass
class ColumnReading:
    """How a table's columns are read: the format, and which columns are renamed to the names it reads."""
    format: str
    renames: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return ", ".join(f"{old} → {new}" for old, new in self.renames.items())


def column_key(name: str) -> str:
    """A column name compared without case or separators: 'Output Text', 'output-text' -> 'output'."""
    key = re.sub(r"[^0-9a-z]+", "_", str(name).lower()).strip("_")
    for suffix in NAME_SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[:-len(suffix)]
    return key


def _keys(columns: list[str]) -> dict[str, str]:
    """column_key -> column; a column already spelled as its key wins over 'Prompt' or 'PROMPT'."""
    keys = {column: column for column in columns if column_key(column) == column}
    for column in columns:
        keys.setdefault(column_key(column), column)
    return keys


def _first(keys: dict[str, str], names: tuple[str, ...], taken: Iterable[str | None] = ()) -> str | None:
    return next((keys[n] for n in names if n in keys and keys[n] not in taken), None)


def _unused(keys: dict[str, str], names: tuple[str, ...], used: Iterable[str | None]) -> list[str]:
    return [keys[n] for n in names if n in keys and keys[n] not in used]


def read_columns(columns: Iterable[str], fmt: str = "auto") -> ColumnReading:
    """The format and column renames for a table: a format's own column names first (compared without case or
    separators), then the synonyms public datasets use, plain text last. Raises DataError when nothing fits."""
    columns = list(columns)
    if fmt != "auto":
        return _reading_for(fmt, columns)
    keys = _keys(columns)
    named = [name for name, needed in FORMAT_COLUMNS.items() if all(n in keys for n in needed)]
    if named and named[0] != "text":
        reading = _named_reading(named[0], keys)
        if len(named) > 1:
            reading.notes.append(f"the columns also fit the format(s) {', '.join(named[1:])}; read as {named[0]} "
                                 "(choose the format to read them otherwise)")
    else:
        reading = _by_turns(keys) or _by_instruction(keys) or _by_prompt_answer(keys) or _by_text(keys)
        if reading is None:
            raise DataError(_no_usable_columns(columns))
    _add_system_column(reading, columns)
    return reading


def _no_usable_columns(columns: list[str]) -> str:
    accepted = "; ".join(f"{name}: {' + '.join(cols)}" for name, cols in FORMAT_COLUMNS.items())
    return (f"No usable columns. Found: {', '.join(sorted(columns)) or 'none'}. Accepted formats: {accepted} "
            "(names match without regard to case or separators, and common synonyms such as query/response, "
            "input/output, human/assistant and Dolly's instruction/context/response are understood). "
            "Use the column mapping to rename yours.")


def _renames(pairs: dict[str | None, str]) -> dict[str, str]:
    return {old: new for old, new in pairs.items() if old is not None and old != new}


def _named_reading(name: str, keys: dict[str, str]) -> ColumnReading:
    """'Question'/'ANSWER', 'Instruction'/'Input'/'Output': a known format, under any capitals."""
    needed = FORMAT_COLUMNS[name]
    wanted = needed + tuple(n for n in OPTIONAL_COLUMNS.get(name, ()) if n in keys)
    notes: list[str] = []
    if len(needed) == 2:  # a prompt and an answer column: say which other column could have been the answer
        notes = _answer_notes(keys, keys[needed[-1]], [keys[n] for n in wanted], mention_text=False)
    return ColumnReading(name, _renames({keys[n]: n for n in wanted}), notes)


def _by_turns(keys: dict[str, str]) -> ColumnReading | None:
    column = _first(keys, TURN_NAMES)
    return ColumnReading("messages", _renames({column: "messages"})) if column else None


def _answer_notes(keys: dict[str, str], answer: str, used: list[str | None],
                  mention_text: bool = True) -> list[str]:
    notes = []
    others = _unused(keys, ANSWER_NAMES, used)
    if others:
        notes.append(f"'{answer}' read as the answer; {', '.join(repr(o) for o in others)} could also be one "
                     "(use the column mapping to choose)")
    if column_key(answer) == "chosen":
        notes.append("preference data: the chosen answers are trained on, the rejected ones are not used here "
                     "(the RLHF tab trains on both)")
    text = _first(keys, TEXT_NAMES, used) if mention_text else None
    if text:
        notes.append(f"'{text}' is not used (set the format to text to train on it instead)")
    return notes


def _by_instruction(keys: dict[str, str]) -> ColumnReading | None:
    instruction = _first(keys, INSTRUCTION_NAMES)
    answer = _first(keys, ANSWER_NAMES, [instruction])
    if not instruction or not answer:
        return None
    context = _first(keys, CONTEXT_NAMES, [instruction, answer])
    notes = _answer_notes(keys, answer, [instruction, answer, context])
    return ColumnReading("alpaca", _renames({instruction: "instruction", answer: "output", context: "input"}),
                         notes)


def _by_prompt_answer(keys: dict[str, str]) -> ColumnReading | None:
    prompt = _first(keys, PROMPT_NAMES)
    answer = _first(keys, ANSWER_NAMES, [prompt])
    if not prompt or not answer:
        return None
    context = _first(keys, ("context",), [prompt, answer])
    notes = _answer_notes(keys, answer, [prompt, answer, context])
    others = _unused(keys, PROMPT_NAMES, [prompt, answer, context])
    if others:
        notes.append(f"'{prompt}' read as the prompt; {', '.join(repr(o) for o in others)} could also be one "
                     "(use the column mapping to choose)")
    if context:  # question + context + answer: the context follows the question, as Alpaca's input does
        return ColumnReading("alpaca", _renames({prompt: "instruction", context: "input", answer: "output"}), notes)
    return ColumnReading("prompt_completion", _renames({prompt: "prompt", answer: "completion"}), notes)


def _by_text(keys: dict[str, str]) -> ColumnReading | None:
    column = _first(keys, TEXT_NAMES)
    return ColumnReading("text", _renames({column: "text"})) if column else None


def _add_system_column(reading: ColumnReading, columns: list[str]) -> None:
    """A 'system' column (LLaMA-Factory's ShareGPT layout) becomes each row's system turn."""
    column = _first(_keys(columns), SYSTEM_NAMES, reading.renames)
    if reading.format != "text" and column and column != "system":
        reading.renames[column] = "system"


def _reading_for(fmt: str, columns: list[str]) -> ColumnReading:
    """A format the user chose: its columns found under any capitals or separators."""
    keys = _keys(columns)
    needed = FORMAT_COLUMNS.get(fmt, ())
    found = {n: n if n in columns else keys.get(n) for n in needed + OPTIONAL_COLUMNS.get(fmt, ())}
    missing = [n for n in needed if found[n] is None]
    if missing:
        raise DataError(f"Format '{fmt}' needs the column(s) {', '.join(missing)}; found: {', '.join(columns)}.")
    reading = ColumnReading(fmt, _renames({old: new for new, old in found.items()}))
    _add_system_column(reading, columns)
    return reading


def detect_format(columns: Iterable[str]) -> str:
    return read_columns(columns).format


def _apply_reading(dataset: Dataset, reading: ColumnReading) -> Dataset:
    clashes = [new for new in reading.renames.values()
               if new in dataset.column_names and new not in reading.renames]
    if clashes:
        dataset = dataset.remove_columns(clashes)
    return dataset.rename_columns(reading.renames) if reading.renames else dataset


# --- rows to chat messages ---------------------------------------------------------------------------------

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


def _messages_from_list(turns: Any) -> list[dict[str, str]] | None:
    """Chat turns as OpenAI ({'role', 'content'}) or ShareGPT ({'from', 'value'}) write them."""
    if not isinstance(turns, list):
        return None
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            return None
        role = turn.get("role", turn.get("from"))
        content = _text(turn.get("content", turn.get("value")))
        role = SHAREGPT_ROLES.get(str(role).lower()) if role is not None else None
        if role is None or content is None:
            return None
        messages.append({"role": role, "content": content})
    return messages


def _with_system(messages: list[dict[str, str]] | None, system: Any) -> list[dict[str, str]] | None:
    system_text = _text(system)
    if not messages or system_text is None or messages[0]["role"] == "system":
        return messages
    return [{"role": "system", "content": system_text}] + messages


def row_to_messages(row: dict[str, Any], fmt: str) -> list[dict[str, str]] | None:
    """A row as chat messages ending with the assistant's answer, or None if the row is unusable."""
    return _with_system(_row_messages(row, fmt), row.get("system"))


def _row_messages(row: dict[str, Any], fmt: str) -> list[dict[str, str]] | None:
    if fmt in ("messages", "sharegpt"):
        return _messages_from_list(row.get(FORMAT_COLUMNS[fmt][0]))
    if fmt == "alpaca":
        extra = _text(row.get("input"))
        instruction = _text(row.get("instruction"))
        prompt = f"{instruction}\n\n{extra}" if instruction and extra else instruction
        return _pair(prompt, row.get("output"))
    if fmt in ("prompt_completion", "prompt_response", "question_answer"):
        prompt_key, answer_key = FORMAT_COLUMNS[fmt]
        prompt, answer = row.get(prompt_key), row.get(answer_key)
        if isinstance(prompt, list) and isinstance(answer, list):  # already conversational
            return _messages_from_list(prompt + answer)
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
    train_raw = _apply_reading(raw.train, reading)
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
        evaluation, _ = convert(_apply_reading(raw.validation, held_reading), held_reading.format)
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
    than max_seq_length are counted too), of a big file's first SAMPLE_ROWS rows only (the report says so). A partly broken file is still previewed, with every malformed line
    and the refusal Start will give unless skip_bad_rows is on. Raises DataError when nothing can be read."""
    # Past the bad lines, to list them all (over half bad still raises); of a big file its first rows only.
    raw = load_source(cfg, skip_bad_rows=True, sample=True)
    refusal = None
    if raw.file is not None and not cfg.skip_bad_rows:
        try:
            _check_bad_lines(raw.file, Path(cfg.source).name, False, usable_row_count(cfg))
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


# --- Hub datasets: configs, splits and a first look without downloading --------------------------------------

def _require_hub_or_folder(name: str) -> None:
    """A Hub dataset needs the Hub; a local folder laid out as a Hub repository (README with configs:) does not.
    Callers pass a name that went through paths.data_source first."""
    if Path(name).expanduser().is_dir():
        return
    from finetune.core.models import ModelSourceError, require_hub

    try:
        require_hub(name, "dataset")
    except ModelSourceError as error:
        raise DataError(str(error)) from None


def hub_configs(name: str) -> list[str]:
    """The dataset's configurations (subsets), e.g. ['default'] or ['en', 'fr']."""
    _require_hub_or_folder(name)
    from datasets import get_dataset_config_names

    try:
        return list(get_dataset_config_names(name))
    except Exception as error:  # DatasetNotFoundError, connection errors, a bad README
        raise DataError(f"Could not list the configurations of '{name}': {first_line(error)}") from None


def hub_splits(name: str, config: str | None = None) -> list[str]:
    _require_hub_or_folder(name)
    from datasets import get_dataset_split_names

    try:
        return list(get_dataset_split_names(name, config or None))
    except Exception as error:  # an unknown config raises ValueError naming the ones that exist
        raise DataError(f"Could not list the splits of '{name}'"
                        f"{f' ({config})' if config else ''}: {first_line(error)}") from None


def hub_first_rows(name: str, config: str | None = None, split: str = "train", rows: int = 5
                   ) -> list[dict[str, Any]]:
    """The first rows of a Hub dataset's split as they are, streamed: nothing else is downloaded. The RLHF tab
    reads preference columns from them; hub_preview reads chat columns."""
    _require_hub_or_folder(name)
    try:
        stream = _load_dataset(name, config or None, split=split, streaming=True)
        first = [dict(row) for _, row in zip(range(max(rows, 1)), stream)]
    except Exception as error:  # unknown split or config, connection errors
        raise DataError(f"Could not preview '{name}'{f' ({config})' if config else ''}, split '{split}': "
                        f"{first_line(error)}") from None
    if not first:
        raise DataError(f"Split '{split}' of '{name}' has no rows.")
    return first


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

