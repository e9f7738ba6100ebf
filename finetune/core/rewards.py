"""Rule rewards for GRPO, declared in the config rather than programmed: a visitor of a public Space writes no code,
and the reward bench, the trainer and the held-out verdict score answers with the same functions.

A rule is a mapping in ``preference.rewards``; each gives 0 or 1 per answer, times its weight:

- ``match``: the answer (or a part of it, ``extract``) equals the row's ``reference`` column, case and spacing
  ignored;
- ``numeric``: the number in the answer (``extract``: the whole answer, its last number, or the text inside
  ``<answer>...</answer>``) equals the reference number within ``tolerance``;
- ``format``: a regular expression (``pattern``) is found in the answer;
- ``length``: the answer has between ``min_words`` and ``max_words`` words (0 = no upper bound);
- ``contains`` / ``not_contains``: ``text`` occurs / does not occur in the answer.

    rules = parse_rules([{"kind": "numeric", "reference": "answer", "extract": "last_number"},
                         {"kind": "length", "max_words": 12, "weight": 0.5}])
    rules[0].score("It is 42.", {"answer": "42"})   # 1.0

Regular expressions are a visitor's input, so two guards keep one from stalling training (see
``pattern_problem`` and ``format_match``). Basic module: imports nothing of the project.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

RULE_KINDS = ("match", "numeric", "format", "length", "contains", "not_contains")
EXTRACTS = ("whole", "last_number", "answer_tag")
MAX_PATTERN_CHARS = 200   # a format rule is a short shape (a tag, a number), not a program
MAX_TEXT_CHARS = 200      # of a contains / does-not-contain text
MAX_MATCH_CHARS = 2000    # of an answer a pattern is run on: GRPO's answers are short (max_completion_length tokens)
MATCH_SECONDS = 0.1       # per match; a match that runs longer scores 0 (and is counted as timed out)

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_KIND_FIELDS = {"match": {"reference", "extract", "ignore_case"},
                "numeric": {"reference", "extract", "tolerance"},
                "format": {"pattern"}, "length": {"min_words", "max_words"},
                "contains": {"text", "ignore_case"}, "not_contains": {"text", "ignore_case"}}
_COMMON_FIELDS = {"kind", "weight", "name"}


class RuleProblems(ValueError):
    """Rules that cannot run; ``problems`` maps 'rewards[i].field' to a sentence."""

    def __init__(self, problems: dict[str, str]):
        self.problems = problems
        super().__init__("; ".join(f"{name}: {message}" for name, message in problems.items()))


@dataclass(frozen=True)
class RewardRule:
    kind: str
    weight: float = 1.0
    name: str = ""             # how logs and tables call it; default '<kind>_<position>'
    reference: str = ""        # match / numeric: the dataset column holding the right answer
    extract: str = "whole"     # match / numeric: which part of the answer is compared
    tolerance: float = 0.0     # numeric: largest accepted absolute difference
    ignore_case: bool = True   # match / contains / not_contains
    pattern: str = ""          # format
    min_words: int = 0         # length
    max_words: int = 0         # length; 0 = no upper bound
    text: str = ""             # contains / not_contains

    def score(self, answer: str, row: dict[str, Any] | None = None) -> float:
        """1.0 when the answer passes this rule, else 0.0 (unweighted)."""
        answer = answer or ""
        row = row or {}
        if self.kind == "match":
            part = extract_part(answer, self.extract)
            return float(part is not None and normalize(part, self.ignore_case) ==
                         normalize(str(row.get(self.reference, "")), self.ignore_case))
        if self.kind == "numeric":
            return float(numbers_equal(extract_number(answer, self.extract), to_number(row.get(self.reference)),
                                       self.tolerance))
        if self.kind == "format":
            return float(format_match(self.pattern, answer) is True)
        if self.kind == "length":
            words = len(answer.split())
            return float(words >= self.min_words and (self.max_words == 0 or words <= self.max_words))
        found = _fold(self.text, self.ignore_case) in _fold(answer, self.ignore_case)
        return float(found if self.kind == "contains" else not found)

    def describe(self) -> str:
        """The rule in words, for tables and the run history."""
        if self.kind in ("match", "numeric"):
            part = {"whole": "the answer", "last_number": "the answer's last number",
                    "answer_tag": "the text inside <answer>...</answer>"}[self.extract]
            within = f" within {self.tolerance:g}" if self.kind == "numeric" and self.tolerance else ""
            return f"{part} {'equals' if self.kind == 'match' else 'is the number in'} column '{self.reference}'{within}"
        if self.kind == "format":
            return f"matches /{self.pattern}/"
        if self.kind == "length":
            upper = f" and {self.max_words}" if self.max_words else " or more"
            return f"between {self.min_words}{upper} words"
        return f"{'contains' if self.kind == 'contains' else 'does not contain'} '{self.text}'"


# --- reading answers --------------------------------------------------------------------------------------------

def normalize(text: str, ignore_case: bool = True) -> str:
    """Spacing and a closing full stop do not make an answer different."""
    text = " ".join(text.split()).rstrip(".").strip()
    return text.casefold() if ignore_case else text


def _fold(text: str, ignore_case: bool) -> str:
    return text.casefold() if ignore_case else text


def extract_part(answer: str, how: str) -> str | None:
    """The part of an answer a rule compares; None when it has no such part (no number, no tag)."""
    if how == "answer_tag":
        found = ANSWER_TAG.findall(answer)
        return found[-1].strip() if found else None
    if how == "last_number":
        numbers = NUMBER.findall(THOUSANDS.sub("", answer))
        return numbers[-1] if numbers else None
    return answer.strip()


def to_number(value: Any) -> float | None:
    """A reference or an extracted part as a number: '1,024', ' 3.5 ', 7 -> float; anything else None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    text = THOUSANDS.sub("", str(value)).strip().rstrip(".")
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def extract_number(answer: str, how: str) -> float | None:
    part = extract_part(answer, how)
    return None if part is None else to_number(part)


