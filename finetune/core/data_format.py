"""What a table's columns mean and how a row becomes chat messages. Every accepted format becomes TRL's
conversational prompt/completion shape::

    {"prompt": [{"role": "user", "content": ...}], "completion": [{"role": "assistant", "content": ...}]}

so that TRL's completion-only loss trains on the assistant's answer alone (SmolLM2's chat template has no
``{% generation %}`` markers, so ``assistant_only_loss`` is not available). Multi-turn conversations keep the
earlier turns in the prompt and train on the last assistant turn. Plain ``text`` rows stay plain text
(language-model loss on every token). Column names are matched as public instruction datasets spell them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from datasets import Dataset

from finetune.core.data_files import DataError

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


def apply_reading(dataset: Dataset, reading: ColumnReading) -> Dataset:
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
