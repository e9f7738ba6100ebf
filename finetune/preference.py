"""Preference data for the RLHF stages: formats, conversions, validation and the bundled set.

Accepted shapes (detected from the columns, or named with ``preference.format``):

- ``paired``: ``prompt`` / ``chosen`` / ``rejected``, as text or as chat messages (the feedback store's
  pair export: ``{"prompt": [messages], "chosen": [assistant], "rejected": [assistant]}``);
- ``implicit``: ``chosen`` / ``rejected`` only, two whole conversations (or texts) that share their opening;
  the shared part is the prompt;
- ``unpaired``: ``prompt`` / ``completion`` / ``label`` thumbs (the feedback store's thumbs export), KTO's format.

Every row becomes TRL's conversational form, ``{"prompt": [messages], "chosen": [assistant], "rejected":
[assistant]}`` for the reward model and DPO, ``{"prompt", "completion", "label"}`` for KTO. Thumbs become pairs
where one prompt has both a good and a bad answer, and pairs become two thumbs each.

A row that cannot be a preference (a side missing or empty, chosen identical to rejected) is an error that
names the row: training on half-broken preferences teaches the wrong thing silently.

    data = load_preferences(DataConfig(source="bundled:course_prefs"), want="paired")
    data.train[0]   # {"prompt": [{"role": "user", ...}], "chosen": [...], "rejected": [...]}
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from datasets import Dataset

from finetune.config import DataConfig
from finetune.data import DataError, load_raw

BUNDLED_PREFERENCES = "bundled:course_prefs"
FORMAT_COLUMNS = {"paired": ("prompt", "chosen", "rejected"), "unpaired": ("prompt", "completion", "label"),
                  "implicit": ("chosen", "rejected")}
TRUE_LABELS = ("true", "1", "yes", "good", "up", "👍", "desirable")
FALSE_LABELS = ("false", "0", "no", "bad", "down", "👎", "undesirable")
MAX_LISTED_PROBLEMS = 5
Messages = list[dict[str, str]]


class PreferenceError(DataError):
    """Preference data that cannot be used; the message names the rows and says what is wrong."""


class _RowProblem(ValueError):
    pass


@dataclass
class PreferenceData:
    train: Dataset
    eval: Dataset | None
    format: str            # the shape of the rows now: 'paired' or 'unpaired'
    source_format: str     # the shape the source had: 'paired', 'implicit' or 'unpaired'
    notes: list[str] = field(default_factory=list)


# --- format detection ----------------------------------------------------------------------------------------

def detect_preference_format(columns: Iterable[str]) -> str:
    present = set(columns)
    for name, needed in FORMAT_COLUMNS.items():  # paired before implicit: both have chosen/rejected
        if set(needed) <= present:
            return name
    raise PreferenceError(
        f"Not preference data: found columns {', '.join(sorted(present)) or 'none'}. Expected prompt/chosen/"
        "rejected (pairs), chosen/rejected (conversations sharing their prompt) or prompt/completion/label "
        "(thumbs). Use the column mapping to rename yours.")


def _resolve_format(requested: str, columns: list[str]) -> str:
    if requested in (None, "", "auto"):
        return detect_preference_format(columns)
    missing = [c for c in FORMAT_COLUMNS[requested] if c not in columns]
    if missing:
        raise PreferenceError(f"Format '{requested}' needs the column(s) {', '.join(missing)}; "
                              f"found: {', '.join(columns)}.")
    return requested


# --- one row ---------------------------------------------------------------------------------------------------

def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def _messages(value: Any, default_role: str, name: str) -> Messages:
    """Text or a list of {'role', 'content'} turns as chat messages; _RowProblem names what is wrong."""
    if value is None or (isinstance(value, (str, list)) and not value) or (
            isinstance(value, str) and not value.strip()):
        raise _RowProblem(f"'{name}' is missing or empty")
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise _RowProblem(f"'{name}' must be text or a list of chat messages, got {type(value).__name__}")
    messages = []
    for turn in value:
        if not isinstance(turn, dict) or turn.get("role") not in ("system", "user", "assistant"):
            raise _RowProblem(f"'{name}' has a turn without a system/user/assistant role")
        content = _text(turn.get("content"))
        if content is None:
            raise _RowProblem(f"'{name}' has an empty {turn['role']} turn")
        messages.append({"role": turn["role"], "content": content})
    return messages


def _strip_prompt(prompt: Messages, answer: Messages) -> Messages:
    """Some exports repeat the prompt turns inside chosen/rejected; keep only what follows them."""
    return answer[len(prompt):] if len(answer) > len(prompt) and answer[:len(prompt)] == prompt else answer


def _check_answer(answer: Messages, name: str) -> Messages:
    if answer[-1]["role"] != "assistant":
        raise _RowProblem(f"'{name}' must end with an assistant answer")
    return answer


def _check_prompt(prompt: Messages) -> Messages:
    if not any(m["role"] == "user" for m in prompt):
        raise _RowProblem("the prompt has no user turn")
    return prompt


def _check_distinct(chosen: Messages, rejected: Messages) -> None:
    if [m["content"].strip() for m in chosen] == [m["content"].strip() for m in rejected]:
        raise _RowProblem("chosen and rejected are identical, so the pair prefers nothing")


def _paired_row(row: dict[str, Any]) -> dict[str, Messages]:
    prompt = _check_prompt(_messages(row.get("prompt"), "user", "prompt"))
    chosen = _check_answer(_strip_prompt(prompt, _messages(row.get("chosen"), "assistant", "chosen")), "chosen")
    rejected = _check_answer(_strip_prompt(prompt, _messages(row.get("rejected"), "assistant", "rejected")),
                             "rejected")
    _check_distinct(chosen, rejected)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _shared_text_prefix(a: str, b: str) -> str:
    """The common start of two texts, cut back to the last 'Assistant:' marker (HH-RLHF style) if there is one."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    prefix = a[:n]
    marker = prefix.rfind("Assistant:")
    return prefix[:marker + len("Assistant:")] if marker >= 0 else prefix


