# Over 600 lines on purpose: the Evaluate tab's measurements side by side (loss, overlap, votes, degeneration,
# paired verdicts), short sections that share the candidate models and the interval arithmetic.
"""Evaluation: how much better is an adapter than its base, in numbers from the learner's own runs.

- **Validation loss and perplexity.** The mean negative log-likelihood per answer token (the same tokens the
  trainer's loss counts: for chat rows only the assistant's answer, for ``text`` rows every token), averaged over
  all tokens of the split, and perplexity = exp(loss). Batched, with padding that never changes the result.
- **Side-by-side generations** on held-out prompts, each with a ROUGE-L F1 against the reference answer
  (Google's ``rouge-score`` package).
- **Win rate against the base** from the arena / pairwise votes, with a 95% Wilson interval.
- **Reward-model score** of each answer, when a reward run exists (optional, loaded lazily).
- **Checkpoint comparison**: one prompt answered by every saved checkpoint of a run.

    rows = eval_rows(DataConfig(source="bundled:course_qa", split="validation"))
    result = dataset_loss(model, tokenizer, rows, batch_size=4)
    print(result.loss, result.perplexity)
    print(win_rate("my-run", {"wins": 8, "losses": 2, "ties": 0, "both_bad": 0}))
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from finetune.core import paths
from finetune.core.config import ConfigError, DataConfig, ModelConfig, load_config
from finetune.core.data import DataError, prepare
from finetune.core.intervals import wilson_interval
from finetune.core.lora_init import BASE_CHANGING
from finetune.core.preference import prompt_key, trained_prompt_keys
from finetune.core.run_folder import ADAPTER_DIR, CONFIG_COPY, RUN_CONFIG, RUN_INFO_FILE, checkpoints, has_adapter
from finetune.core.run_status import read_metrics
from finetune.services.chat import SamplingSettings, budget_note, peft_adapter_name
from finetune.services.feedback import FeedbackStore

IGNORE = -100                       # label of a token the loss does not count (prompt and padding)
Progress = Callable[[int, int], None]


# --- loss and perplexity -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LossResult:
    loss: float          # mean NLL per counted token, in nats
    perplexity: float    # exp(loss)
    tokens: int          # tokens the loss counted
    rows: int            # rows evaluated (rows with nothing to count are skipped)
    # (summed NLL, counted tokens) of each row, in order: what a paired interval of two models' losses resamples
    row_nll: tuple[tuple[float, int], ...] = field(default=(), repr=False, compare=False)


def perplexity(loss: float) -> float:
    """exp(loss); inf rather than an OverflowError for a hopeless model."""
    return math.exp(loss) if loss < 700 else math.inf


def _token_ids(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def encode_row(row: dict[str, Any], tokenizer: Any, max_length: int) -> tuple[list[int], list[int]] | None:
    """(input ids, labels) with IGNORE on the prompt, cut to max_length; None when no token would count.

    The prompt is templated with the generation prompt, as at training time, so the counted tokens are exactly
    the assistant's answer and the template's closing tokens.
    """
    if "text" in row and "prompt" not in row:
        ids = tokenizer(row["text"])["input_ids"][:max_length]
        labels = list(ids)
    else:
        prompt = _token_ids(tokenizer, row["prompt"], add_generation_prompt=True)
        ids = _token_ids(tokenizer, row["prompt"] + row["completion"], add_generation_prompt=False)[:max_length]
        start = len(prompt) if ids[:len(prompt)] == prompt else _common_prefix(prompt, ids)
        labels = [IGNORE] * min(start, len(ids)) + ids[start:]
    # The first token is never predicted (nothing precedes it), so it never counts.
    return (ids, labels) if any(label != IGNORE for label in labels[1:]) else None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _pad(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right padding: positions of real tokens stay 0..n-1, so padding cannot change any prediction."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (ids, row_labels) in enumerate(batch):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(ids)] = torch.tensor(row_labels)
        mask[i, :len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def batch_row_nll(model: Any, batch: dict[str, torch.Tensor]) -> list[tuple[float, int]]:
    """(summed NLL over counted tokens, number of counted tokens) of each row of one padded batch."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
    targets = batch["labels"][:, 1:].to(device)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE,
                                            reduction="none")
    counted = targets != IGNORE
    return [(float(row.sum()), int(mask.sum())) for row, mask in zip(nll, counted)]


