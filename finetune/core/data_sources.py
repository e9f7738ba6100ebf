"""Where a data set's rows come from: a local file (checked for type, size, text and malformed lines before
anything trains), a bundled set under data/, or a Hub dataset (and a first look at one without downloading it),
with the user's column mapping applied. What the rows mean is data_format.py's; turning them into a training set
is data.py's.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
from datasets import Dataset, DatasetDict, Features, Json, load_dataset

from finetune.core.config import DataConfig
from finetune.core.data_files import (IN_MEMORY_LIMIT, TEXT_LOADERS, DataError, FileRows, Sample, check_bad_lines,
                                      read_text_file, read_text_sample)
from finetune.core.paths import DATA_DIR, PathRefused, bundled_name

FILE_LOADERS = {**TEXT_LOADERS, ".parquet": "parquet"}
# Not read, on purpose: openpyxl would be a new dependency that parses XML from a zip a visitor uploads (its docs
# ask for defusedxml against XML attacks, and the zip can inflate far past the upload cap), while "Save as CSV" is
# one step in every spreadsheet program. The message says so.
SPREADSHEET_SUFFIXES = (".xlsx", ".xlsm", ".xls", ".ods", ".numbers")
# A request reads at most this much of a data file (the preview, Start's checks): its work must not grow with an
# upload of up to hundreds of MB while other visitors wait. The training child reads and checks the whole file.
SAMPLE_BYTES = 2**20
SAMPLE_ROWS = 2000
VALIDATION_SPLITS = ("validation", "valid", "val", "test")


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
        check_malformed(read_text_sample(path, SAMPLE_BYTES, SAMPLE_ROWS), path.name, skip_bad_rows, count_usable)
    elif _read_in_memory(path, loader):
        check_malformed(read_text_file(path), path.name, skip_bad_rows, count_usable)
    if loader != "parquet" and not _read_in_memory(path, loader):  # datasets' loaders will read it: UTF-8 only
        _check_is_text(path, loader)
        if loader == "json":
            _check_json_rows_are_objects(path)
    return loader


def check_malformed(read: FileRows, name: str, skip_bad_rows: bool, count_usable: UsableCount | None) -> None:
    """check_bad_lines, counting the usable rows only when it will refuse (counting reads every row)."""
    refusing = bool(read.bad_lines) and not skip_bad_rows
    check_bad_lines(read, name, skip_bad_rows, count_usable(read.rows) if count_usable and refusing else None)


def mapped_rows(rows: list[dict[str, Any]], cfg: DataConfig) -> Dataset:
    """A file's readable rows as a dataset with the user's column mapping applied, as load_source gives them."""
    return _rename(rows_to_dataset(rows, Path(cfg.source).name), cfg.column_mapping)


def _load_file(path: Path, skip_bad_rows: bool = False,
               count_usable: UsableCount | None = None) -> tuple[Dataset, FileRows | None]:
    loader = _check_file_type_and_size(path)
    if _read_in_memory(path, loader):
        read = read_text_file(path)
        check_malformed(read, path.name, skip_bad_rows, count_usable)
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
    check_malformed(read, path.name, skip_bad_rows, count_usable)
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
