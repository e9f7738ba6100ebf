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

import math
import random
from dataclasses import dataclass, field
from typing import Any, Iterable

from datasets import Dataset

from finetune.core.config import DataConfig, RunConfig
from finetune.core.data import DataError, UsableCount, column_key, load_source, mapped_rows
from finetune.core.data_files import Sample
from finetune.core.intervals import fewest_right_beyond_chance

BUNDLED_PREFERENCES = "bundled:course_prefs"
FORMAT_COLUMNS = {"paired": ("prompt", "chosen", "rejected"), "unpaired": ("prompt", "completion", "label"),
                  "implicit": ("chosen", "rejected")}
TRUE_LABELS = ("true", "1", "yes", "good", "up", "👍", "desirable")
FALSE_LABELS = ("false", "0", "no", "bad", "down", "👎", "undesirable")
MAX_LISTED_PROBLEMS = 5
# Column names as preference datasets spell them (compared by data.column_key: no case, no separators);
# earlier names win when a file has several.
PREFERENCE_NAMES = {
    "prompt": ("prompt", "question", "query", "instruction", "input", "human", "user"),
    "chosen": ("chosen", "preferred", "better", "winner", "chosen_response", "response_chosen", "accepted"),
    "rejected": ("rejected", "dispreferred", "worse", "loser", "rejected_response", "response_rejected"),
    "completion": ("completion", "response", "answer", "output"),
    "label": ("label", "thumbs", "vote", "kto_label", "desirable"),
}
# Held-out prompts: at least two (one prompt is an anecdote, and its answer decides any "verdict" alone), and at
# least two prompts left to train on, so a set of fewer than four prompts holds nothing out and gets no verdict.
MIN_HELD_OUT_PROMPTS = 2
MIN_PROMPTS_TO_HOLD_OUT = 4
Messages = list[dict[str, str]]
# A pairwise vote as the feedback store keeps it (which of the two answers shown won: 'first', 'second', or a 'tie',
# 'both_bad'), in the reward model's words for (first answer, second answer): the one translation between the two,
# used by the pairs exported for training and by the votes sent to LangSmith.
VOTE_COLUMNS = {"first": ("chosen", "rejected"), "second": ("rejected", "chosen"), "tie": ("tie", "tie"),
                "both_bad": ("both_bad", "both_bad")}


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
    skipped_rows: int = 0      # unusable pairs/thumbs left out (data.skip_bad_rows)
    malformed_rows: int = 0    # lines of the file that could not be read (data.skip_bad_rows)
    sample: Sample | None = None  # read from the file's first rows only (a preview)


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


def preference_renames(columns: Iterable[str]) -> dict[str, str]:
    """Renames that give a file's columns the names the formats read ('Prompt', 'preferred' -> 'prompt',
    'chosen'); none when the exact names are already there, so an exact file reads as it always did."""
    columns = list(columns)
    if any(set(needed) <= set(columns) for needed in FORMAT_COLUMNS.values()):
        return {}
    by_key: dict[str, str] = {}
    for column in columns:
        by_key.setdefault(column_key(column), column)
    renames: dict[str, str] = {}
    for role, names in PREFERENCE_NAMES.items():
        column = next((by_key[n] for n in names if n in by_key and by_key[n] not in renames), None)
        if column is not None and role not in columns:
            renames[column] = role
    return {old: new for old, new in renames.items() if old != new}


def _read_columns(dataset: Dataset, requested: str) -> tuple[Dataset, str, dict[str, str]]:
    """(rows with the renamed columns, format, renames)."""
    renames = preference_renames(dataset.column_names)
    if renames:
        dataset = dataset.rename_columns(renames)
    return dataset, _resolve_format(requested, list(dataset.column_names)), renames


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


def convert_rows(rows: Iterable[dict[str, Any]], fmt: str, lines: list[int] | None = None
                 ) -> tuple[list[dict[str, Any]], list[str]]:
    """(converted rows, one problem message per unusable row, naming it by its 1-based number, and by the line
    of the file it came from where ``lines`` says and that differs: a header, blank or skipped lines)."""
    converter, converted, problems = ROW_CONVERTERS[fmt], [], []
    for number, row in enumerate(rows, start=1):
        try:
            converted.append(converter(row))
        except _RowProblem as problem:
            line = lines[number - 1] if lines and number <= len(lines) else number
            problems.append(f"row {number}{f' (line {line})' if line != number else ''}: {problem}")
    return converted, problems


