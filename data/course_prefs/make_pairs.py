"""Build the bundled preference set from data/course_qa: 150 training pairs and the 24 held-out prompts.

    python data/course_prefs/make_pairs.py        # rewrites train.jsonl and validation.jsonl next to this file

Each row is ``{"prompt", "chosen", "rejected", "kind"}``. ``chosen`` is the course's own answer (the
"🧪 Lab note: … / Rule of thumb: …" shape); ``rejected`` is a plausible but worse answer of one of three kinds,
so a reward model has something real to learn and a preference-tuned model a direction to move in:

- ``bare``: the same facts without the summary line or the rule of thumb (correct, but less useful);
- ``vague``: a hedging non-answer that names the topic but says nothing concrete;
- ``off_topic``: a confident answer to a different question of the course.

Deterministic (fixed seed), so re-running it reproduces the committed files byte for byte.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parent / "course_qa"
TRAIN_PAIRS = 150
SEED = 7

VAGUE = (
    "Good question! {topic} depends on a lot of things, like your model, your data and your hardware. "
    "There is no single right answer, so it is best to experiment and see what works for you.",
    "It varies. {topic} is one of those things people disagree about, and the details change from project "
    "to project. Have a look at the documentation and try a few settings.",
    "{topic} can matter or not matter, depending on the situation. In general, just use the defaults and "
    "adjust later if something goes wrong.",
    "That is a complicated topic. {topic} involves many trade-offs, and it is hard to say anything useful "
    "without knowing much more about what you are doing.",
)


def parts(answer: str) -> tuple[str, str, str]:
    """(summary, explanation, rule) of a course answer."""
    summary, explanation, rule = answer.split("\n")
    return (summary.removeprefix("🧪 Lab note: ").strip(), explanation.strip(),
            rule.removeprefix("Rule of thumb: ").strip())


def topic(question: str) -> str:
    """A short noun phrase for the vague answers: the question without its question words."""
    text = re.sub(r"^(what|why|how|when|which|should|can|does|do|is|are|name|explain[^:]*:)\s+", "",
                  question.strip().rstrip("?.!"), flags=re.IGNORECASE)
    text = re.sub(r"^(is|are|does|do|i|the|a|an)\s+", "", text, flags=re.IGNORECASE)
    return "This" if len(text) > 60 or not text else text[0].upper() + text[1:]


def rejected_answer(row: dict, kind: str, others: list[dict], rng: random.Random) -> str:
    summary, explanation, _ = parts(row["completion"])
    if kind == "bare":
        return explanation
    if kind == "vague":
        return rng.choice(VAGUE).format(topic=topic(row["prompt"]))
    other = rng.choice([o for o in others if o["prompt"] != row["prompt"]])
    other_summary, other_explanation, _ = parts(other["completion"])
    return f"{other_summary} {other_explanation}"


def make_pairs(rows: list[dict], others: list[dict], rng: random.Random) -> list[dict]:
    kinds = ["bare", "vague", "off_topic"]
    pairs = []
    for i, row in enumerate(rows):
        kind = kinds[i % len(kinds)]
        pairs.append({"prompt": row["prompt"], "chosen": row["completion"],
                      "rejected": rejected_answer(row, kind, others, rng), "kind": kind})
    return pairs


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    rng = random.Random(SEED)
    train, validation = read(SOURCE / "train.jsonl"), read(SOURCE / "validation.jsonl")
    chosen_rows = rng.sample(train, TRAIN_PAIRS)
    write(HERE / "train.jsonl", make_pairs(chosen_rows, train, rng))
    write(HERE / "validation.jsonl", make_pairs(validation, train + validation, rng))
    print(f"wrote {TRAIN_PAIRS} training pairs and {len(validation)} held-out pairs to {HERE}")


if __name__ == "__main__":
    main()
