"""Reading data files as people save them: encodings, JSON shapes, CSV dialects, partly broken files.

A text file (JSON, JSON Lines, CSV/TSV, TXT) becomes a list of row dicts together with what was assumed to read
it (the encoding, the JSON shape, the CSV delimiter) and every line that could not be read, with its reason.
The user's file is never modified: it is decoded in memory (datasets' own loaders read UTF-8 only).

Files over IN_MEMORY_LIMIT go to datasets' loaders instead (they keep memory flat on big files), which need
clean UTF-8 and stop at the first bad line.

    read = read_text_file(Path("qa.csv"))
    read.rows[0], read.encoding, read.shape, read.bad_lines
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IN_MEMORY_LIMIT = 64 * 2**20
TEXT_LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".txt": "text"}
# A JSON object holding the rows under one of these keys is read from that key ({"data": [...]}).
CONTAINER_KEYS = ("data", "rows", "records", "examples", "instances", "items", "train", "samples", "dataset")
CSV_DELIMITERS = (",", ";", "\t", "|")  # ';' is what European spreadsheet programs write
UNICODE_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
# Western European Windows text is the commonest non-UTF-8 file; the detector often names a sibling code page
# that decodes the same bytes identically, and the preview should name the one the user will recognise.
PREFERRED_DETECTED = "cp1252"
# Shapes read as they always were: not worth a note in the run info.
PLAIN_SHAPES = ("JSON Lines", "a JSON list of objects", "CSV separated by commas", "text lines")
LISTED_WITH_REASON = 10
LISTED_NUMBERS = 100


class DataError(ValueError):
    """The dataset cannot be used; the message says why and what would work."""


@dataclass(frozen=True)
class BadLine:
    number: int        # 1-based line number (an item number for a JSON list)
    reason: str
    unit: str = "line"

    def __str__(self) -> str:
        return f"{self.unit} {self.number} {self.reason}"


@dataclass
class FileRows:
    rows: list[dict[str, Any]]
    encoding: str                      # 'UTF-8', 'UTF-8 with byte-order mark', 'cp1252 (detected)', ...
    shape: str                         # how the rows were found: 'JSON Lines', "CSV separated by ';'", ...
    bad_lines: list[BadLine] = field(default_factory=list)
    row_lines: list[int] | None = None  # the line each row starts on (JSON Lines, CSV, TXT; not JSON documents)
    sample: Sample | None = None        # set when only the file's beginning was read (a preview)

    @property
    def total(self) -> int:
        return len(self.rows) + len(self.bad_lines)

    def notes(self) -> list[str]:
        """What was assumed to read the file, in words for the preview and the run info."""
        plain = self.encoding == "UTF-8" and self.shape in PLAIN_SHAPES
        notes = [] if plain else [f"read as {self.shape}, encoding {self.encoding}"]
        if self.bad_lines:
            notes.append(f"{len(self.bad_lines)} malformed {self.bad_lines[0].unit}(s) skipped: "
                         f"{numbers_text(self.bad_lines)}")
        return notes


@dataclass(frozen=True)
class Sample:
    """What a bounded read of a big file saw: its first ``rows`` rows (and malformed lines) in ``bytes_read`` of its
    ``file_bytes``; ``about_rows`` estimates the whole file's rows at the same bytes per row (None: exact count
    known, e.g. a Parquet file's metadata gives it as ``exact_rows``)."""
    rows: int
    bytes_read: int
    file_bytes: int
    exact_rows: int | None = None

    @property
    def about_rows(self) -> int:
        if self.exact_rows is not None:
            return self.exact_rows
        return max(self.rows, round(self.rows * self.file_bytes / max(self.bytes_read, 1)))

    def text(self) -> str:
        if self.exact_rows is not None:
            return f"first {self.rows:,} of {self.exact_rows:,} rows"
        return (f"first {self.rows:,} of about {self.about_rows:,} rows ({_size(self.bytes_read)} of "
                f"{_size(self.file_bytes)} read)")


