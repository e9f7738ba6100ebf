"""The reward bench: test GRPO's rewards on sampled answers before spending a run on them.

Pick prompts (with their reference columns), sample N answers to each from the current policy (the base or an SFT
adapter, through the Chat tab's engine, as GRPO samples them: temperature 1), and score every answer per reward
term and in total, with the group-relative advantage GRPO would compute from those totals. A group whose answers
all score the same has advantage 0 everywhere: it teaches nothing, the most common reason a GRPO run learns
nothing. Re-scoring after editing the rules reuses the sampled answers.

    sample = sample_bench(engine, Candidate("base", ModelConfig()), rows[:2], answers_per_prompt=4)
    scores = score_bench(sample, parse_rules([{"kind": "numeric", "reference": "answer"}]))
    print(scores.summary())
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from finetune.core.rewards import RewardRule, group_advantages, timed_out_matches
from finetune.services.chat import SamplingSettings, budget_note
from finetune.services.evaluate import Candidate

MAX_BENCH_ANSWERS = 24   # prompts x answers per request: each answer is a sampled generation, seconds on a CPU
GRPO_TEMPERATURE = 1.0   # TRL's GRPOConfig default: the bench samples as the trainer will


class BenchError(ValueError):
    """A bench request that cannot be served; the message says what to change."""


@dataclass
class BenchSample:
    prompts: list[str]
    rows: list[dict[str, Any]]       # each prompt's other columns (the references rules compare with)
    answers: list[list[str]]         # answers_per_prompt per prompt
    model: str                       # what answered: the base or an adapter's name


@dataclass
class BenchScores:
    terms: dict[str, float]                          # term name -> weight
    table: list[dict[str, Any]] = field(default_factory=list)
    flat_groups: list[int] = field(default_factory=list)  # prompt numbers (1-based) with no learning signal
    timed_out: int = 0                               # format matches cut off by the time limit

    def summary(self) -> str:
        groups = len({row["prompt #"] for row in self.table})
        means = ", ".join(f"{name} {sum(r[name] for r in self.table) / len(self.table):.2f} (weight {w:g})"
                          for name, w in self.terms.items()) if self.table else "none"
        lines = [f"**{len(self.table)} answers to {groups} prompts.** Mean score per term: {means}."]
        if self.flat_groups:
            lines.append(f"⚠️ **No learning signal in {len(self.flat_groups)} of {groups} groups** (prompt "
                         f"{', '.join(map(str, self.flat_groups))}): every answer scored the same, so every "
                         "advantage is 0 and GRPO learns nothing from them. Loosen a rule that nobody passes, "
                         "tighten one that everybody passes, or add a term that tells these answers apart.")
        else:
            lines.append("Every group has answers scored differently: GRPO has a signal from each prompt.")
        if self.timed_out:
            lines.append(f"⚠️ {self.timed_out} format matches ran past the time limit and scored 0: simplify "
                         "the pattern.")
        return "\n\n".join(lines)


def check_bench_size(prompts: int, answers_per_prompt: int) -> None:
    if prompts < 1:
        raise BenchError("Pick at least one prompt to sample answers for.")
    if answers_per_prompt < 2:
        raise BenchError("Sample at least 2 answers per prompt: GRPO compares the answers of one prompt.")
    if prompts * answers_per_prompt > MAX_BENCH_ANSWERS:
        raise BenchError(f"{prompts} prompts x {answers_per_prompt} answers = {prompts * answers_per_prompt} "
                         f"answers; the bench samples at most {MAX_BENCH_ANSWERS} per request. Pick fewer prompts "
                         "or answers.")


def sample_bench(engine: Any, candidate: Candidate, rows: list[dict[str, Any]], answers_per_prompt: int,
                 max_new_tokens: int = 32, seed: int = 0, on_answer: Callable[[int, int], None] | None = None
                 ) -> BenchSample:
    """``answers_per_prompt`` sampled answers to each row's prompt (its last user turn), each with its own seed."""
    check_bench_size(len(rows), answers_per_prompt)
    prompts = [row["prompt"][-1]["content"] if isinstance(row["prompt"], list) else str(row["prompt"])
               for row in rows]
    total, answers = len(prompts) * answers_per_prompt, []
    for p, prompt in enumerate(prompts):
        group = []
        for a in range(answers_per_prompt):
            settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=GRPO_TEMPERATURE, top_p=1.0,
                                        seed=seed + a)
            text = ""
            for text in engine.stream(prompt, [], candidate.model, candidate.name if candidate.adapter_dir else None,
                                      candidate.adapter_dir, settings):
                pass
            group.append(text.removesuffix(budget_note(engine.max_seconds)).strip())
            if on_answer:
                on_answer(p * answers_per_prompt + a + 1, total)
        answers.append(group)
    return BenchSample(prompts, [{k: v for k, v in row.items() if k != "prompt"} for row in rows], answers,
                       candidate.name)


def score_bench(sample: BenchSample, rules: list[RewardRule],
                reward_model: tuple[Any, float] | None = None) -> BenchScores:
    """Every answer's score per term (rules: 0 or 1; the reward model: its score), the weighted total and GRPO's
    advantage within its prompt's group. ``reward_model``: (a scorer with .score(prompts, answers), its weight)."""
    terms = {rule.name: rule.weight for rule in rules}
    model_scores: list[list[float]] = []
    if reward_model is not None:
        scorer, weight = reward_model
        terms["reward_model"] = weight
        model_scores = [scorer.score([prompt] * len(group), group) for prompt, group in zip(sample.prompts,
                                                                                          sample.answers)]
    timeouts_before = timed_out_matches()
    result = BenchScores(terms)
    for p, (prompt, row, group) in enumerate(zip(sample.prompts, sample.rows, sample.answers)):
        scored = [{rule.name: rule.score(answer, row) for rule in rules} for answer in group]
        for a, scores in enumerate(scored):
            if model_scores:
                scores["reward_model"] = round(float(model_scores[p][a]), 4)
        totals = [sum(terms[name] * value for name, value in scores.items()) for scores in scored]
        advantages, flat = group_advantages(totals)
        if flat:
            result.flat_groups.append(p + 1)
        for a, (answer, scores) in enumerate(zip(group, scored)):
            result.table.append({"prompt #": p + 1, "answer #": a + 1, "prompt": prompt, "answer": answer,
                                 **scores, "total": round(totals[a], 4), "advantage": round(advantages[a], 3),
                                 "no signal": "yes" if flat else ""})
    result.timed_out = timed_out_matches() - timeouts_before
    return result
