"""The reward bench's scores and the held-out verdict of a rule-rewarded GRPO run, on constructed answers (no
model): each score equals the rule worked out by hand, the advantage equals GRPO's formula, a group whose answers
all score the same is flagged, and "reward rose but accuracy did not" is named as possible reward hacking."""

from __future__ import annotations

import json
import math

import pytest

from finetune.core.rewards import parse_rules
from finetune.core.run_folder import HELD_OUT_ANSWERS
from finetune.services.reward_bench import (MAX_BENCH_ANSWERS, BenchError, BenchSample, check_bench_size,
                                            score_bench)
from finetune.services.rule_verdict import held_out_verdict

RULES = parse_rules([{"kind": "numeric", "reference": "answer", "extract": "last_number", "name": "right"},
                     {"kind": "length", "max_words": 3, "weight": 0.5, "name": "short"}])


def by_hand(answer: str, reference: str) -> tuple[float, float]:
    numbers = [w.strip(".,") for w in answer.split() if w.strip(".,").lstrip("-").isdigit()]
    return float(bool(numbers) and int(numbers[-1]) == int(reference)), float(len(answer.split()) <= 3)


def test_bench_scores_equal_the_rules_by_hand_with_grpos_advantage():
    sample = BenchSample(prompts=["3 + 4?", "2 + 2?"], rows=[{"answer": "7"}, {"answer": "4"}],
                         answers=[["7", "It is 7 of course.", "8", "The sum of 3 and 4 is 12."],
                                  ["4", "four", "5", "4."]], model="base")
    scores = score_bench(sample, RULES)
    assert len(scores.table) == 8 and scores.terms == {"right": 1.0, "short": 0.5}
    for p, (row, group) in enumerate(zip(sample.rows, sample.answers)):
        table = [r for r in scores.table if r["prompt #"] == p + 1]
        totals = []
        for answer, line in zip(group, table):
            right, short = by_hand(answer, row["answer"])
            assert (line["right"], line["short"]) == (right, short), answer
            totals.append(right + 0.5 * short)
            assert line["total"] == pytest.approx(totals[-1])
        mean = sum(totals) / len(totals)
        std = math.sqrt(sum((t - mean) ** 2 for t in totals) / (len(totals) - 1))
        assert [line["advantage"] for line in table] == pytest.approx(
            [round((t - mean) / (std + 1e-4), 3) for t in totals], abs=1e-3)
    assert scores.flat_groups == []


def test_a_group_where_every_answer_scores_the_same_is_flagged():
    sample = BenchSample(["3 + 4?", "1 + 1?"], [{"answer": "7"}, {"answer": "2"}],
                         [["I do not know the answer here", "no idea at all, sorry"], ["2", "1"]], "base")
    scores = score_bench(sample, RULES)
    assert scores.flat_groups == [1]
    assert {r["no signal"] for r in scores.table if r["prompt #"] == 1} == {"yes"}
    assert all(r["advantage"] == 0 for r in scores.table if r["prompt #"] == 1)
    assert "No learning signal in 1 of 2 groups" in scores.summary()


class FixedScorer:
    """Stands in for a reward model: a known score per answer (the bench adds it as one more weighted term)."""

    def score(self, prompts, answers):
        return [float(len(a)) for a in answers]


def test_the_reward_model_is_one_more_weighted_term():
    sample = BenchSample(["3 + 4?"], [{"answer": "7"}], [["7", "seven"]], "base")
    scores = score_bench(sample, RULES[:1], (FixedScorer(), 0.1))
    assert [r["total"] for r in scores.table] == pytest.approx([1 + 0.1 * 1, 0 + 0.1 * 5])


def test_the_bench_bounds_its_work():
    check_bench_size(4, 6)
    for prompts, answers, words in ((0, 4, "at least one prompt"), (2, 1, "at least 2 answers"),
                                    (5, 5, f"at most {MAX_BENCH_ANSWERS}")):
        with pytest.raises(BenchError, match=words):
            check_bench_size(prompts, answers)


def write_held_out(folder, before: list[tuple[str, float, float]], after: list[tuple[str, float, float]]):
    """A run's held-out answers: (answer, right, short) per prompt, before and after."""
    data = {"weights": {"right": 1.0, "short": 0.5}, "accuracy_term": "right", "reference_columns": ["answer"],
            "prompts": [f"question {i}" for i in range(len(before))],
            "rows": [{"answer": str(i)} for i in range(len(before))]}
    for side, rows in (("before", before), ("after", after)):
        data[side] = {"answers": [a for a, _, _ in rows], "scores": {"right": [r for _, r, _ in rows],
                                                                     "short": [s for _, _, s in rows]}}
    (folder / HELD_OUT_ANSWERS).write_text(json.dumps(data))


def test_accuracy_rising_beyond_chance_is_said_with_its_interval(tmp_path):
    write_held_out(tmp_path, [("long wrong answer here", 0, 0)] * 20,
                   [("0", 1, 1)] * 15 + [("long wrong answer here", 0, 0)] * 5)
    verdict = held_out_verdict(tmp_path)
    assert (verdict.accuracy.before, verdict.accuracy.after) == (0.0, 0.75)
    assert verdict.accuracy.low > 0 and verdict.accuracy.direction() == "rose" and not verdict.reward_hacking
    assert "0% (95% CI 0%-16%) -> 75%" in verdict.text()


def test_reward_up_but_accuracy_not_is_named_as_possible_reward_hacking(tmp_path):
    """The length term is gamed: every answer got short, none got right."""
    write_held_out(tmp_path, [("a long and wrong answer", 0, 0)] * 20, [("nine", 0, 1)] * 20)
    verdict = held_out_verdict(tmp_path)
    assert verdict.reward.direction() == "rose" and verdict.accuracy.direction() == "cannot tell"
    assert verdict.reward_hacking
    text = verdict.text()
    assert "Possible reward hacking" in text and '"question 0" -> "nine" (reward 0.50; reference answer: 0)' in text


def test_no_verdict_before_the_run_has_both_measurements(tmp_path):
    (tmp_path / HELD_OUT_ANSWERS).write_text(json.dumps({"prompts": ["q"], "before": {}}))
    assert held_out_verdict(tmp_path) is None


def test_the_group_baseline_lesson_quotes_the_learners_own_group():
    from finetune.core.rewards import group_advantages
    from finetune.services.course import group_baseline_sentence

    totals = [1.0, 0.0, 0.0, 0.5]
    advantages, _ = group_advantages(totals)
    text = group_baseline_sentence(totals, advantages)
    assert "scored 1.00, 0.00, 0.00, 0.50 (mean 0.38)" in text
    assert f"answer 1 gets advantage {advantages[0]:+.2f}" in text and f"answer 2 {advantages[1]:+.2f}" in text
    assert "no learning signal" in group_baseline_sentence([0.5, 0.5], [0.0, 0.0])