def _size(count: int) -> str:
    return f"{count / 2**20:.1f} MB" if count >= 2**20 else f"{max(count / 2**10, 0.1):.1f} KB"


class MalformedRowsError(DataError):
    """Some lines of a file cannot be read; carries them all so a preview can list every one."""

    def __init__(self, message: str, bad_lines: list[BadLine], good_rows: int, refused_anyway: bool) -> None:
        super().__init__(message)
        self.bad_lines = bad_lines
        self.good_rows = good_rows
        self.refused_anyway = refused_anyway  # more than half bad: skipping would not help


# --- bytes to text -------------------------------------------------------------------------------------------

def decode_text(raw: bytes, name: str, kind: str) -> tuple[str, str]:
    """(text, the encoding assumed). Refuses binary files and bytes no text encoding fits."""
    for bom, codec in UNICODE_BOMS:  # Windows Notepad's "Unicode": its NUL bytes are not a binary file
        if raw.startswith(bom):
            return _decode_or_refuse(raw, codec, name), f"{codec.upper()} (byte-order mark)"
    if raw.startswith(codecs.BOM_UTF8):
        try:
            return raw[len(codecs.BOM_UTF8):].decode("utf-8"), "UTF-8 with byte-order mark"
        except UnicodeDecodeError:
            raw = raw[len(codecs.BOM_UTF8):]
    if b"\x00" in raw[:65536]:
        raise DataError(f"{name} looks like a binary file, not {kind} text.")
    try:
        return raw.decode("utf-8"), "UTF-8"
    except UnicodeDecodeError as error:
        if error.start >= len(raw) - 3 and error.reason == "unexpected end of data":
            return raw.decode("utf-8", errors="ignore"), "UTF-8 (a cut last character dropped)"
        utf8_offset = error.start
    codec = detect_encoding(raw)
    if codec is None:
        raise DataError(f"{name} is not UTF-8 text (bad byte at position {utf8_offset}) and no other text "
                        "encoding fits it; re-save it as UTF-8.")
    return _decode_or_refuse(raw, codec, name), f"{codec} (detected: the file is not UTF-8)"


def detect_encoding(raw: bytes) -> str | None:
    from charset_normalizer import from_bytes  # imported here: only non-UTF-8 files need it

    matches = list(from_bytes(raw[:2**20]))
    if not matches:
        return None
    least_chaos = min(match.chaos for match in matches)
    for match in matches:
        if match.chaos == least_chaos and PREFERRED_DETECTED in match.could_be_from_charset:
            return PREFERRED_DETECTED
    guess = matches[0].encoding
    return PREFERRED_DETECTED if _reads_better_as_preferred(raw, guess) else guess


def _mixed_script_words(text: str) -> int:
    """Words that hold ASCII letters and letters of another script ('trшs'): a sign of a wrong code page."""
    mixed = 0
    for word in re.findall(r"[^\W\d_]+", text):
        if any(c.isascii() for c in word) and any(not c.isascii() and not unicodedata.name(c, "").startswith("LATIN")
                                                 for c in word):
            mixed += 1
    return mixed


def _reads_better_as_preferred(raw: bytes, guess: str) -> bool:
    """The detector can rank a Cyrillic code page first for a Western export with '€' and 'è' (cp1125 read
    'très' as 'trшs'): take cp1252 when it decodes the file and splits fewer words between two scripts."""
    if guess == PREFERRED_DETECTED:
        return False
    try:
        preferred = raw.decode(PREFERRED_DETECTED)
    except UnicodeDecodeError:
        return False
    guessed = raw.decode(guess, errors="replace")
    return _mixed_script_words(preferred) < _mixed_script_words(guessed)


def _decode_or_refuse(raw: bytes, codec: str, name: str) -> str:
    try:
        return raw.decode(codec)
    except UnicodeDecodeError as error:
        raise DataError(f"{name} is not valid {codec} text either (bad byte at position {error.start}); "
                        "re-save it as UTF-8.") from None


# --- JSON and JSON Lines -------------------------------------------------------------------------------------

def _kind_of(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "a list", dict: "an object"}.get(type(value), "null")