def batch_nll(model: Any, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """(summed NLL over counted tokens, number of counted tokens) for one padded batch."""
    rows = batch_row_nll(model, batch)
    return sum(n for n, _ in rows), sum(t for _, t in rows)


def dataset_loss(model: Any, tokenizer: Any, rows: Iterable[dict[str, Any]], batch_size: int = 4,
                 max_length: int = 512, on_batch: Progress | None = None) -> LossResult:
    """Token-weighted mean NLL over all rows (not a mean of per-row means, which would over-weight short answers)."""
    encoded = [e for e in (encode_row(row, tokenizer, max_length) for row in rows) if e is not None]
    if not encoded:
        raise ValueError("No evaluation rows with an answer to score.")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    per_row: list[tuple[float, int]] = []
    batches = [encoded[i:i + batch_size] for i in range(0, len(encoded), batch_size)]
    for done, batch in enumerate(batches, start=1):
        per_row += batch_row_nll(model, _pad(batch, pad_id))
        if on_batch:
            on_batch(done, len(batches))
    total_nll, total_tokens = sum(n for n, _ in per_row), sum(t for _, t in per_row)
    loss = total_nll / total_tokens
    return LossResult(loss, perplexity(loss), total_tokens, len(encoded), tuple(per_row))


BOOTSTRAP_DRAWS = 2000


def loss_difference_interval(a: LossResult, b: LossResult, draws: int = BOOTSTRAP_DRAWS, seed: int = 0
                             ) -> tuple[float, float] | None:
    """95% paired-bootstrap interval of loss(a) - loss(b) over the same rows (resampled together, token-weighted
    like the loss itself); None when the two were not computed on the same rows."""
    if not a.row_nll or len(a.row_nll) != len(b.row_nll) or any(
            ta != tb for (_, ta), (_, tb) in zip(a.row_nll, b.row_nll)):
        return None
    return paired_difference_interval([n for n, _ in a.row_nll], [n for n, _ in b.row_nll],
                                      [t for _, t in a.row_nll], draws, seed)


def paired_difference_interval(a: list[float], b: list[float], weights: list[float] | None = None,
                               draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> tuple[float, float]:
    """95% paired-bootstrap interval of sum(a)/sum(weights) - sum(b)/sum(weights) over the same rows, resampled
    together (weights None: every row counts 1, i.e. the difference of the two means)."""
    values_a, values_b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    counts = torch.ones_like(values_a) if weights is None else torch.tensor(weights, dtype=torch.float64)
    picks = torch.randint(len(values_a), (draws, len(values_a)), generator=torch.Generator().manual_seed(seed))
    differences = (values_a[picks].sum(1) - values_b[picks].sum(1)) / counts[picks].sum(1)
    low, high = torch.quantile(differences, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return low, high


def eval_rows(data: DataConfig, limit: int | None = None) -> Any:
    """The rows of ``data.split`` as prompt/completion (or text) rows, at most ``limit``, in file order."""
    data = dataclasses.replace(data, validation_fraction=0.0, max_samples=None)
    rows = prepare(data).train
    return rows.select(range(min(limit, len(rows)))) if limit else rows


def reference_pairs(rows: Any, limit: int) -> list[tuple[list[dict[str, str]], str | None]]:
    """(prompt messages, reference answer or None) for the first ``limit`` chat rows."""
    pairs = []
    for row in rows:
        if "prompt" in row and row["prompt"]:
            completion = row.get("completion") or []
            pairs.append((row["prompt"], completion[-1]["content"] if completion else None))
        if len(pairs) >= limit:
            break
    return pairs


# --- comparing a base with its adapters -------------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    """One model to evaluate: a base (adapter None) or a run's adapter on that base."""

    name: str
    model: ModelConfig
    adapter_dir: Path | None = None
    start_name: str | None = None   # a DPO/KTO/GRPO adapter: the candidate (adapter) it was trained on from


def model_label(cfg: ModelConfig) -> str:
    name = Path(cfg.source).name if "/" in cfg.source and Path(cfg.source).exists() else cfg.source
    bits = f"4-bit {cfg.quant_type}{' + dq' if cfg.double_quant else ''}" if cfg.bits == 4 else f"{cfg.bits}-bit"
    return f"base: {name} ({bits})"


def started_from(run_dir: Path) -> Path | None:
    """The adapter a preference run continued (run_info's ``started_from``), or None for a fresh LoRA / SFT."""
    path = run_dir / RUN_INFO_FILE
    try:
        start = json.loads(path.read_text(encoding="utf-8")).get("started_from") if path.is_file() else None
    except (OSError, ValueError):
        return None
    folder = Path(start) if start and start != "base model" else None
    return folder if folder is not None and has_adapter(folder) else None


def _start_candidate(cfg: ModelConfig, run_dir: Path) -> Candidate | None:
    folder = started_from(run_dir)
    if folder is None:
        return None
    run_id = folder.parent.name if folder.name == ADAPTER_DIR else folder.name
    return Candidate(adapter_name(run_id), cfg, folder)


def candidates(run_dirs: dict[str, Path]) -> list[Candidate]:
    """Each base of the chosen runs (once, at the bit width its runs trained on) followed by its runs' adapters;
    a preference-tuned adapter is preceded by the adapter it started from (once), so it is judged against both.

    An adapter is compared with the base it was trained on, quantization included, so the difference is the
    adapter's alone. The grouping is for speed: the chat engine keeps one base in memory, so walking the list in
    this order loads each base once (bases first, then adapters, reloaded every base a second time).
    """
    groups: dict[tuple[Any, ...], list[Candidate]] = {}
    for run_id, run_dir in run_dirs.items():
        try:
            cfg = load_config(run_dir / RUN_CONFIG).model
        except ConfigError as error:
            raise ValueError(f"Run '{run_id}' has an unreadable config: {error}") from None
        key = (cfg.source, cfg.bits, cfg.quant_type, cfg.double_quant, cfg.compute_dtype)
        group = groups.setdefault(key, [Candidate(model_label(cfg), cfg)])
        start = _start_candidate(cfg, run_dir)
        if start is not None and all(c.name != start.name for c in group):
            group.append(start)
        group.append(Candidate(adapter_name(run_id), cfg, run_dir / ADAPTER_DIR, start.name if start else None))
    # A start adapter that is also one of the chosen runs appears once, as that run.
    return [c for group in groups.values() for i, c in enumerate(group)
            if all(other.name != c.name for other in group[:i])]


def candidate_model(engine: Any, candidate: Candidate) -> tuple[Any, Any, Any]:
    """(model to call, tokenizer, context manager) for a candidate, from a ChatEngine that keeps bases loaded."""
    if candidate.adapter_dir is None:
        entry = engine.loaded(candidate.model)
        if entry.model is entry.base:
            return entry.base, entry.tokenizer, contextlib.nullcontext()
        return entry.model, entry.tokenizer, entry.model.disable_adapter()
    entry = engine.attach(candidate.model, candidate.name, candidate.adapter_dir)
    entry.model.set_adapter(candidate.name)
    return entry.model, entry.tokenizer, contextlib.nullcontext()


def candidate_loss(engine: Any, candidate: Candidate, rows: Any, batch_size: int = 4,
                   on_batch: Progress | None = None) -> LossResult:
    """The held-out loss, holding the engine's model for the whole pass (chat answers wait for their turn, so none
    switches adapters under it)."""
    with engine.exclusive():
        model, tokenizer, context = candidate_model(engine, candidate)
        with context:
            return dataset_loss(model, tokenizer, rows, batch_size=batch_size, on_batch=on_batch)


def candidate_answer(engine: Any, candidate: Candidate, prompt: list[dict[str, str]], max_new_tokens: int) -> str:
    """Greedy answer (temperature 0), so base and adapter differ only by the adapter. An answer cut by the
    server's time budget is scored as the model wrote it, without the note the Chat tab shows for it."""
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=0.0)
    history, question = prompt[:-1], prompt[-1]["content"]
    text = ""
    for text in engine.stream(question, history, candidate.model,
                              candidate.name if candidate.adapter_dir else None, candidate.adapter_dir, settings):
        pass
    return text.removesuffix(budget_note(engine.max_seconds))


def adapter_name(run_id: str, suffix: str = "") -> str:
    """A peft adapter name for a run, or for one checkpoint of it (``suffix``)."""
    return peft_adapter_name(run_id + (f"@{suffix}" if suffix else ""))


def run_checkpoints(run_dir: Path) -> list[tuple[str, Path]]:
    """(label, adapter folder) for each saved checkpoint of a run in step order, then the final adapter. A PiSSA or
    OLoRA run offers its final adapter only: its checkpoints hold the adapter relative to a base the start had
    changed, and loaded on the plain base they would be scored as a model that never existed."""
    configs = [path for path in (run_dir / RUN_CONFIG, run_dir / ADAPTER_DIR / CONFIG_COPY) if path.is_file()]
    try:
        base_changed = bool(configs) and load_config(configs[0]).lora.init in BASE_CHANGING
    except (ConfigError, OSError):
        base_changed = False
    found = [] if base_changed else [(step, folder) for step, folder in checkpoints(run_dir) if has_adapter(folder)]
    labelled = [(folder.name, folder) for _, folder in found]
    if has_adapter(run_dir / ADAPTER_DIR):
        labelled.append(("final adapter", run_dir / ADAPTER_DIR))
    return labelled


# --- overlap with the reference ------------------------------------------------------------------------------

def rouge_l(answer: str, reference: str | None) -> float | None:
    """ROUGE-L F1 (longest common word subsequence, 0..1) of an answer against a reference; None without one."""
    if not reference:
        return None
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"]).score(reference, answer or "")["rougeL"].fmeasure


# --- win rate from votes -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WinRate:
    adapter: str
    votes: int
    wins: int
    losses: int
    ties: int        # ties and "both bad" together: no preference between the two answers
    rate: float | None
    low: float | None
    high: float | None


def win_rate(adapter: str, counts: dict[str, int]) -> WinRate:
    """Win rate of an adapter against its base; a tie (or 'both bad') counts as half a win and half a loss."""
    wins, losses = int(counts.get("wins", 0)), int(counts.get("losses", 0))
    ties = int(counts.get("ties", 0)) + int(counts.get("both_bad", 0))
    votes = wins + losses + ties
    if votes == 0:
        return WinRate(adapter, 0, 0, 0, 0, None, None, None)
    score = wins + 0.5 * ties
    low, high = wilson_interval(score, votes)
    return WinRate(adapter, votes, wins, losses, ties, score / votes, low, high)


def read_win_counts(db_path: str | Path) -> dict[str, dict[str, int]]:
    """Vote counts per adapter from the feedback store; empty when its database does not exist yet."""
    path = Path(db_path)
    return FeedbackStore(path).win_counts() if path.is_file() else {}


# --- reward model (optional) ---------------------------------------------------------------------------------

def reward_models(manager: Any) -> dict[str, Path]:
    """run id -> saved reward model of every finished reward run, newest first; empty before the RLHF stage."""
    finder = getattr(manager, "reward_models", None)
    return finder() if finder else {}


def load_eval_rows(source: str, split: str, limit: int | None) -> Any:
    """eval_rows with a user-facing error for a bad dataset or split; the source is a request's, so it passes the
    path gate first (a refused path raises the gate's one message)."""
    try:
        return eval_rows(DataConfig(source=paths.data_source(source), split=split), limit)
    except (ConfigError, DataError) as error:
        raise ValueError(str(error)) from None


# --- degenerate answers --------------------------------------------------------------------------------------

TOKEN = re.compile(r"\w+|[^\w\s]")
# Thresholds for "this answer has collapsed". Ordinary prose repeats few of its word 3-grams (a paragraph of the
# bundled answers: under 5%), and no phrase of 3+ tokens back to back; issue 15's collapsed DPO answers
# ("Rule of thumb: Rule of thumb: ...") repeat most of theirs.
MAX_REPEATED_3GRAMS = 0.3   # share of an answer's 3-grams that repeat an earlier one
MIN_DISTINCT_2 = 0.5        # distinct bigrams / bigrams, for answers long enough to judge (>= 8 tokens)
MIN_WORDS = 3               # fewer is an empty or cut-off answer
STUTTER_TOKENS = 3          # a phrase of this many tokens or more, repeated immediately
STUTTER_LONGEST = 16        # longer phrases are caught by the 3-gram share, at a fraction of the cost


@dataclass(frozen=True)
class Degeneration:
    words: int                # tokens (words and punctuation marks)
    distinct_2: float         # distinct bigrams / bigrams (1.0 for answers too short to have two)
    repeated_3grams: float    # share of 3-grams that already occurred earlier in the answer
    problem: str | None       # what looks collapsed, or None

    @property
    def degenerate(self) -> bool:
        return self.problem is not None


def _tokens(text: str) -> list[str]:
    return TOKEN.findall((text or "").lower())


def _ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(tokens: list[str], n: int) -> float:
    grams = _ngrams(tokens, n)
    return len(set(grams)) / len(grams) if grams else 1.0


def repeated_share(tokens: list[str], n: int) -> float:
    grams = _ngrams(tokens, n)
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def stutter(tokens: list[str], shortest: int = STUTTER_TOKENS) -> str | None:
    """The first phrase of ``shortest`` or more tokens that is followed at once by itself, e.g. 'rule of thumb :'."""
    for size in range(shortest, min(len(tokens) // 2, STUTTER_LONGEST) + 1):
        for start in range(len(tokens) - 2 * size + 1):
            if tokens[start:start + size] == tokens[start + size:start + 2 * size]:
                return " ".join(tokens[start:start + size])
    return None


def degeneration(text: str) -> Degeneration:
    tokens = _tokens(text)
    distinct, repeated = distinct_n(tokens, 2), repeated_share(tokens, 3)
    problem = None
    if len(tokens) < MIN_WORDS:
        problem = f"empty or cut short ({len(tokens)} tokens)"
    elif (phrase := stutter(tokens)) is not None:
        problem = f"repeats '{phrase}' back to back"
    elif repeated > MAX_REPEATED_3GRAMS:
        problem = f"{repeated:.0%} of its 3-grams are repeats"
    elif len(tokens) >= 8 and distinct < MIN_DISTINCT_2:
        problem = f"only {distinct:.0%} distinct bigrams"
    return Degeneration(len(tokens), round(distinct, 3), round(repeated, 3), problem)


# --- verdicts: paired comparisons on held-out prompts ------------------------------------------------------------

NO_HELD_OUT = "no held-out data: no verdict"


@dataclass(frozen=True)
class JudgeAccuracy:
    """A reward model's accuracy on its held-out pairs (chosen scored above rejected) with its 95% interval."""

    accuracy: float | None
    pairs: int
    low: float | None = None
    high: float | None = None

    @property
    def proven(self) -> bool:
        """Ranks held-out pairs better than a coin, beyond the interval's doubt."""
        return self.low is not None and self.low > 0.5

    def text(self) -> str:
        if self.accuracy is None or not self.pairs:
            return "held-out accuracy: none (no held-out pairs), so its scores are not shown to mean anything"
        return (f"held-out accuracy {self.accuracy:.2f} (95% CI {self.low:.2f}-{self.high:.2f}, "
                f"{self.pairs} pairs)")


def judge_accuracy(reward_run_dir: Path) -> JudgeAccuracy:
    """The held-out accuracy of the reward model a run saved (the last one logged, or the best step's when the run
    kept its best checkpoint), and how many held-out pairs it rests on."""
    info_path = reward_run_dir / RUN_INFO_FILE
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        pairs = int(info.get("eval_rows") or 0)
    except (OSError, ValueError):
        info, pairs = {}, 0
    kept_step = info.get("best_step") if info.get("kept") == "best" else None
    values = [r["eval_accuracy"] for r in read_metrics(reward_run_dir) if isinstance(r.get("eval_accuracy"),
              (int, float)) and (kept_step is None or r.get("step") == kept_step)]
    if not values or not pairs:
        return JudgeAccuracy(None, 0)
    low, high = wilson_interval(values[-1] * pairs, pairs)
    return JudgeAccuracy(values[-1], pairs, low, high)


@dataclass(frozen=True)
class PairedVerdict:
    """One model against another on the same held-out prompts, scored by the reward model."""

    model: str
    against: str
    prompts: int
    wins: int
    losses: int
    ties: int
    low: float | None           # 95% Wilson interval of the win rate (ties count half)
    high: float | None
    mean_difference: float | None
    degenerate: int             # the model's answers flagged as degenerate
    verdict: str                # 'better', 'worse', 'cannot tell' or 'no verdict'
    reason: str

    def text(self) -> str:
        if self.verdict == "no verdict":
            return f"`{self.model}` vs `{self.against}`: **{self.reason}**"
        rate = (self.wins + 0.5 * self.ties) / self.prompts
        return (f"`{self.model}` vs `{self.against}` on {self.prompts} held-out prompts: wins {self.wins}, losses "
                f"{self.losses}, ties {self.ties}; win rate {rate:.2f} (95% CI {self.low:.2f}-{self.high:.2f}), "
                f"mean reward difference {self.mean_difference:+.3f} -> **{self.verdict}**: {self.reason}")


def paired_verdict(model: str, against: str, model_scores: list[float], other_scores: list[float],
                   model_answers: list[str], judge: JudgeAccuracy | None = None, tie: float = 1e-6
                   ) -> PairedVerdict:
    """Per prompt, does the model's answer score above the other's? A verdict only where the interval of the
    win rate excludes 0.5, the model's answers have not collapsed, and the judge is shown to beat chance."""
    n = len(model_scores)
    if n == 0:
        return PairedVerdict(model, against, 0, 0, 0, 0, None, None, None, 0, "no verdict", NO_HELD_OUT)
    differences = [m - o for m, o in zip(model_scores, other_scores)]
    wins, losses = sum(d > tie for d in differences), sum(d < -tie for d in differences)
    ties = n - wins - losses
    low, high = wilson_interval(wins + 0.5 * ties, n)
    degenerate = sum(degeneration(a).degenerate for a in model_answers)
    verdict, reason = _verdict(low, high, degenerate, n, judge)
    return PairedVerdict(model, against, n, wins, losses, ties, low, high, sum(differences) / n, degenerate,
                         verdict, reason)


def _verdict(low: float, high: float, degenerate: int, n: int, judge: JudgeAccuracy | None) -> tuple[str, str]:
    """'better'/'worse' only when the interval clears 0.5 and nothing undercuts the judge or the answers."""
    doubts = []
    if judge is not None and not judge.proven:
        doubts.append(f"the reward model is not shown to rank held-out pairs better than chance ({judge.text()})")
    if degenerate:
        doubts.append(f"{degenerate} of {n} answers are degenerate (repeated phrases or empty), so not better "
                      "whatever the reward model says")
    if high < 0.5 and not (judge is not None and not judge.proven):
        return "worse", "; ".join(["the whole interval is below 0.5", *doubts])
    if doubts:
        return "cannot tell", "; ".join(doubts)
    if low > 0.5:
        return "better", "the whole interval is above 0.5"
    return "cannot tell", "the interval includes 0.5: these prompts cannot tell the two apart"


# --- a policy against its base and its starting adapter ------------------------------------------------------

@dataclass
class PolicyComparison:
    """Greedy answers of each model to the same held-out prompts, reward scores, degeneration, verdicts."""

    prompts: list[str]
    models: list[str]                                       # the policy last
    answers: dict[str, list[str]] = field(default_factory=dict)
    scores: dict[str, list[float]] = field(default_factory=dict)
    verdicts: list[PairedVerdict] = field(default_factory=list)

    def rows(self) -> list[dict[str, Any]]:
        table = []
        for p, prompt in enumerate(self.prompts):
            for name in self.models:
                answer = self.answers[name][p]
                check = degeneration(answer)
                table.append({"prompt": prompt, "model": name, "answer": answer,
                              "reward": round(self.scores[name][p], 3), "tokens": check.words,
                              "distinct-2": check.distinct_2, "repeated 3-grams": check.repeated_3grams,
                              "degenerate": check.problem or ""})
        return table


def compare_policy_answers(engine: Any, scorer: Any, policy: Candidate, others: list[Candidate], prompts: list[str],
                   max_new_tokens: int = 64, judge: JudgeAccuracy | None = None,
                   on_answer: Progress | None = None) -> PolicyComparison:
    """The policy against each of ``others`` (its base, its starting adapter) on held-out ``prompts`` only:
    greedy answers from the Chat tab's engine, model by model (one base load), scored by the reward model."""
    models = [*others, policy]
    result = PolicyComparison(list(prompts), [m.name for m in models])
    for m, candidate in enumerate(models):
        answers = []
        for p, prompt in enumerate(prompts):
            answers.append(candidate_answer(engine, candidate, [{"role": "user", "content": prompt}],
                                            max_new_tokens).strip())
            if on_answer:
                on_answer(m * len(prompts) + p + 1, len(models) * len(prompts))
        result.answers[candidate.name] = answers
        result.scores[candidate.name] = scorer.score(list(prompts), answers) if prompts else []
    for other in others:
        result.verdicts.append(paired_verdict(policy.name, other.name, result.scores[policy.name],
                                              result.scores[other.name], result.answers[policy.name], judge))
    return result


def start_run_dir(run_dir: Path) -> Path | None:
    """The run folder of the adapter a preference run started from (None: a fresh LoRA, or not a run's)."""
    folder = started_from(run_dir)
    if folder is None:
        return None
    parent = folder.parent if folder.name == ADAPTER_DIR else folder
    return parent if (parent / RUN_CONFIG).is_file() else None


def trained_prompts(run_dir: Path) -> set[str]:
    """prompt_key of every prompt a run trained on: its preference split's training side, or an SFT run's
    training rows. Raises ValueError when the run's data cannot be read again (then nothing can be held out
    from it with certainty)."""
    try:
        cfg = load_config(run_dir / RUN_CONFIG)
        if cfg.stage == "sft":
            rows = prepare(cfg.data, seed=cfg.training.seed).train  # without a tokenizer: a superset, never fewer
            return {prompt_key(row["prompt"]) for row in rows if row.get("prompt")}
        return trained_prompt_keys(cfg.data, cfg.preference.format, cfg.training.seed)
    except (ConfigError, DataError, OSError) as error:
        raise ValueError(f"Could not read what run '{run_dir.name}' trained on: {error}") from None
