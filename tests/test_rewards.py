"""Rule rewards (finetune/core/rewards.py) and their validation in the config: every rule's score equals the rule
worked out by hand on constructed answers, GRPO's group advantage equals the formula, and bad rules are refused
before a run starts with the field named. No model needed."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings, strategies as st

from finetune.core.config import ConfigError, PYTHON_REWARDS_ENV, from_dict
from finetune.core.rewards import (RuleProblems, format_match, group_advantages, parse_rules, pattern_problem,
                                   reference_problems)

ROW = {"answer": "42", "unit": "MB"}


def score(rule: dict, answer: str, row: dict | None = None) -> float:
    return parse_rules([rule])[0].score(answer, ROW if row is None else row)


@pytest.mark.parametrize("answer, expected", [
    ("42", 1.0), (" 42. ", 1.0), ("The answer is 42", 0.0), ("41", 0.0), ("", 0.0)])
def test_match_compares_the_whole_answer_with_the_reference(answer, expected):
    # by hand: strip spaces and a closing full stop, then compare with '42'
    assert score({"kind": "match", "reference": "answer"}, answer) == expected


@pytest.mark.parametrize("answer, expected", [
    ("3 + 39 = 42", 1.0),        # the last number is 42
    ("42, or maybe 43", 0.0),    # the last number is 43
    ("It is 1,042", 0.0),        # 1042, not 42
    ("no digits at all", 0.0),
    ("-42", 0.0), ("42.0", 1.0)])
def test_numeric_reads_the_last_number(answer, expected):
    assert score({"kind": "numeric", "reference": "answer", "extract": "last_number"}, answer) == expected


def test_numeric_reads_the_answer_tag_and_honours_the_tolerance():
    rule = {"kind": "numeric", "reference": "answer", "extract": "answer_tag", "tolerance": 0.5}
    assert score(rule, "I think 7. <answer> 42.4 </answer>") == 1.0     # |42.4 - 42| = 0.4 <= 0.5
    assert score(rule, "<answer>43</answer>") == 0.0                     # |43 - 42| = 1 > 0.5
    assert score(rule, "42 without a tag") == 0.0                        # no tag: nothing to compare
    assert score(rule, "<answer>1</answer> then <answer>42</answer>") == 1.0  # the last tag counts
    assert score({"kind": "numeric", "reference": "answer"}, "1,024", {"answer": "1024"}) == 1.0


def test_match_of_a_tagged_part_ignores_case_unless_told():
    rule = {"kind": "match", "reference": "unit", "extract": "answer_tag"}
    assert score(rule, "so <answer>mb</answer>") == 1.0
    assert score({**rule, "ignore_case": False}, "so <answer>mb</answer>") == 0.0


def test_format_length_and_contains_rules():
    fmt = {"kind": "format", "pattern": r"^<answer>\s*-?\d+\s*</answer>$"}
    assert [score(fmt, a) for a in ("<answer>12</answer>", "<answer>12</answer> done", "<answer>x</answer>")] == \
        [1.0, 0.0, 0.0]
    window = {"kind": "length", "min_words": 2, "max_words": 4}
    answers = ["one", "one two", "one two three four", "one two three four five"]
    assert [score(window, a) for a in answers] == [float(2 <= len(a.split()) <= 4) for a in answers]
    assert score({"kind": "length", "min_words": 3}, "a b c d e f g") == 1.0  # no upper bound
    assert score({"kind": "contains", "text": "Rule of thumb"}, "...rule of THUMB: keep it small") == 1.0
    assert score({"kind": "not_contains", "text": "As an AI"}, "As an AI, I cannot") == 0.0
    assert score({"kind": "not_contains", "text": "As an AI"}, "42") == 1.0


def test_weights_and_names_are_kept_for_the_trainer():
    rules = parse_rules([{"kind": "numeric", "reference": "answer", "weight": 2},
                         {"kind": "length", "max_words": 5, "weight": -0.5, "name": "short"}])
    assert [(r.name, r.weight) for r in rules] == [("numeric_0", 2.0), ("short", -0.5)]


@pytest.mark.parametrize("totals", [[1.0, 0.0, 0.0, 0.0], [1.5, 0.5, 1.0, 0.0], [0.2, 0.9]])
def test_group_advantage_is_the_score_against_its_group(totals):
    advantages, flat = group_advantages(totals)
    mean = sum(totals) / len(totals)
    std = math.sqrt(sum((t - mean) ** 2 for t in totals) / (len(totals) - 1))
    assert advantages == pytest.approx([(t - mean) / (std + 1e-4) for t in totals]) and not flat
    assert sum(advantages) == pytest.approx(0.0, abs=1e-9)


def test_a_group_whose_answers_all_score_the_same_teaches_nothing():
    advantages, flat = group_advantages([0.5, 0.5, 0.5, 0.5])
    assert flat and advantages == [0.0, 0.0, 0.0, 0.0]


# --- refused before a run starts, with the field named ---------------------------------------------------------

def grpo(**preference) -> dict:
    return {"stage": "grpo", "training": {"batch_size": 4}, "preference": {"num_generations": 4, **preference}}


def problems(raw: dict) -> dict[str, str]:
    with pytest.raises(ConfigError) as error:
        from_dict(raw)
    return error.value.problems


def test_invalid_and_catastrophic_patterns_are_refused_with_the_rule_named():
    found = problems(grpo(rewards=[{"kind": "contains", "text": "ok"},
                                   {"kind": "format", "pattern": "[0-9"},
                                   {"kind": "format", "pattern": r"^(\w+\s?)*$"},
                                   {"kind": "format", "pattern": r"(a)\1"},
                                   {"kind": "format", "pattern": "x" * 201}]))
    assert set(found) == {f"preference.rewards[{i}].pattern" for i in (1, 2, 3, 4)}
    assert "not a valid regular expression" in found["preference.rewards[1].pattern"]
    assert "catastrophic" in found["preference.rewards[2].pattern"]
    assert "backreference" in found["preference.rewards[3].pattern"]
    assert "at most 200" in found["preference.rewards[4].pattern"]


@pytest.mark.parametrize("pattern", [r"(a{2})+", r"^\d+(\.\d+)?$", r"(ab){2,5}", r"^<answer>.*</answer>$"])
def test_ordinary_patterns_pass_the_static_check(pattern):
    assert pattern_problem(pattern) is None


def test_a_slow_pattern_the_static_check_misses_is_cut_off_by_the_time_limit():
    """(a|aa)+$ backtracks exponentially on 'aaaa...!' but has no nested quantifier: the match's time limit
    ends it, and the answer scores 0 instead of stalling the trainer."""
    assert pattern_problem(r"(a|aa)+$") is None
    assert format_match(r"(a|aa)+$", "a" * 1000 + "!") is None
    assert score({"kind": "format", "pattern": r"(a|aa)+$"}, "a" * 1000 + "!") == 0.0


def test_weights_summing_to_zero_and_no_reward_at_all_are_refused():
    assert set(problems(grpo(rewards=[{"kind": "contains", "text": "a", "weight": 1},
                                      {"kind": "length", "max_words": 3, "weight": -1}]))) == {"preference.rewards"}
    assert set(problems(grpo())) == {"preference.reward_model"}


def test_unknown_settings_and_kinds_are_named():
    found = problems(grpo(rewards=[{"kind": "numeric", "referenec": "answer"}, {"kind": "regex"}, "42"]))
    assert {"preference.rewards[0].referenec", "preference.rewards[0].reference", "preference.rewards[1].kind",
            "preference.rewards[2]"} == set(found)


def test_a_missing_reference_column_is_named():
    rules = parse_rules([{"kind": "contains", "text": "x"}, {"kind": "numeric", "reference": "solution"}])
    assert set(reference_problems(rules, ["prompt", "answer"])) == {"rewards[1].reference"}


def test_a_python_reward_is_refused_on_a_space_even_when_allowed(monkeypatch):
    """The Space is mocked by its environment variable (SPACE_ID), as the app detects it."""
    monkeypatch.setenv(PYTHON_REWARDS_ENV, "1")
    monkeypatch.setenv("SPACE_ID", "someone/lora-lab")
    found = problems(grpo(reward_file="rewards.py:score"))
    assert set(found) == {"preference.reward_file"} and "Space" in found["preference.reward_file"]
    monkeypatch.delenv("SPACE_ID")
    assert from_dict(grpo(reward_file="rewards.py:score")).preference.reward_weights() == {"python_reward": 1.0}
    monkeypatch.delenv(PYTHON_REWARDS_ENV)
    assert PYTHON_REWARDS_ENV in problems(grpo(reward_file="rewards.py:score"))["preference.reward_file"]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(["kind", "pattern", "reference", "weight", "max_words", "text",
                                                 "extract", "min_words", "tolerance"]),
                                st.one_of(st.text(max_size=30), st.integers(-3, 3), st.floats(), st.none(),
                                          st.sampled_from(["format", "numeric", "length", "contains", "match"]))),
                max_size=3))
def test_any_declared_rules_parse_or_give_the_rules_own_error(raw):
    try:
        rules = parse_rules(raw)
    except RuleProblems as error:
        assert error.problems and all(key.startswith("rewards[") for key in error.problems)
        return
    for rule in rules:
        assert rule.score("an answer with 42", ROW) in (0.0, 1.0)
