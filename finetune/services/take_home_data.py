"""Show the code, the data cells: the run's rows embedded in the notebook (or in a file beside it), a Hub dataset
loaded and converted in plain lines as LoRA Lab converts it, and the held-out split. The other cells:
finetune/services/take_home_cells.py."""

from __future__ import annotations

import json
from dataclasses import dataclass

from finetune.core.config import RunConfig

EMBED_LIMIT = 32 * 1024  # rows up to this many bytes are embedded in the notebook; more go in a file beside it


@dataclass
class Cell:
    kind: str  # "markdown" or "code"
    text: str


@dataclass
class RunData:
    """The run's rows as LoRA Lab converted them, before the split; None for a Hub dataset (loaded by the code).
    ``presplit``: preference rows, already split by prompt (``rows`` trains, ``validation`` is held out)."""
    rows: list[dict] | None
    validation: list[dict] | None
    format: str
    presplit: bool = False


# --- rows in a cell -------------------------------------------------------------------------------------------

def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def embeddable(text: str) -> bool:
    """Small enough for a notebook cell, and safe inside a raw triple-quoted string."""
    return len(text.encode("utf-8")) <= EMBED_LIMIT and "'''" not in text and not text.rstrip("\n").endswith("\\")


# --- data -------------------------------------------------------------------------------------------------------

def _rows_code(variable: str, text: str, file_name: str, files: dict[str, str]) -> str:
    """Code that builds a Dataset from rows: embedded when small, else read from ``file_name`` beside the notebook
    (recorded in ``files``, which the writer saves)."""
    if embeddable(text):
        return (f"{variable} = Dataset.from_list([json.loads(line) for line in r'''\n{text}'''.strip().splitlines()])")
    files[file_name] = text
    return (f"with open({file_name!r}, encoding=\"utf-8\") as rows:  # upload it beside this notebook\n"
            f"    {variable} = Dataset.from_list([json.loads(line) for line in rows])")


def data_cells(cfg: RunConfig, run_name: str, data: RunData, files: dict[str, str]) -> list[Cell]:
    if data.rows is None:
        return hub_data_cells(cfg)
    shape = {"text": "plain `text` rows (the loss covers every token)",
             "paired": "TRL's prompt/chosen/rejected pairs", "unpaired": "TRL's prompt/completion/label thumbs"}.get(
        data.format, "TRL's conversational prompt/completion shape: the loss covers the assistant's answer only")
    code = "import json\n\nfrom datasets import Dataset\n\n" + _rows_code(
        "all_rows", jsonl(data.rows), f"{run_name}-rows.jsonl", files)
    if data.validation is not None:
        code += "\n" + _rows_code("validation_rows", jsonl(data.validation), f"{run_name}-validation-rows.jsonl",
                                  files)
    code += "\nprint(len(all_rows), \"rows\")"
    rows_file = f"{run_name}-rows.jsonl"
    where = f"in `{rows_file}` (upload it beside this notebook)" if rows_file in files else "embedded below"
    counted = f"**{len(data.rows)}** usable rows" if not data.presplit else (
        f"**{len(data.rows)}** training rows and **{len(data.validation or [])}** held-out rows")
    return [Cell("markdown", f"## Your data\n\nThe {counted} of `{cfg.data.source}`, read as '{data.format}' and "
                             f"converted to {shape}; they are {where}."), Cell("code", code)]


def hub_data_cells(cfg: RunConfig) -> list[Cell]:
    """A Hub dataset, loaded and converted in plain lines (the common column sets; LoRA Lab also recognises many
    other column names, which this leaves to ``COLUMN_MAPPING``)."""
    config = f", {cfg.data.hub_config!r}" if cfg.data.hub_config else ""
    mapping = f"\nraw = raw.rename_columns({cfg.data.column_mapping!r})" if cfg.data.column_mapping else ""
    code = (f"from datasets import load_dataset\n\nraw = load_dataset({cfg.data.source!r}{config}, "
            f"split={cfg.data.split!r}){mapping}\n\n\n{HUB_CONVERTER}\n\n"
            "if \"text\" in raw.column_names and \"prompt\" not in raw.column_names:\n"
            "    all_rows = raw  # plain text: the loss covers every token\nelse:\n"
            "    all_rows = raw.map(to_prompt_completion, remove_columns=raw.column_names)\n"
            "    all_rows = all_rows.filter(lambda row: row[\"prompt\"] is not None)  # rows with an empty field\n"
            "print(len(all_rows), \"rows\")")
    return [Cell("markdown", f"## Your data\n\n`{cfg.data.source}` from the Hugging Face Hub, converted to TRL's "
                             "conversational prompt/completion shape (the loss covers the assistant's answer only). "
                             "LoRA Lab recognises more column names than this cell does; rename yours if it "
                             "fails."), Cell("code", code)]