def numbers_equal(a: float | None, b: float | None, tolerance: float) -> bool:
    return a is not None and b is not None and abs(a - b) <= tolerance + 1e-9


# --- regular expressions a visitor wrote --------------------------------------------------------------------------
#
# Two guards, because neither is enough alone. Before a run, pattern_problem refuses the shapes known to backtrack
# exponentially (a quantifier inside a quantified group, a backreference), so the mistake is named in the form
# rather than discovered as a run that scores every answer 0. A static rule cannot catch every slow pattern
# (overlapping alternatives such as (a|aa)+ pass it), and Python's `re` cannot be interrupted once it runs, so
# format_match runs the pattern with the `regex` module's time limit, on at most MAX_MATCH_CHARS of the answer.

def pattern_problem(pattern: str) -> str | None:
    """Why a format rule's pattern cannot be used, or None."""
    if not isinstance(pattern, str) or not pattern:
        return "give a regular expression, e.g. ^<answer>\\s*-?\\d+\\s*</answer>$"
    if len(pattern) > MAX_PATTERN_CHARS:
        return f"the pattern is {len(pattern)} characters; at most {MAX_PATTERN_CHARS} are allowed"
    try:
        from re import _parser  # the tree `re` compiles from: what is repeated inside what

        tree = _parser.parse(pattern)
        import regex

        regex.compile(pattern)
    except Exception as error:  # noqa: BLE001 - re.error, regex.error, RecursionError: all say 'not valid'
        return f"not a valid regular expression: {error}"
    return _catastrophic(tree.data if hasattr(tree, "data") else list(tree), inside_repeat=False)


def _catastrophic(items: list[Any], inside_repeat: bool) -> str | None:
    from re import _constants as c

    for op, value in items:
        if op in (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT):
            low, high, body = value
            repeats = high is c.MAXREPEAT or high > 1
            if inside_repeat and (high is c.MAXREPEAT or high != low):  # (a{2})+ is fine, (a{1,2})+ is not
                return ("catastrophic: a quantifier inside a quantified group (like (a+)+) can take exponential "
                        "time on an answer that almost matches; quantify the inner part or the group, not both")
            found = _catastrophic(list(body), inside_repeat or repeats)
        elif op in (c.GROUPREF, c.GROUPREF_EXISTS):
            return "catastrophic: backreferences (\\1) can take exponential time; match the text directly"
        elif op == c.SUBPATTERN:
            found = _catastrophic(list(value[-1]), inside_repeat)
        elif op == c.BRANCH:
            found = next((p for branch in value[1] if (p := _catastrophic(list(branch), inside_repeat))), None)
        elif op in (c.ASSERT, c.ASSERT_NOT, c.ATOMIC_GROUP):
            found = _catastrophic(list(value[-1] if isinstance(value, tuple) else value), inside_repeat)
        else:
            found = None
        if found:
            return found
    return None


class _Timeouts:
    count = 0  # matches cut off by MATCH_SECONDS in this process (the bench reports it)


def format_match(pattern: str, answer: str) -> bool | None:
    """Whether ``pattern`` is found in the answer's first MAX_MATCH_CHARS characters; None when the match ran
    past MATCH_SECONDS (scored as a miss)."""
    import regex

    try:
        return regex.search(pattern, answer[:MAX_MATCH_CHARS], timeout=MATCH_SECONDS) is not None
    except TimeoutError:
        _Timeouts.count += 1
        return None


def timed_out_matches() -> int:
    return _Timeouts.count


# --- declared rules -> RewardRule ---------------------------------------------------------------------------------

def rule_problems(raw: Any) -> dict[str, str]:
    """Every problem of a list of declared rules at once, keyed 'rewards[i].field'."""
    if raw is None:
        return {}
    if not isinstance(raw, list):
        return {"rewards": "rewards must be a list of rules, e.g. [{kind: numeric, reference: answer}]"}
    problems: dict[str, str] = {}
    for position, rule in enumerate(raw):
        for name, message in _one_rule_problems(rule).items():
            problems[f"rewards[{position}]{'.' + name if name else ''}"] = message
    return problems


