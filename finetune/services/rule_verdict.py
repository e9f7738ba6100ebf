"""The before/after verdict of a rule-rewarded GRPO run, from its held-out answers (``held_out_answers.json``,
written by the training child: greedy answers to prompts it never trained on, at the start and at the end).

- **Accuracy**: the share of held-out prompts the first answer-checking rule (match or numeric) passes, before
  and after, each with a 95% Wilson interval, and the change with a 95% paired-bootstrap interval (the same
  prompts before and after, resampled together).
- **Mean reward**: every term times its weight, before and after, the change with its paired interval.
- A verdict only where an interval clears 0; "reward rose but held-out accuracy did not" is named as possible
  reward hacking, with the answers that scored high but were wrong.

    verdict = held_out_verdict(Path("runs/grpo-drills"))
    print(verdict.text())
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.core.run_folder import HELD_OUT_ANSWERS
from finetune.services.evaluate import paired_difference_interval, wilson_interval

HACKING_EXAMPLES = 3


@dataclass(frozen=True)
class Measured:
    """One quantity before and after on the same prompts, with the paired interval of the change."""

    before: float
    after: float
    low: float
    high: float

    @property
    def change(self) -> float:
        return self.after - self.before

    def direction(self) -> str:
        return "rose" if self.low > 0 else "fell" if self.high < 0 else "cannot tell"


@dataclass
class HeldOutVerdict:
    prompts: int
    reward: Measured
    accuracy: Measured | None            # None: no rule checks the answer against a reference
    accuracy_term: str | None
    accuracy_bounds: dict[str, tuple[float, float]] = field(default_factory=dict)  # Wilson, before and after
    suspicious: list[dict[str, Any]] = field(default_factory=list)  # high-scoring wrong answers after training

    @property
    def reward_hacking(self) -> bool:
        """The reward rose beyond chance while held-out accuracy did not."""
        return self.accuracy is not None and self.reward.direction() == "rose" and self.accuracy.direction() != "rose"

    def text(self) -> str:
        lines = [f"**Held-out check** on {self.prompts} prompts the run never trained on (greedy answers, before "
                 "and after training):"]
        if self.accuracy is not None:
            a, (b_low, b_high), (a_low, a_high) = (self.accuracy, self.accuracy_bounds["before"],
                                                   self.accuracy_bounds["after"])
            lines.append(f"- accuracy ({self.accuracy_term}): {a.before:.0%} (95% CI {b_low:.0%}-{b_high:.0%}) -> "
                         f"{a.after:.0%} (95% CI {a_low:.0%}-{a_high:.0%}); change {a.change:+.0%}, 95% paired "
                         f"interval {a.low:+.0%} to {a.high:+.0%} -> **{_said(a.direction())}**")
        r = self.reward
        lines.append(f"- mean reward (all terms, weighted): {r.before:.3f} -> {r.after:.3f}; change {r.change:+.3f}, "
                     f"95% paired interval {r.low:+.3f} to {r.high:+.3f} -> **{_said(r.direction())}**")
        if self.reward_hacking:
            lines.append("- **Possible reward hacking**: the reward rose but held-out accuracy did not. The rewards "
                         "pay for something other than right answers; these scored high and were wrong:")
            lines += [f"  - \"{s['prompt']}\" -> \"{s['answer']}\" (reward {s['reward']:.2f}; reference "
                      f"{s['reference']})" for s in self.suspicious]
        return "\n".join(lines)


def _said(direction: str) -> str:
    return {"rose": "rose beyond chance", "fell": "fell beyond chance",
            "cannot tell": "cannot tell (the interval includes 0)"}[direction]


def read_held_out(run_dir: Path) -> dict[str, Any] | None:
    """The run's held-out answers with both measurements, or None (not a rule-rewarded run, or not finished)."""
    try:
        data = json.loads((Path(run_dir) / HELD_OUT_ANSWERS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if "before" in data and "after" in data and data.get("prompts") else None


def totals(side: dict[str, Any], weights: dict[str, float]) -> list[float]:
    """Each answer's reward: every term's score times its weight."""
    names = [n for n in weights if n in side["scores"]]
    count = len(side["answers"])
    return [sum(weights[n] * side["scores"][n][i] for n in names) for i in range(count)]


def accuracy_term(data: dict[str, Any]) -> str | None:
    """The term that checks answers against the reference: the first match/numeric rule of the run's config."""
    return data.get("accuracy_term")


def _measured(before: list[float], after: list[float]) -> Measured:
    low, high = paired_difference_interval(after, before)
    return Measured(sum(before) / len(before), sum(after) / len(after), low, high)


def held_out_verdict(run_dir: Path) -> HeldOutVerdict | None:
    data = read_held_out(run_dir)
    if data is None:
        return None
    weights = data["weights"]
    before, after = totals(data["before"], weights), totals(data["after"], weights)
    verdict = HeldOutVerdict(len(before), _measured(before, after), None, accuracy_term(data))
    term = verdict.accuracy_term
    if term and term in data["after"]["scores"]:
        right_before, right_after = data["before"]["scores"][term], data["after"]["scores"][term]
        verdict.accuracy = _measured(right_before, right_after)
        verdict.accuracy_bounds = {"before": wilson_interval(sum(right_before), len(right_before)),
                                   "after": wilson_interval(sum(right_after), len(right_after))}
        verdict.suspicious = _high_scoring_wrong(data, after, right_after)
    return verdict


def _high_scoring_wrong(data: dict[str, Any], rewards: list[float], right: list[float]) -> list[dict[str, Any]]:
    wrong = sorted((i for i in range(len(right)) if not right[i]), key=lambda i: -rewards[i])
    return [{"prompt": data["prompts"][i], "answer": data["after"]["answers"][i], "reward": rewards[i],
             "reference": ", ".join(f"{k}: {v}" for k, v in data["rows"][i].items() if k in data.get(
                 "reference_columns", []))} for i in wrong[:HACKING_EXAMPLES]]
