"""The guided course (the "Start here" tab): its steps in order, how big its runs are, and the "what to notice"
sentences that read a learner's own numbers back to them.

Every sentence builder is a pure function of the numbers a step measured, so a number in the teaching text is
the learner's, never a template's example (issue 31); the tab and the lab report both call these.

    lora_sentence(16, 4_884_480, 139_399_488, 210)  # "Rank 16 trains 4.9 M of 139.4 M weights (3.50%) ..."
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from finetune.core.intervals import wilson_interval
from finetune.services.evaluate import win_rate

COURSE_ENV = "LORA_LAB_COURSE"  # "tiny": the smallest runs that still go through every step (tests, a quick demo)


@dataclass(frozen=True)
class CourseStep:
    key: str
    competency: str
    title: str
    text: str      # the course's words: a few sentences, a formula where it helps
    button: str    # the one primary action
    tab: str       # the full tab with every control


STEPS: tuple[CourseStep, ...] = (
    CourseStep(
        "lora", "PEFT and LoRA", "Count what LoRA trains",
        "PEFT freezes the pretrained weights and trains a small number of new ones, so only those need gradients "
        "and optimizer states. LoRA keeps each targeted matrix W (d_out x d_in) frozen and learns a low-rank "
        "update: **h = W·x + (α/r)·B·A·x**, with A (r x d_in) and B (d_out x r). B starts at zero, so training "
        "starts exactly at the base model, and each layer adds **r·(d_in + d_out)** weights instead of "
        "d_in·d_out. Pick a rank and count.",
        "Count trainable weights", "Train"),
    CourseStep(
        "quantization", "Quantization", "Store the weights in fewer bits",
        "A 16-bit weight takes 2 bytes; NF4 keeps a 4-bit index into 16 levels spaced like a normal distribution, "
        "plus one scale per block of 64 weights (double quantization stores those scales in 8 bits too). Each block "
        "is dequantized just before its matrix multiply, so memory falls while the arithmetic stays 16/32-bit. "
        "The price is rounding error, which shows as a higher perplexity **exp(mean loss)** on held-out text.",
        "Measure 16-bit against 4-bit", "Quantization"),
    CourseStep(
        "qlora", "QLoRA", "Fine-tune with QLoRA",
        "QLoRA is LoRA on a frozen 4-bit NF4 base: the adapters and their gradients stay in 16/32-bit, so the "
        "model fine-tunes in about a quarter of the 16-bit memory. This run trains your rank on the bundled "
        "course Q&A and holds some rows out, so the held-out loss shows whether it learned more than the "
        "training rows.",
        "Train a quick QLoRA run", "Train"),
    CourseStep(
        "chat", "RLHF: human feedback", "Compare the answers and vote",
        "Human feedback starts with comparisons: one prompt, two answers, a person picks the better one. Type a "
        "question; the base model and your adapter answer it with the same greedy decoding, so they differ only "
        "by the adapter. Each vote is stored as a (prompt, chosen, rejected) pair.",
        "Ask both models", "Chat"),
    CourseStep(
        "reward", "RLHF: reward model", "Train a reward model",
        "A reward model scores an answer so that the preferred one of a pair scores higher: it is trained to "
        "make **σ(r(chosen) − r(rejected))** large. Dozens of pairs are the least it needs, so it trains on the "
        "bundled course pairs (the format your votes export to) and is judged on pairs it never saw.",
        "Train the reward model", "RLHF"),
    CourseStep(
        "dpo", "RLHF: preference optimization", "Tune your adapter with DPO",
        "DPO skips the separate RL loop: starting from your QLoRA adapter (also the frozen reference), it raises "
        "**β·log(π/π_ref)** of the chosen answer above the rejected one's. The held-out reward margin is how much "
        "more the tuned model prefers the chosen answers than the reference does.",
        "Train with DPO", "RLHF"),
    CourseStep(
        "evaluate", "Evaluation", "Evaluate on held-out questions",
        "A verdict needs data the model never trained on, the right baseline, and an interval. This step "
        "computes the loss of the base, your QLoRA adapter and your DPO adapter on the same held-out questions, "
        "and a 95% paired-bootstrap interval of each difference: where the interval includes 0, these questions "
        "cannot tell the two apart.",
        "Evaluate on held-out questions", "Evaluate"),
    CourseStep(
        "report", "Take it home", "Download your lab report",
        "One HTML file (and a Markdown copy) with your runs' settings, loss curves, the answers you voted on, the "
        "verdicts with their intervals, the quantization table and these sentences: what a course would ask you "
        "to hand in. It holds only your runs and votes, and no server paths.",
        "Download the lab report", "Export"),
)
STEP_KEYS = tuple(step.key for step in STEPS)
RANK_EXPERIMENT = "rank"  # step 3's experiment: the learner's run again at another rank (not a step of the path)
# What the lab report lists, in the path's order: each step, and the rank experiment after the run it repeats.
REPORT_SECTIONS: tuple[tuple[str, str], ...] = tuple(
    pair for step in STEPS for pair in ((step.key, step.title),) + (
        ((RANK_EXPERIMENT, "Experiment: the same run at another rank"),) if step.key == "qlora" else ()))


# --- how big the course's runs are ---------------------------------------------------------------------------

@dataclass(frozen=True)
class CourseSize:
    """The course's run sizes: the CPU presets' own by default; ``LORA_LAB_COURSE=tiny`` for a smoke run (the
    browser test's walk). The smoke run trains at 32 bits: bitsandbytes has no fast 4-bit kernel for the CPU, so
    one held-out evaluation of 4 pairs took 20-28 s in 4-bit on 2 cores; the 4-bit path has tests of its own."""

    train_steps: int | None = None   # None: the preset's
    preference_steps: int = 20
    batch_size: int | None = None
    max_seq_length: int | None = None
    eval_rows: int = 12
    quant_rows: int = 12
    answer_tokens: int = 64
    validation_fraction: float | None = None  # None: the preset's share of rows held out
    eval_samples: int | None = None  # held-out rows (pairs) each evaluation reads; None: all of them
    bits: int | None = None  # None: the preset's (4 on every preset: QLoRA)

    @classmethod
    def from_env(cls) -> CourseSize:
        if os.environ.get(COURSE_ENV, "").strip().lower() == "tiny":
            return cls(train_steps=2, preference_steps=2, batch_size=2, max_seq_length=160, eval_rows=4,
                       quant_rows=3, answer_tokens=12, validation_fraction=0.02, eval_samples=4,
                       bits=32)
        return cls()


# --- expected times before anything was timed here -----------------------------------------------------------
# First guesses from DESIGN.md's measurements on a 2-core CPU: SmolLM2-135M in 4-bit, 4 rows x 128 tokens a step,
# about 5 s; loading a model about 20 s. A GPU is taken as 20x faster per token. Once a step ran, the course says
# its measured time instead (the run manager's estimate from completed runs, or the step's own last time).
CPU_SECONDS_PER_TOKEN = 5.0 / 512
GPU_SPEEDUP = 20.0
LOAD_SECONDS = 20.0
TYPICAL_ROW_TOKENS = 96  # a bundled course row is shorter than max_seq_length


def now() -> float:
    return time.monotonic()


def _per_token(gpu: bool) -> float:
    return CPU_SECONDS_PER_TOKEN / (GPU_SPEEDUP if gpu else 1.0)


def guess_train_seconds(steps: int, batch_size: int, max_seq_length: int, pairs: bool, gpu: bool,
                        evaluations: int = 0, held_out_rows: int = 0, reference: bool = False) -> float:
    """A training step's tokens (two answers per row for a preference pair) at the measured rate, plus a load,
    plus the held-out evaluations: forward passes only (a third of a training step's cost per token), twice for a
    method that also scores each answer with its frozen reference model (DPO)."""
    row_tokens = min(max_seq_length, TYPICAL_ROW_TOKENS) * (2 if pairs else 1)
    training = max(steps, 1) * batch_size * row_tokens * _per_token(gpu)
    held_out = evaluations * held_out_rows * row_tokens * (2 if reference else 1) * _per_token(gpu) / 3
    return LOAD_SECONDS + training + held_out


def evaluations(max_steps: int, eval_steps: int, at_start: bool) -> int:
    """How many held-out evaluations a run of ``max_steps`` makes: every ``eval_steps`` and at the end, and the
    RLHF stages once more before the first step (``at_start``)."""
    if eval_steps <= 0:
        return 0
    return -(-max_steps // eval_steps) + (1 if at_start else 0)


def guess_seconds(step: str, size: CourseSize, gpu: bool) -> float | None:
    """The steps that run in the app itself: forward passes only (about a third of a training step's cost)."""
    forward = _per_token(gpu) / 3
    if step == "quantization":  # two loads, then perplexity rows and a short answer each
        return 2 * (LOAD_SECONDS + size.quant_rows * TYPICAL_ROW_TOKENS * forward + 8 * 0.1)
    if step == "chat":  # one load, two greedy answers token by token
        return LOAD_SECONDS + 2 * size.answer_tokens * (0.1 if not gpu else 0.02)
    if step == "evaluate":  # base, QLoRA and DPO adapters on the same rows
        return LOAD_SECONDS + 3 * size.eval_rows * TYPICAL_ROW_TOKENS * forward
    return 1.0 if step in ("lora", "report") else None


# --- numbers as words ----------------------------------------------------------------------------------------

def millions(count: float) -> str:
    return f"{count / 1e6:.1f} M" if count >= 1e5 else f"{count:,.0f}"


def seconds_text(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def expected_time_text(seconds: float | None, measured: bool) -> str:
    """The time a step should take before it starts: measured on this machine, or a first guess."""
    if seconds is None:
        return "Expected time: unknown until a first run is timed on this machine."
    how = "from runs timed on this machine" if measured else "a first guess for this hardware"
    return f"Expected time: about {seconds_text(seconds)} ({how})."


def _change(before: float, after: float) -> str:
    """'-38%' / '+12.0%' of a positive quantity."""
    return f"{100 * (after / before - 1):+.1f}%" if before else "n/a"


# --- the "what to notice" sentences ---------------------------------------------------------------------------

def lora_sentence(rank: int, trainable: int, total: int, layers: int) -> str:
    share = 100 * trainable / total if total else 0.0
    return (f"Rank {rank} trains {millions(trainable)} of {millions(total)} weights ({share:.2f}%) over {layers} "
            f"targeted layers; the other {millions(total - trainable)} stay frozen. The count grows linearly "
            f"with r: rank {2 * rank} would train {millions(2 * trainable)}.")


def quant_sentence(half_label: str, half_bytes: float, four_bytes: float, half_perplexity: float,
                   four_perplexity: float, rows: int) -> str:
    ratio = half_bytes / four_bytes if four_bytes else float("nan")
    moved = "rose" if four_perplexity > half_perplexity else "fell" if four_perplexity < half_perplexity else "held"
    by = f" {abs(100 * (four_perplexity / half_perplexity - 1)):.1f}%" if half_perplexity else ""
    return (f"Your 4-bit NF4 layers hold {ratio:.1f}x less memory than {half_label} ({four_bytes / 2**20:.1f} MB "
            f"vs {half_bytes / 2**20:.1f} MB), and the validation perplexity on {rows} rows {moved}{by} "
            f"({half_perplexity:.2f} → {four_perplexity:.2f}).")


def run_sentence(steps: int, seconds: float | None, first_loss: float, last_loss: float,
                 eval_losses: list[float], bits: int) -> str:
    text = (f"Your run trained {steps} steps on a {bits}-bit base in {seconds_text(seconds)}: the training loss went "
            f"from {first_loss:.3f} to {last_loss:.3f} ({_change(first_loss, last_loss)})")
    if len(eval_losses) >= 2:
        text += (f"; the held-out loss went from {eval_losses[0]:.3f} to {eval_losses[-1]:.3f} "
                 f"({_change(eval_losses[0], eval_losses[-1])}), on rows it never trained on")
    elif eval_losses:
        text += f"; the held-out loss at the end is {eval_losses[-1]:.3f}"
    return text + "."


def other_rank(rank: int) -> int:
    """The rank experiment's second arm: rank 4 beside the learner's rank, or 16 when theirs is 4."""
    return 16 if rank == 4 else 4


def rank_sentence(rank: int, trainable: int, ran: int, ran_trainable: int, eval_loss: float | None,
                  ran_eval_loss: float | None, rows: int) -> str:
    """The rank experiment: the same run at another rank, its size and last held-out loss beside the learner's.
    No verdict here: the last held-out losses carry no interval; step 7 judges them on the same questions."""
    ratio = max(trainable, ran_trainable) / max(1, min(trainable, ran_trainable))
    fewer = "fewer" if ran_trainable < trainable else "more"
    text = (f"Rank {ran} trains {millions(ran_trainable)} weights, {ratio:.1f}x {fewer} than your rank {rank}'s "
            f"{millions(trainable)}, on the same rows, steps and seed")
    if eval_loss is None or ran_eval_loss is None:
        return text + "; one of the two runs logged no held-out loss, so there is nothing to set side by side."
    return (text + f". Last held-out loss on {rows} rows: {ran_eval_loss:.3f} at rank {ran}, {eval_loss:.3f} at rank "
            f"{rank}. Whether that difference is more than noise is step 7's question: it scores both on the same "
            "held-out questions with an interval.")


def vote_sentence(adapter: str, counts: dict[str, int]) -> str:
    """The learner's votes on one adapter against its base, as a win rate with its 95% interval."""
    rate = win_rate(adapter, counts)
    if not rate.votes:
        return f"No votes on `{adapter}` yet: ask a question and pick the better answer."
    verdict = ("better than the base beyond chance: the whole interval is above 0.5" if rate.low > 0.5 else
               "worse than the base beyond chance: the whole interval is below 0.5" if rate.high < 0.5 else
               f"which {rate.votes} vote{'s' if rate.votes != 1 else ''} cannot tell from chance (0.5 is inside)")
    return (f"You voted {rate.votes} time{'s' if rate.votes != 1 else ''} on `{adapter}`: tuned {rate.wins}, base "
            f"{rate.losses}, no preference {rate.ties}. Win rate {rate.rate:.2f} (95% interval {rate.low:.2f}-"
            f"{rate.high:.2f}), {verdict}.")


def reward_sentence(accuracy: float | None, pairs: int) -> str:
    if accuracy is None or not pairs:
        return "The reward model has no held-out pairs, so nothing shows that its scores mean anything."
    right = round(accuracy * pairs)
    low, high = wilson_interval(right, pairs)
    verdict = ("better than chance: the whole interval is above 0.5" if low > 0.5 else
               "which this little data cannot tell from chance (0.5 is inside the interval)")
    return (f"The reward model ranks the preferred answer higher on {right} of {pairs} held-out pairs "
            f"({right / pairs:.2f}, 95% interval {low:.2f}-{high:.2f}), {verdict}.")


def dpo_sentence(steps: int, margins: list[float], accuracy: float | None, beta: float) -> str:
    if not margins:
        return f"The DPO run trained {steps} steps but logged no held-out evaluation, so it shows no margin."
    start = f"from {margins[0]:.3f} to {margins[-1]:.3f}" if len(margins) >= 2 else f"to {margins[-1]:.3f}"
    text = (f"After {steps} DPO steps (β = {beta:g}) the held-out reward margin went {start}: the tuned model "
            f"{'prefers' if margins[-1] > 0 else 'does not prefer'} the chosen answers more than its reference does")
    if accuracy is not None:
        text += f", and ranks the chosen answer first in {accuracy:.2f} of held-out pairs"
    return text + "."


def loss_verdict_sentence(model: str, against: str, loss: float, other: float, rows: int,
                          interval: tuple[float, float] | None) -> str:
    """One held-out loss against its baseline, with the 95% interval of the difference (loss - other)."""
    delta = loss - other
    text = (f"On {rows} held-out questions `{model}` has loss {loss:.3f} against {other:.3f} for {against}: "
            f"{'lower' if delta < 0 else 'higher'} by {abs(delta):.3f}")
    if interval is None:
        return text + " (no interval: the two were not scored on the same rows)."
    low, high = interval
    shown = f"95% interval {_bound(low)} to {_bound(high)}"
    if low <= 0 <= high:
        return text + f" ({shown} includes 0: these questions cannot tell them apart)."
    meaning = "it does better on questions it never saw" if high < 0 else "it does worse on questions it never saw"
    return text + f" ({shown}): {meaning}."


def _bound(value: float) -> str:
    """An interval bound with its sign and three decimals, more where three would print a nonzero bound as
    -0.000 (which reads as if the interval touched 0)."""
    digits = 3
    while value and round(value, digits) == 0 and digits < 8:
        digits += 1
    return f"{value:+.{digits}f}"


def group_baseline_sentence(totals: list[float], advantages: list[float]) -> str:
    """GRPO's group baseline on one group of the learner's own sampled answers (the reward bench's)."""
    shown = ", ".join(f"{t:.2f}" for t in totals)
    mean = sum(totals) / len(totals) if totals else 0.0
    if not totals or max(totals) == min(totals):
        return (f"Your {len(totals)} answers to this prompt all scored {mean:.2f}: each is exactly its group's "
                "mean, so every advantage is 0 and GRPO learns nothing from this prompt (no learning signal).")
    best = max(range(len(totals)), key=totals.__getitem__)
    worst = min(range(len(totals)), key=totals.__getitem__)
    return (f"GRPO needs no critic: the baseline is the group itself. Your {len(totals)} answers to this prompt "
            f"scored {shown} (mean {mean:.2f}); each is compared with that mean and divided by the group's spread, "
            f"so answer {best + 1} gets advantage {advantages[best]:+.2f} (made more likely) and answer {worst + 1} "
            f"{advantages[worst]:+.2f} (made less likely). A reward model's score of 0.3 or a rule's 1 means the "
            "same thing here: only the order within the group counts.")


def rlvr_sentence(terms: dict[str, tuple[float, float]], zero_signal: tuple[float, float] | None,
                  accuracy: tuple[float, float] | None, reward_model: bool) -> str:
    """A GRPO run's own numbers: each reward term's mean at the first and last logged step, the share of groups
    with no signal, and held-out accuracy before and after."""
    kind = ("RLHF and RLVR together: a reward model learned from votes beside rules that check" if reward_model and
            len(terms) > 1 else "RLHF: a reward model learned from votes scores taste" if reward_model else
            "RLVR: rules check the answers, with no reward model to fool")
    moves = "; ".join(f"{name} {first:.2f} → {last:.2f}" for name, (first, last) in terms.items())
    text = f"Your run is {kind}. Mean reward of the sampled answers, first step → last: {moves}."
    if zero_signal is not None:
        text += (f" Groups whose answers all scored the same (no learning signal): {zero_signal[0]:.0%} → "
                 f"{zero_signal[1]:.0%}.")
    if accuracy is not None:
        text += (f" Held-out accuracy {accuracy[0]:.0%} → {accuracy[1]:.0%}: a training reward that rises while "
                 "this does not means the rewards pay for something other than right answers (reward hacking).")
    return text


def report_sentence(runs: int, votes: int, steps_done: int) -> str:
    return (f"Your report holds {runs} run{'s' if runs != 1 else ''}, {votes} vote{'s' if votes != 1 else ''} and "
            f"the results of {steps_done} of {len(STEPS)} course steps.")