Parsed = tuple[list[dict[str, Any]], str, list[BadLine], list[int] | None]  # rows, shape, bad lines, row lines


def _read_json(text: str, name: str, suffix: str) -> Parsed:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        if text.lstrip().startswith("[") or (suffix == ".json" and not _some_line_is_an_object(text)):
            raise DataError(f"Could not read {name} as JSON: invalid JSON at line {error.lineno} ({error.msg}); "
                            "the file may be cut off.") from None
        return _read_json_lines(text)
    rows, shape, bad = _rows_from_json(value, name)
    if suffix == ".jsonl" and shape == "a single JSON object":
        shape = "JSON Lines"
    return rows, shape, bad, None


def physical_lines(text: str) -> list[str]:
    """Lines as JSON Lines readers see them: split at newlines only. str.splitlines() also splits at U+2028 and
    other separators that a JSON string may hold unescaped, which would break a valid row in two."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _some_line_is_an_object(text: str) -> bool:
    """JSON Lines saved as .json: one of the first lines is a whole JSON object (a pretty-printed object's
    lines never are)."""
    lines = [line for line in physical_lines(text) if line.strip()][:20]
    for line in lines:
        try:
            if isinstance(json.loads(line), dict):
                return len(lines) > 1
        except json.JSONDecodeError:
            continue
    return False


def _read_json_lines(text: str) -> Parsed:
    rows, bad, row_lines = [], [], []
    lines = physical_lines(text)
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            cut = number == len(lines) and not text.endswith("\n")
            where = f"{error.msg} column {error.colno}" if error.msg.endswith(" at") else \
                f"{error.msg} at column {error.colno}"
            bad.append(BadLine(number, f"is not valid JSON ({where}){'; the file may be cut off' if cut else ''}"))
            continue
        if isinstance(value, dict):
            rows.append(value)
            row_lines.append(number)
        else:
            bad.append(BadLine(number, f"holds {_kind_of(value)}, not an object (JSON Lines need one JSON object "
                                       "per line)"))
    return rows, "JSON Lines", bad, row_lines


def _rows_from_json(value: Any, name: str) -> tuple[list[dict[str, Any]], str, list[BadLine]]:
    if isinstance(value, list):
        return _rows_from_list(value, name, "a JSON list of objects")
    if not isinstance(value, dict):
        head = json.dumps(value, ensure_ascii=False)[:20]
        raise DataError(f"{name} must hold one JSON object per line (or a list of objects); "
                        f"it starts with {head!r}.")
    return _rows_from_object(value, name)


def _rows_from_list(items: list[Any], name: str, shape: str) -> tuple[list[dict[str, Any]], str, list[BadLine]]:
    if items and not any(isinstance(item, dict) for item in items):
        raise DataError(f"{name} must be a JSON list of objects (one per row), like "
                        '[{"prompt": ..., "completion": ...}]; found a list of plain values.')
    rows = [item for item in items if isinstance(item, dict)]
    bad = [BadLine(number, f"is {_kind_of(item)}, not an object", "item")
           for number, item in enumerate(items, 1) if not isinstance(item, dict)]
    return rows, shape, bad


def _is_chat_turns(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(turn, dict) and ("role" in turn or "from" in turn) for turn in value)


def _holds_rows(value: Any) -> bool:
    """A list of row objects, or an object of columns: not a chat's turns, not one row's list of values."""
    if isinstance(value, list):
        return any(isinstance(item, dict) for item in value) and not _is_chat_turns(value)
    return isinstance(value, dict) and bool(value) and all(isinstance(v, (list, dict)) for v in value.values())


def _rows_from_object(obj: dict[str, Any], name: str) -> tuple[list[dict[str, Any]], str, list[BadLine]]:
    """The object shapes people write: pandas' orients, rows under a top-level key, or one row."""
    if isinstance(obj.get("columns"), list) and isinstance(obj.get("data"), list) and all(
            isinstance(row, list) for row in obj["data"]):
        return [dict(zip(obj["columns"], row)) for row in obj["data"]], "a pandas 'split' JSON object", []
    by_key = {str(key).lower(): key for key in obj}
    container = next((by_key[k] for k in CONTAINER_KEYS if k in by_key and _holds_rows(obj[by_key[k]])), None)
    if container is None and len(obj) == 1:
        only = next(iter(obj))
        if isinstance(obj[only], list) and obj[only] and all(isinstance(i, dict) for i in obj[only]) \
                and not _is_chat_turns(obj[only]):
            container = only
    if container is not None:
        inner = obj[container]
        rows, shape, bad = (_rows_from_list(inner, name, "a JSON list of objects") if isinstance(inner, list)
                            else _rows_from_object(inner, name))
        return rows, f"{shape} under the top-level key '{container}'", bad
    values = list(obj.values())
    if values and all(isinstance(v, list) for v in values) and len({len(v) for v in values}) == 1 \
            and not any(_is_chat_turns(v) for v in values):
        keys = list(obj)
        return ([{k: obj[k][i] for k in keys} for i in range(len(values[0]))],
                "a JSON object of equal-length columns", [])
    if values and all(isinstance(v, dict) for v in values):
        if all(str(k).isdigit() for k in obj):  # pandas orient='index': row labels outside
            return list(values), "a JSON object of rows by index (pandas orient='index')", []
        labels = list(values[0])
        if labels and all(list(v) == labels for v in values):  # pandas' default orient='columns'
            return ([{column: obj[column][label] for column in obj} for label in labels],
                    "a JSON object of columns by row index (pandas' default to_json)", [])
    return [obj], "a single JSON object", []