def _raise_problems(problems: list[str], total: int, where: str, skip_bad_rows: bool = False) -> None:
    """Refuse unusable rows unless the user chose to skip them; more than half unusable is refused anyway:
    then the file is not the preference data it looks like."""
    if not problems:
        return
    over_half = len(problems) * 2 > total
    if skip_bad_rows and not over_half:
        return
    listed = "; ".join(problems[:MAX_LISTED_PROBLEMS])
    more = f"; and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS else ""
    advice = ("More than half are unusable, so they are refused even with skip malformed rows: fix them."
              if over_half else f"Fix or remove them, or turn on skip malformed rows (data.skip_bad_rows) to "
                                f"train on the {total - len(problems)} usable rows.")
    raise PreferenceError(f"{len(problems)} of {total} rows in {where} are not usable preferences: "
                          f"{listed}{more}. {advice}")


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

def prompt_key(prompt: Messages) -> str:
    """The prompt's last user question, lower-cased with its spacing collapsed: the same question asked after
    other turns, or typed again with other capitals, is the same prompt, so it may not sit on both sides."""
    question = next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")
    return " ".join(question.lower().split())


def split_by_prompt(rows: list[dict[str, Any]], fraction: float, seed: int
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train rows, held-out rows) with every row of one prompt on the same side, the held-out prompts drawn
    with ``seed``; no held-out rows when there are too few prompts to spare MIN_HELD_OUT_PROMPTS of them.

    Splitting rows instead would put a prompt's second vote in the held-out set while its first trains, and the
    "held-out" comparison would then ask the model questions it was trained on.
    """
    prompts = sorted({prompt_key(row["prompt"]) for row in rows})
    if fraction <= 0 or len(prompts) < MIN_PROMPTS_TO_HOLD_OUT:
        return rows, []
    held_count = max(MIN_HELD_OUT_PROMPTS, round(fraction * len(prompts)))
    held = set(random.Random(seed).sample(prompts, held_count))
    return ([row for row in rows if prompt_key(row["prompt"]) not in held],
            [row for row in rows if prompt_key(row["prompt"]) in held])


def _drop_trained_prompts(held: list[dict[str, Any]], train: list[dict[str, Any]], notes: list[str]
                          ) -> list[dict[str, Any]]:
    """A source's own validation split may repeat training prompts; those rows are not held out."""
    trained = {prompt_key(row["prompt"]) for row in train}
    kept = [row for row in held if prompt_key(row["prompt"]) not in trained]
    if len(kept) < len(held):
        notes.append(f"{len(held) - len(kept)} validation row(s) dropped: their prompts are also in the training "
                     "split")
    return kept


def _validation_rows(cfg: DataConfig, fmt: str, want: str, validation_raw: Any) -> list[dict[str, Any]]:
    validation_raw, held_format, _ = _read_columns(validation_raw, fmt)
    held_rows, held_problems = convert_rows(validation_raw, held_format)
    _raise_problems(held_problems, len(validation_raw), f"the validation split of '{cfg.source}'",
                    cfg.skip_bad_rows)
    return _reshape(held_rows, held_format, want)


def usable_preference_count(cfg: DataConfig, fmt: str = "auto", want: str = "paired") -> UsableCount:
    """How many readable rows of a file are usable preferences (a refusal for malformed lines quotes it)."""
    def count(rows: list[dict[str, Any]]) -> int:
        try:
            dataset, source_format, _ = _read_columns(mapped_rows(rows, cfg), fmt)
        except (PreferenceError, DataError):
            return 0
        return len(convert_rows(dataset, source_format)[0])
    return count