def _implicit_row(row: dict[str, Any]) -> dict[str, Messages]:
    chosen_raw, rejected_raw = row.get("chosen"), row.get("rejected")
    if isinstance(chosen_raw, str) and isinstance(rejected_raw, str):
        prompt_text = _shared_text_prefix(chosen_raw, rejected_raw)
        if not prompt_text.strip():
            raise _RowProblem("chosen and rejected share no opening text, so there is no prompt")
        return _paired_row({"prompt": prompt_text, "chosen": chosen_raw[len(prompt_text):].strip(),
                            "rejected": rejected_raw[len(prompt_text):].strip()})
    chosen = _messages(chosen_raw, "assistant", "chosen")
    rejected = _messages(rejected_raw, "assistant", "rejected")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == len(chosen) or shared == len(rejected):
        raise _RowProblem("chosen and rejected are identical, so the pair prefers nothing")
    if shared == 0:
        raise _RowProblem("chosen and rejected share no opening turns, so there is no prompt")
    return _paired_row({"prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]})


def parse_label(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower() if value is not None else ""
    if text in TRUE_LABELS:
        return True
    if text in FALSE_LABELS:
        return False
    raise _RowProblem(f"'label' must be true/false (or 1/0, good/bad, up/down), got {value!r}")


def _unpaired_row(row: dict[str, Any]) -> dict[str, Any]:
    prompt = _check_prompt(_messages(row.get("prompt"), "user", "prompt"))
    completion = _check_answer(_strip_prompt(prompt, _messages(row.get("completion"), "assistant", "completion")),
                               "completion")
    return {"prompt": prompt, "completion": completion, "label": parse_label(row.get("label"))}


ROW_CONVERTERS = {"paired": _paired_row, "implicit": _implicit_row, "unpaired": _unpaired_row}


def convert_rows(rows: Iterable[dict[str, Any]], fmt: str) -> tuple[list[dict[str, Any]], list[str]]:
    """(converted rows, one problem message per unusable row, naming it by its 1-based number)."""
    converter, converted, problems = ROW_CONVERTERS[fmt], [], []
    for number, row in enumerate(rows, start=1):
        try:
            converted.append(converter(row))
        except _RowProblem as problem:
            problems.append(f"row {number}: {problem}")
    return converted, problems


def _raise_problems(problems: list[str], total: int, where: str) -> None:
    if not problems:
        return
    listed = "; ".join(problems[:MAX_LISTED_PROBLEMS])
    more = f"; and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS else ""
    raise PreferenceError(f"{len(problems)} of {total} rows in {where} are not usable preferences: "
                          f"{listed}{more}. Fix or remove them.")


# --- conversions between pairs and thumbs --------------------------------------------------------------------

def pairs_to_thumbs(pairs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each pair gives a thumbs-up for the chosen answer and a thumbs-down for the rejected one."""
    thumbs = []
    for pair in pairs:
        thumbs.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
        thumbs.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    return thumbs


def thumbs_to_pairs(thumbs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pair good and bad answers to the same prompt (each answer used once, in order of appearance)."""
    by_prompt: dict[str, dict[str, Any]] = {}
    for thumb in thumbs:
        key = repr(thumb["prompt"])
        group = by_prompt.setdefault(key, {"prompt": thumb["prompt"], True: [], False: []})
        group[thumb["label"]].append(thumb["completion"])
    pairs = []
    for group in by_prompt.values():
        for good, bad in zip(group[True], group[False]):
            if [m["content"] for m in good] != [m["content"] for m in bad]:
                pairs.append({"prompt": group["prompt"], "chosen": good, "rejected": bad})
    return pairs


def _reshape(rows: list[dict[str, Any]], source_format: str, want: str) -> list[dict[str, Any]]:
    have = "unpaired" if source_format == "unpaired" else "paired"
    if want == have:
        return rows
    return pairs_to_thumbs(rows) if want == "unpaired" else thumbs_to_pairs(rows)


# --- the pipeline the trainers and the UI use ----------------------------------------------------------------

def load_preferences(cfg: DataConfig, fmt: str = "auto", want: str = "paired", seed: int = 42) -> PreferenceData:
    """Load, validate and convert preference data to ``want`` ('paired' or 'unpaired'), with a held-out split."""
    train_raw, validation_raw = load_raw(cfg)
    source_format = _resolve_format(fmt, list(train_raw.column_names))
    train_rows, problems = convert_rows(train_raw, source_format)
    _raise_problems(problems, len(train_raw), f"'{cfg.source}'")
    notes = []
    train_rows = _reshape(train_rows, source_format, want)
    if not train_rows:
        raise PreferenceError(
            f"'{cfg.source}' holds only thumbs, and no prompt has both a good and a bad answer, so there are no "
            "pairs to learn from; train with KTO, which uses thumbs directly, or collect A/B preferences.")
    if source_format == "unpaired" and want == "paired":
        notes.append(f"{len(train_rows)} pair(s) made from thumbs on the same prompt")
    train = Dataset.from_list(train_rows)
    if cfg.max_samples is not None and len(train) > cfg.max_samples:
        train = train.shuffle(seed=seed).select(range(cfg.max_samples))
    evaluation = None
    if validation_raw is not None and cfg.validation_fraction > 0:
        held_format = _resolve_format(fmt, list(validation_raw.column_names))
        held_rows, held_problems = convert_rows(validation_raw, held_format)
        _raise_problems(held_problems, len(validation_raw), f"the validation split of '{cfg.source}'")
        held_rows = _reshape(held_rows, held_format, want)
        evaluation = Dataset.from_list(held_rows) if held_rows else None
    elif cfg.validation_fraction > 0 and len(train) >= 10:
        parts = train.train_test_split(test_size=cfg.validation_fraction, seed=seed)
        train, evaluation = parts["train"], parts["test"]
    elif cfg.validation_fraction > 0:
        notes.append("too few rows to hold out a validation split; held-out metrics are off")
    return PreferenceData(train, evaluation, want, source_format, notes)


def preview_preferences(cfg: DataConfig, fmt: str = "auto", rows: int = 5) -> tuple[str, int, list[dict[str, str]]]:
    """(detected format, number of training rows, first rows flattened to text) for the RLHF tab."""
    data = load_preferences(cfg, fmt, want="paired" if fmt != "unpaired" else "unpaired")
    table = []
    for row in data.train.select(range(min(rows, len(data.train)))):
        flat = {"prompt": _flatten(row["prompt"])}
        if "chosen" in row:
            flat.update(chosen=_flatten(row["chosen"]), rejected=_flatten(row["rejected"]))
        else:
            flat.update(completion=_flatten(row["completion"]), label="👍" if row["label"] else "👎")
        table.append(flat)
    return data.source_format, len(data.train), table


def _flatten(messages: Messages) -> str:
    return "\n".join(m["content"] for m in messages)


def held_out_prompts(cfg: DataConfig, limit: int = 8) -> list[str]:
    """User turns of held-out preference rows (the last user message of each prompt)."""
    data = load_preferences(cfg)
    rows = data.eval if data.eval is not None else data.train
    prompts = []
    for row in rows.select(range(min(limit, len(rows)))):
        prompts.append(next(m["content"] for m in reversed(row["prompt"]) if m["role"] == "user"))
    return prompts


# --- the feedback store (built by finetune/feedback.py) --------------------------------------------------------

def feedback_available() -> bool:
    return importlib.util.find_spec("finetune.feedback") is not None


def export_feedback(store_path: str | Path, out_dir: str | Path, kind: str = "pairs") -> Path:
    """Export the collected feedback ('pairs' or 'thumbs') to a JSONL file in ``out_dir`` and return its path."""
    if not feedback_available():
        raise PreferenceError("Collected feedback is not available: this version has no feedback store "
                              "(finetune/feedback.py). Use the bundled preference set or upload a file.")
    from finetune.feedback import FeedbackStore  # imported lazily: it is optional for the RLHF stages

    store_path = Path(store_path)
    if not store_path.is_file():
        raise PreferenceError(f"No feedback collected yet ({store_path} does not exist): chat in the Chat tab and "
                              "rate answers first.")
    out = Path(out_dir) / f"feedback-{kind}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    store = FeedbackStore(store_path)
    written = (store.export_pairs if kind == "pairs" else store.export_thumbs)(out)
    if not written:
        raise PreferenceError(f"The feedback store has no {'A/B preferences' if kind == 'pairs' else 'thumbs'} "
                              "yet: rate some answers in the Chat tab first.")
    return out