# --- CSV / TSV -----------------------------------------------------------------------------------------------

def _records(text: str, delimiter: str) -> csv.reader:
    return csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)


def sniff_delimiter(text: str, suffix: str) -> str:
    """The delimiter that splits the first records into the same number (2 or more) of fields most often."""
    sample = text[:65536]
    order = ("\t",) + tuple(d for d in CSV_DELIMITERS if d != "\t") if suffix == ".tsv" else CSV_DELIMITERS
    best, best_score = order[0], 0
    for delimiter in order:
        try:
            records = [r for _, r in zip(range(20), _records(sample, delimiter)) if any(f.strip() for f in r)]
        except csv.Error:
            continue
        if not records or len(records[0]) < 2:
            continue
        width = len(_without_trailing_empty(records[0]))
        score = sum(len(_without_trailing_empty(r)) == width for r in records)
        if score > best_score:
            best, best_score = delimiter, score
    return best


def _without_trailing_empty(fields: list[str]) -> list[str]:
    while fields and not fields[-1].strip():
        fields = fields[:-1]
    return fields


DELIMITER_NAMES = {",": "commas", ";": "semicolons", "\t": "tabs", "|": "'|'"}


def _read_csv(text: str, name: str, suffix: str) -> Parsed:
    csv.field_size_limit(max(csv.field_size_limit(), IN_MEMORY_LIMIT))  # a long answer is one field
    delimiter = sniff_delimiter(text, suffix)
    reader = _records(text, delimiter)
    header: list[str] | None = None
    rows, bad, row_lines, previous_end = [], [], [], 0
    try:
        for record in reader:
            start, previous_end = previous_end + 1, reader.line_num
            if not any(f.strip() for f in record):
                continue
            if header is None:
                header = _column_names(_without_trailing_empty(record))
                continue
            fields = record if len(record) <= len(header) else (
                record[:len(header)] if not any(f.strip() for f in record[len(header):]) else record)
            if len(fields) != len(header):
                bad.append(BadLine(start, f"has {len(fields)} field(s); the header has {len(header)} "
                                          "(a missing or extra separator, or an unclosed quote)"))
                continue
            rows.append(dict(zip(header, fields)))
            row_lines.append(start)
    except csv.Error as error:
        raise DataError(f"Could not read {name} as CSV: line {reader.line_num}: {error}.") from None
    return rows, f"CSV separated by {DELIMITER_NAMES[delimiter]}", bad, row_lines