def load_preferences(cfg: DataConfig, fmt: str = "auto", want: str = "paired", seed: int = 42,
                     sample: bool = False) -> PreferenceData:
    """Load, validate and convert preference data to ``want`` ('paired' or 'unpaired'), with a held-out split
    by prompt (the source's validation split if it has one).

    The split is drawn on the source's rows, before thumbs become pairs or pairs thumbs, so a reward model
    (pairs) and KTO (thumbs) trained on the same file hold out the same prompts.
    """
    raw = load_source(cfg, count_usable=usable_preference_count(cfg, fmt, want), sample=sample)
    validation_raw = raw.validation
    train_raw, source_format, renames = _read_columns(raw.train, fmt)
    train_rows, problems = convert_rows(train_raw, source_format, raw.file.row_lines if raw.file else None)
    _raise_problems(problems, len(train_raw), f"'{cfg.source}'", cfg.skip_bad_rows)
    notes: list[str] = raw.notes()
    if renames:
        notes.append("columns read as: " + ", ".join(f"{old} → {new}" for old, new in renames.items()))
    if problems:
        notes.append(f"{len(problems)} unusable row(s) skipped: " + "; ".join(problems[:MAX_LISTED_PROBLEMS])
                     + (f"; and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS
                        else ""))
    held_rows: list[dict[str, Any]] = []
    if validation_raw is not None and cfg.validation_fraction > 0:
        held_rows = _drop_trained_prompts(_validation_rows(cfg, fmt, want, validation_raw), train_rows, notes)
    elif cfg.validation_fraction > 0:
        train_rows, held_rows = split_by_prompt(train_rows, cfg.validation_fraction, seed)
        held_rows = _reshape(held_rows, source_format, want)
    train_rows = _reshape(train_rows, source_format, want)
    if not train_rows:
        raise PreferenceError(
            f"'{cfg.source}' holds only thumbs, and no prompt has both a good and a bad answer, so there are no "
            "pairs to learn from; train with KTO, which uses thumbs directly, or collect A/B preferences.")
    if source_format == "unpaired" and want == "paired":
        notes.append(f"{len(train_rows)} pair(s) made from thumbs on the same prompt")
    if cfg.max_samples is not None and len(train_rows) > cfg.max_samples:
        train_rows = random.Random(seed).sample(train_rows, cfg.max_samples)
    if cfg.max_eval_samples is not None and len(held_rows) > cfg.max_eval_samples:
        notes.append(f"max held-out pairs: {cfg.max_eval_samples} of the {len(held_rows)} evaluated")
        held_rows = random.Random(seed).sample(held_rows, cfg.max_eval_samples)
    if cfg.validation_fraction > 0 and not held_rows:
        notes.append(f"too few prompts to hold any out (fewer than {MIN_PROMPTS_TO_HOLD_OUT}): no held-out data, "
                     "so no verdict")
    evaluation = Dataset.from_list(held_rows) if held_rows else None
    return PreferenceData(Dataset.from_list(train_rows), evaluation, want, source_format, notes, len(problems),
                          raw.malformed, raw.sample)


def preview_preferences(cfg: DataConfig, fmt: str = "auto", rows: int = 5) -> tuple[str, int, list[dict[str, str]]]:
    """(detected format, number of training rows, first rows flattened to text) for the RLHF tab; of a big file
    its first rows only (a request's work must not grow with the upload)."""
    data = load_preferences(cfg, fmt, want="paired" if fmt != "unpaired" else "unpaired", sample=True)
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


def _question(prompt: Messages) -> str:
    return next(m["content"] for m in reversed(prompt) if m["role"] == "user")