def _one_rule_problems(rule: Any) -> dict[str, str]:
    if not isinstance(rule, dict):
        return {"": f"a rule is a mapping such as {{kind: contains, text: '<answer>'}}, got {rule!r}"}
    kind = rule.get("kind")
    if kind not in RULE_KINDS:
        return {"kind": f"kind must be one of {', '.join(RULE_KINDS)}, got {kind!r}"}
    problems = {key: f"'{key}' is not a setting of a {kind} rule (it takes "
                     f"{', '.join(sorted(_KIND_FIELDS[kind] | _COMMON_FIELDS))})"
                for key in sorted(set(rule) - _KIND_FIELDS[kind] - _COMMON_FIELDS)}
    weight = rule.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        problems["weight"] = f"weight must be a finite number, got {weight!r}"
    problems.update(_kind_problems(kind, rule))
    return problems


def _kind_problems(kind: str, rule: dict[str, Any]) -> dict[str, str]:
    problems: dict[str, str] = {}
    if kind in ("match", "numeric"):
        if not isinstance(rule.get("reference"), str) or not rule.get("reference", "").strip():
            problems["reference"] = "name the dataset column that holds the right answer, e.g. answer"
        if rule.get("extract", "whole") not in EXTRACTS:
            problems["extract"] = f"extract must be one of {', '.join(EXTRACTS)}, got {rule.get('extract')!r}"
        tolerance = rule.get("tolerance", 0.0)
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
            problems["tolerance"] = f"tolerance must be a number >= 0, got {tolerance!r}"
    elif kind == "format":
        if (problem := pattern_problem(rule.get("pattern", ""))) is not None:
            problems["pattern"] = problem
    elif kind == "length":
        problems.update(_length_problems(rule))
    else:
        text = rule.get("text")
        if not isinstance(text, str) or not text or len(text) > MAX_TEXT_CHARS:
            problems["text"] = f"give the text to look for (1 to {MAX_TEXT_CHARS} characters)"
    return problems


def _length_problems(rule: dict[str, Any]) -> dict[str, str]:
    low, high = rule.get("min_words", 0), rule.get("max_words", 0)
    whole = [isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (low, high)]
    if not all(whole):
        return {"min_words" if not whole[0] else "max_words": "word counts must be whole numbers >= 0"}
    if low == 0 and high == 0:
        return {"max_words": "give min_words or max_words (a window of 0 to no limit rewards every answer)"}
    if high and high < low:
        return {"max_words": f"max_words ({high}) is below min_words ({low})"}
    return {}


def parse_rules(raw: Any) -> list[RewardRule]:
    """The declared rules as RewardRule objects; RuleProblems names every bad field."""
    problems = rule_problems(raw)
    if problems:
        raise RuleProblems(problems)
    known = {f.name for f in dataclasses.fields(RewardRule)}
    rules = []
    for position, rule in enumerate(raw or []):
        values = {k: v for k, v in rule.items() if k in known}
        values["weight"] = float(values.get("weight", 1.0))
        values["name"] = str(values.get("name") or f"{rule['kind']}_{position}")
        rules.append(RewardRule(**values))
    return rules


def rules_from_yaml(text: str | None) -> list[Any]:
    """The rules a form's text box declares (a YAML list of mappings; empty = none). The list is returned
    unchecked: the config checks it with every other field. RuleProblems when the text is not YAML."""
    import yaml

    if not text or not str(text).strip():
        return []
    try:
        value = yaml.safe_load(str(text))
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise RuleProblems({"rewards": f"the rules are not valid YAML{line}: write one '- kind: ...' item per "
                                       "rule"}) from None
    return value if isinstance(value, list) else [value]


def reference_problems(rules: list[RewardRule], columns: list[str]) -> dict[str, str]:
    """Rules whose reference column the dataset does not have, keyed like rule_problems."""
    return {f"rewards[{i}].reference": f"the dataset has no column '{rule.reference}' (it has: "
                                       f"{', '.join(columns)})"
            for i, rule in enumerate(rules) if rule.kind in ("match", "numeric") and rule.reference not in columns}


# --- scores and GRPO's group-relative advantage --------------------------------------------------------------------

def answer_text(completion: Any) -> str:
    """TRL passes a conversational completion as [{'role': 'assistant', 'content': ...}], a plain one as text."""
    if isinstance(completion, list):
        return "".join(str(turn.get("content", "")) for turn in completion if isinstance(turn, dict))
    return str(completion or "")


def group_advantages(totals: list[float]) -> tuple[list[float], bool]:
    """GRPO's advantage of each answer of one prompt's group, as TRL computes it (scale_rewards='group'):
    (reward - group mean) / (group standard deviation + 1e-4), the deviation with n-1. Also whether every answer
    scored the same: then every advantage is 0 and the group teaches nothing."""
    n = len(totals)
    if n == 0:
        return [], True
    mean = sum(totals) / n
    std = math.sqrt(sum((t - mean) ** 2 for t in totals) / (n - 1)) if n > 1 else 0.0
    flat = math.isclose(std, 0.0, abs_tol=1e-8)
    return [(t - mean) / (std + 1e-4) for t in totals], flat