def _column_names(header: list[str]) -> list[str]:
    names, seen = [], set()
    for index, raw in enumerate(header, 1):
        base = raw.strip() or f"column_{index}"
        candidate, n = base, 2
        while candidate in seen:
            candidate, n = f"{base}_{n}", n + 1
        seen.add(candidate)
        names.append(candidate)
    return names


# --- the entry point -------------------------------------------------------------------------------------------

def read_text_file(path: Path) -> FileRows:
    """Rows of a JSON, JSON Lines, CSV/TSV or TXT file with what was assumed to read it."""
    suffix = path.suffix.lower()
    kind = TEXT_LOADERS[suffix].upper()
    text, encoding = decode_text(path.read_bytes(), path.name, kind)
    if not text.strip():
        raise DataError(f"Data file {path.name} is empty.")
    if suffix in (".json", ".jsonl"):
        try:
            parsed = _read_json(text, path.name, suffix)
        except RecursionError:  # json's parser recurses once per nesting level
            raise DataError(f"Could not read {path.name} as JSON: it is nested too deeply to be rows of data.") \
                from None
    elif suffix in (".csv", ".tsv"):
        parsed = _read_csv(text, path.name, suffix)
    else:
        numbered = [(n, line) for n, line in enumerate(physical_lines(text), 1) if line.strip()]
        parsed = [{"text": line} for _, line in numbered], "text lines", [], [n for n, _ in numbered]
    rows, shape, bad, row_lines = parsed
    return FileRows(rows, encoding, shape, bad, row_lines)


def read_text_sample(path: Path, max_bytes: int, max_rows: int) -> FileRows:
    """The first rows of a text file, reading at most ``max_bytes`` and parsing at most about ``max_rows`` rows, so a
    preview's work does not grow with the file; the whole file when it is that small. The result's ``sample`` says
    how much was read. A cut JSON list is read item by item; a cut record at the end is left out."""
    size = path.stat().st_size
    if size <= max_bytes:
        return read_text_file(path)
    suffix, kind = path.suffix.lower(), TEXT_LOADERS[path.suffix.lower()].upper()
    with path.open("rb") as handle:
        head = _whole_lines(handle.read(max_bytes), max_rows + 2)
    text, encoding = decode_text(head, path.name, kind)
    read_bytes = len(head)
    if suffix in (".json", ".jsonl") and text.lstrip("\ufeff \t\r\n").startswith("["):
        rows, used = _json_list_items(text, max_rows)
        shape, bad, row_lines = "a JSON list of objects", [], None
        read_bytes = round(len(head) * used / max(len(text), 1))  # the items read, not the whole block
    elif suffix in (".json", ".jsonl"):
        if not _some_line_is_an_object(text):
            return _first_rows_of_document(path, size, max_rows)
        rows, shape, bad, row_lines = _read_json_lines(text)
    elif suffix in (".csv", ".tsv"):
        rows, shape, bad, row_lines = _read_csv(text, path.name, suffix)
        if rows and row_lines:  # a quoted field may go on past the cut: the last record is left out
            rows, bad = rows[:-1], [b for b in bad if b.number < row_lines[-1]]
            row_lines = row_lines[:-1]
    else:
        numbered = [(n, line) for n, line in enumerate(physical_lines(text), 1) if line.strip()]
        rows, shape, bad, row_lines = [{"text": line} for _, line in numbered], "text lines", [], [n for n, _ in numbered]
    if len(rows) > max_rows:
        last = row_lines[max_rows - 1] if row_lines else None
        rows, row_lines = rows[:max_rows], row_lines[:max_rows] if row_lines else row_lines
        bad = [b for b in bad if last is None or b.number <= last]
    return FileRows(rows, encoding, shape, bad, row_lines, Sample(len(rows) + len(bad), read_bytes, size))