def held_out_prompts(cfg: DataConfig, fmt: str = "auto", seed: int = 42, limit: int | None = None,
                     exclude: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """The last user turn of each distinct held-out prompt, in order, leaving out those whose ``prompt_key`` is
    in ``exclude`` (e.g. what a reward model trained on). Empty when nothing is held out: never the training
    prompts in their place, which would make a "held-out" comparison a memory test."""
    data = load_preferences(cfg, fmt, seed=seed)
    prompts, seen = [], set(exclude)
    for row in data.eval if data.eval is not None else []:
        key = prompt_key(row["prompt"])
        if key not in seen:
            seen.add(key)
            prompts.append(_question(row["prompt"]))
    return prompts[:limit] if limit else prompts


def trained_prompt_keys(cfg: DataConfig, fmt: str = "auto", seed: int = 42) -> set[str]:
    """The prompt keys a run on this data trained on (the same split as the run made)."""
    return {prompt_key(row["prompt"]) for row in load_preferences(cfg, fmt, seed=seed).train}


# --- how much data there is, and what training on it will do --------------------------------------------------

# Passes over the training rows that the form's default number of steps may make. Issue 15: 15 epochs over 8 pairs
# drove DPO's loss to 2e-7 and its answers into repeated phrases, while the bundled preset (30 steps x 4 = 0.8 of
# an epoch over 150 pairs) moves the style without collapse. TRL's own DPO/reward recipes train 1-3 epochs.
MAX_EPOCHS_SMALL_DATA = 3
# Fewer training rows than this and the warning says "memorisation". Below it the run is in the regime measured in
# issue 15 (8 pairs: reward accuracy 1.0 by step 3, i.e. after 1.5 epochs); 64 rows are 16 steps at the preset
# batch of 4 per epoch, the fewest for the curves to show a trend before the data repeats.
MIN_TRAIN_ROWS = 64
# Held-out rows a verdict needs: the fewest n for which a reward model right on 3 of 4 held-out pairs has a 95%
# Wilson interval above 0.5 (n = 16 gives [0.505, 0.90]; n = 12 gives [0.47, 0.91]). tests check it with
# finetune.core.intervals.wilson_interval.
MIN_HELD_OUT_FOR_VERDICT = 16


@dataclass(frozen=True)
class DataSize:
    rows: int            # training rows: pairs, or thumbs for KTO
    prompts: int         # distinct training prompts
    held_rows: int
    held_prompts: int
    unit: str            # 'pairs' or 'thumbs'


def data_size(data: PreferenceData) -> DataSize:
    held = data.eval if data.eval is not None else []
    return DataSize(len(data.train), len({prompt_key(r["prompt"]) for r in data.train}), len(held),
                    len({prompt_key(r["prompt"]) for r in held}), "thumbs" if data.format == "unpaired" else "pairs")


def epochs(rows: int, steps: int, rows_per_step: int) -> float:
    """How many times the training rows are seen in ``steps`` steps of ``rows_per_step`` rows."""
    return steps * rows_per_step / rows if rows else 0.0


def rows_per_step(cfg: RunConfig) -> int:
    """Training rows one optimizer step consumes (GRPO: prompts, each answered num_generations times)."""
    rows = cfg.training.batch_size * cfg.training.gradient_accumulation
    return max(1, rows // cfg.preference.num_generations) if cfg.stage == "grpo" else rows


def default_steps(preset_steps: int, rows: int, rows_per_step: int) -> int:
    """The preset's steps, capped at MAX_EPOCHS_SMALL_DATA passes over small data (rounded down, so the cap is
    never exceeded: 6 pairs at 4 a step get 4 steps, 2.7 passes, not 5 steps and 3.3)."""
    return max(1, min(preset_steps, math.floor(MAX_EPOCHS_SMALL_DATA * rows / max(1, rows_per_step))))


def size_statement(size: DataSize, steps: int, rows_per_step: int) -> str:
    return (f"**{size.rows} {size.unit}** on **{size.prompts} prompts** to train on, **{size.held_rows}** held out on "
            f"**{size.held_prompts}** other prompts; {steps} steps x {rows_per_step} {size.unit} = "
            f"**{epochs(size.rows, steps, rows_per_step):.1f} epochs** over the training {size.unit}.")


def held_out_warning(held: int, unit: str) -> str:
    """What ``held`` held-out rows can tell, computed: the bar a result must clear before its interval leaves
    chance, so a perfect score on a few rows is not contradicted by the warning that came before it."""
    needed, named = fewest_right_beyond_chance(held), unit[:-1] if held == 1 and unit.endswith("s") else unit
    if needed is None:
        bar = "no result at all can be told from chance, so every verdict reads \"cannot tell\""
    else:
        right = f"all {held}" if needed == held else f"{needed} of {held} ({needed / held:.2f}) or more"
        bar = f"only {right} right would be told from chance; anything less reads \"cannot tell\""
    return (f"Only {held} held-out {named}: too few for a dependable verdict: {bar}. From "
            f"{MIN_HELD_OUT_FOR_VERDICT} held-out {unit} on, 3 of 4 right is enough.")


def size_warnings(size: DataSize, steps: int, rows_per_step: int) -> list[str]:
    """What training on this little data will do, in words; empty when the amounts are fine."""
    warnings = []
    if size.rows < MIN_TRAIN_ROWS:
        warnings.append(
            f"Only {size.rows} {size.unit} on {size.prompts} prompts (fewer than {MIN_TRAIN_ROWS}): expect "
            f"memorisation. LoRA has enough weights to fit each of them exactly: the reward model's training "
            f"accuracy reaches 1.0 within a few steps without ranking new answers any better, and DPO/KTO copy the "
            f"chosen answers' wording until answers repeat it. Collect more votes, or treat this run as a "
            f"demonstration.")
    passes = epochs(size.rows, steps, rows_per_step)
    if passes > MAX_EPOCHS_SMALL_DATA:
        warnings.append(f"{steps} steps make {passes:.1f} passes over the same {size.rows} {size.unit} (more than "
                        f"{MAX_EPOCHS_SMALL_DATA}): each further pass fits them more closely and new prompts less.")
    if size.held_rows == 0:
        warnings.append("No held-out data: no verdict. Every prompt is trained on, so nothing can show whether the "
                        "result generalises.")
    elif size.held_rows < MIN_HELD_OUT_FOR_VERDICT:
        warnings.append(held_out_warning(size.held_rows, size.unit))
    return warnings
