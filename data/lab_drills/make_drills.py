"""Build the bundled GRPO task: short drills about the course's own numbers (compare, copy, add, subtract), each with its reference
answer, so rule rewards (finetune/core/rewards.py) can check an answer instead of a reward model judging it.

    python data/lab_drills/make_drills.py        # rewrites train.jsonl and validation.jsonl next to this file

Each row is ``{"prompt", "answer", "kind"}``: ``answer`` is the number as text, ``kind`` the drill's template.
No held-out question (validation.jsonl) is asked in training, so a rise in held-out accuracy is arithmetic carried
over, not a remembered question. Deterministic (fixed seed): re-running
it reproduces the committed files byte for byte.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 11
TRAIN_ROWS, VALIDATION_ROWS = 240, 40
ASK = " Answer with the number only."

# (kind, question template, answer) over two small numbers a and b. Small on purpose: the embedded 135M model
# answers some of them right before training (a group of sampled answers then has right and wrong ones, which is
# what GRPO learns from), and few enough that the rise is visible after a short CPU run.
DRILLS = (
    ("larger", "Lab drill: run A used LoRA rank {a}, run B used rank {b}. Which rank is larger?",
     lambda a, b: max(a, b)),
    ("rank", "Lab drill: an adapter has rank {a} and alpha {d}. What is its rank?", lambda a, b: a),
    ("alpha", "Lab drill: an adapter has rank {a} and alpha {d}. What is its alpha?", lambda a, b: 2 * a),
    ("steps", "Lab drill: a run does {a} steps, then {b} more. How many steps is that in all?",
     lambda a, b: a + b),
    ("left", "Lab drill: a run of {c} steps has done {a}. How many steps are left?", lambda a, b: b),
    ("smaller", "Lab drill: one run took {a} minutes, another took {b}. How many minutes did the faster one take?",
     lambda a, b: min(a, b)),
)


def drill(rng: random.Random, kind_index: int) -> dict[str, str]:
    kind, template, answer = DRILLS[kind_index]
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    while kind in ("larger", "smaller") and a == b:
        b = rng.randint(1, 9)
    question = template.format(a=a, b=b, c=a + b, d=2 * a)
    return {"prompt": question + ASK, "answer": str(answer(a, b)), "kind": kind}


def build() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Distinct questions, the held-out ones first (every template in turn), then training questions none of which
    is a held-out one."""
    rng = random.Random(SEED)
    held: list[dict[str, str]] = []
    train: list[dict[str, str]] = []
    asked: set[str] = set()
    while len(held) < VALIDATION_ROWS or len(train) < TRAIN_ROWS:
        holding = len(held) < VALIDATION_ROWS
        row = drill(rng, len(held) % len(DRILLS) if holding else rng.randrange(len(DRILLS)))
        if row["prompt"] not in asked:
            asked.add(row["prompt"])
            (held if holding else train).append(row)
    return train, held


def write(rows: list[dict[str, str]], path: Path) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


if __name__ == "__main__":
    train_rows, held_rows = build()
    write(train_rows, HERE / "train.jsonl")
    write(held_rows, HERE / "validation.jsonl")
    print(f"{len(train_rows)} training drills, {len(held_rows)} held-out drills")