def _first_rows_of_document(path: Path, size: int, max_rows: int) -> FileRows:
    """A JSON document holding its rows under a key ({"data": [...]}) cannot be read in part: up to IN_MEMORY_LIMIT
    it is parsed whole (C-speed parsing; only the first rows are kept), past it the preview refuses."""
    if size > IN_MEMORY_LIMIT:
        raise DataError(f"{path.name} is one JSON document of {size / 2**20:.0f} MB, too big to preview; save it as "
                        "JSON Lines (one object per line) to see its first rows. Start reads it as it is.")
    read = read_text_file(path)
    kept = read.rows[:max_rows]
    return FileRows(kept, read.encoding, read.shape, read.bad_lines, None,
                    Sample(len(kept), size, size, exact_rows=read.total) if read.total > len(kept) else None)


def _whole_lines(head: bytes, max_lines: int) -> bytes:
    """``head`` cut after its last complete line, and after ``max_lines`` lines at most (UTF-16/32 newlines are
    wider than one byte: the cut keeps whole code units)."""
    newline = next((("\n".encode(codec), len(bom)) for bom, codec in
                    ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"),
                     (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be")) if head.startswith(bom)),
                   (b"\n", 0))
    mark, start = newline
    end, count, position = -1, 0, start
    while count < max_lines:
        found = head.find(mark, position)
        while found != -1 and (found - start) % len(mark):  # not on a code unit boundary
            found = head.find(mark, found + 1)
        if found == -1:
            break
        end, count, position = found + len(mark), count + 1, found + len(mark)
    return head[:end] if end > 0 else head


def _json_list_items(text: str, max_rows: int) -> tuple[list[dict[str, Any]], int]:
    """The objects at the start of a JSON list that is cut off, read one item at a time, and how many characters
    they took."""
    decoder, rows = json.JSONDecoder(), []
    position = text.index("[") + 1
    while len(rows) < max_rows:
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        try:
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            break  # the cut item, or the list's end
        if isinstance(value, dict):
            rows.append(value)
    return rows, position


def numbers_text(bad: list[BadLine]) -> str:
    numbers = ", ".join(str(b.number) for b in bad[:LISTED_NUMBERS])
    more = f" and {len(bad) - LISTED_NUMBERS} more" if len(bad) > LISTED_NUMBERS else ""
    return f"{bad[0].unit}s {numbers}{more}" if len(bad) > 1 else f"{bad[0].unit} {numbers}"


def _what_skipping_trains(read: FileRows, usable: int | None) -> str:
    """What ticking 'skip malformed rows' leaves, in the preview's own count."""
    readable = len(read.rows)
    if usable is None:
        return f"train on the usable rows among the {readable} readable ones (the preview counts them)"
    if usable == readable:
        return f"train on the {usable} usable rows"
    return (f"train on the {usable} usable rows (of the {readable} readable ones; the other {readable - usable} "
            "lack a field a row needs, and the preview lists them)")


def check_bad_lines(read: FileRows, name: str, skip_bad_rows: bool, usable: int | None = None) -> None:
    """Refuse a file with malformed lines unless the user chose to skip them; refuse it anyway when more than
    half its lines are bad (then it is probably not the format its name says). ``usable``: how many of the
    readable rows a run could train on (rows with missing or empty fields are skipped too), when the caller
    knows the format; the refusal quotes it, the number the preview counts."""
    bad = read.bad_lines
    if not bad:
        return
    refused_anyway = len(bad) * 2 > read.total
    if skip_bad_rows and not refused_anyway:
        return
    listed = "; ".join(str(b) for b in bad[:LISTED_WITH_REASON])
    rest = (f"; also {numbers_text(bad[LISTED_WITH_REASON:])}" if len(bad) > LISTED_WITH_REASON else "")
    what = f"{len(bad)} of {read.total} rows are malformed"
    if refused_anyway:
        advice = "More than half the file is unreadable, so it is refused even with skip malformed rows: fix it."
    else:
        advice = (f"Fix them, or turn on skip malformed rows (data.skip_bad_rows) to "
                  f"{_what_skipping_trains(read, usable)}.")
    raise MalformedRowsError(f"Could not read {name} as {read.shape}: {what}: {listed}{rest}. {advice}",
                             bad, len(read.rows), refused_anyway)