# The column sets LoRA Lab reads (finetune/core/data_format.py), converted as it converts them; tests/test_take_home.py
# checks this function against LoRA Lab's own conversion, row by row.
HUB_CONVERTER = '''ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
         "bot": "assistant", "model": "assistant", "ai": "assistant", "system": "system"}


def text(value):
    value = None if value is None else str(value)
    return value if value and value.strip() else None


def to_prompt_completion(row):
    """A row as TRL's conversational prompt/completion: the loss covers the last answer only (None: unusable)."""
    turns = row.get("messages") or row.get("conversations")
    if turns:
        messages = [{"role": ROLES.get(str(turn.get("role", turn.get("from"))).lower()),
                     "content": text(turn.get("content", turn.get("value")))} for turn in turns]
    elif row.get("instruction") is not None:
        instruction, extra = text(row.get("instruction")), text(row.get("input"))
        prompt = f"{instruction}\\n\\n{extra}" if instruction and extra else instruction
        messages = [{"role": "user", "content": prompt},
                    {"role": "assistant", "content": text(row.get("output"))}]
    else:
        answer = next((row[k] for k in ("completion", "response", "answer") if k in row), None)
        messages = [{"role": "user", "content": text(row.get("prompt", row.get("question")))},
                    {"role": "assistant", "content": text(answer)}]
    if text(row.get("system")) and messages and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": row["system"]})
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    if any(m["role"] is None or m["content"] is None for m in messages) or last <= 0 \\
            or not any(m["role"] == "user" for m in messages[:last]):
        return {"prompt": None, "completion": None}
    return {"prompt": messages[:last], "completion": [messages[last]]}'''


def split_cells(cfg: RunConfig, data: RunData) -> list[Cell]:
    if data.presplit:
        return [Cell("markdown", "## Held-out rows\n\nLoRA Lab held rows out by prompt (no held-out prompt is trained "
                                 "on, not even with another answer); this keeps its split as it is. Rows longer than "
                                 "MAX_LENGTH tokens are truncated by the trainer."),
                Cell("code", "train_rows = all_rows\nheld_out = validation_rows" if data.validation is not None
                     else "train_rows, held_out = all_rows, None  # too few prompts to hold any out")]
    d, seed = cfg.data, "SEED"
    lines = ["train_rows, held_out = all_rows, None"]
    if d.max_samples is not None:
        lines.append(f"if len(train_rows) > {d.max_samples}:  # max samples\n"
                     f"    train_rows = train_rows.shuffle(seed={seed}).select(range({d.max_samples}))")
    if data.validation is not None:
        lines.append("held_out = validation_rows  # the source's own validation split")
        words = "the source's own validation split"
    elif d.validation_fraction > 0:
        lines.append(f"if len(train_rows) >= 10:  # fewer rows leave nothing worth holding out\n"
                     f"    parts = train_rows.train_test_split(test_size={d.validation_fraction}, seed={seed})\n"
                     "    train_rows, held_out = parts[\"train\"], parts[\"test\"]")
        words = f"{d.validation_fraction:.0%} of the rows, picked by the seed"
    else:
        words = "none: your run's validation fraction is 0"
    if d.max_eval_samples is not None and (data.validation is not None or d.validation_fraction > 0):
        lines.append(f"if held_out is not None and len(held_out) > {d.max_eval_samples}:  # max held-out rows\n"
                     f"    held_out = held_out.shuffle(seed={seed}).select(range({d.max_eval_samples}))")
    lines.append(TOKEN_COUNT)
    lines.append("print(len(train_rows), \"training rows,\", 0 if held_out is None else len(held_out), "
                 "\"held out\")")
    return [Cell("markdown", "## Held-out rows, and rows that are too long\n\nThe model never trains on the held-out "
                             f"rows ({words}); their loss says whether it learned the task or only your training "
                             "rows. Rows longer than MAX_LENGTH tokens are dropped rather than cut, so no answer "
                             "is ever truncated."), Cell("code", "\n".join(lines))]


TOKEN_COUNT = (
    "\n\ndef token_count(row):\n    if \"text\" in row:\n        return len(tokenizer(row[\"text\"])[\"input_ids\"])\n"
    "    ids = tokenizer.apply_chat_template(row[\"prompt\"] + row[\"completion\"], tokenize=True)\n"
    "    return len(ids[\"input_ids\"] if hasattr(ids, \"keys\") else ids)\n\n\n"
    "train_rows = train_rows.filter(lambda row: token_count(row) <= MAX_LENGTH)\nif held_out is not None:\n"
    "    held_out = held_out.filter(lambda row: token_count(row) <= MAX_LENGTH)\n"
    "    held_out = held_out if len(held_out) else None")
