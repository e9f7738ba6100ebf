"""Evaluation: loss/perplexity math on the tiny model, the win-rate interval, and a real adapter beating its base.

Everything runs for real: the tiny random Llama, a LoRA adapter trained in-process with TRL, the ChatEngine that
attaches it, rouge-score, and the SQLite feedback store.
"""

from __future__ import annotations

import math

import pytest
import torch


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def qa_rows(tmp_path_factory):
    from finetune.core.config import DataConfig
    from finetune.services.evaluate import eval_rows
    from helpers import write_jsonl

    rows = [{"prompt": f"Question {i}: what does rank {i} change in LoRA?",
             "completion": f"🧪 Lab note: rank {i} sets the adapter size.\nRule of thumb: start with {i * 2}."}
            for i in range(1, 12)]
    path = write_jsonl(tmp_path_factory.mktemp("eval") / "qa.jsonl", rows)
    return eval_rows(DataConfig(source=str(path)))


# --- loss and perplexity math --------------------------------------------------------------------------------

def test_prompt_tokens_are_not_counted(tiny, qa_rows):
    from finetune.services.evaluate import IGNORE, encode_row

    _, tokenizer = tiny
    ids, labels = encode_row(qa_rows[0], tokenizer, 512)
    counted = tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE])
    assert "Lab note: rank 1 sets the adapter size" in counted
    assert "Question 1" not in counted  # the prompt is context, not scored
    assert labels[0] == IGNORE and len(ids) == len(labels)


def test_dataset_loss_matches_transformers_own_loss(tiny, qa_rows):
    """Token-weighted mean NLL = HF's per-row mean loss re-weighted by each row's counted tokens."""
    from finetune.services.evaluate import IGNORE, dataset_loss, encode_row

    model, tokenizer = tiny
    result = dataset_loss(model, tokenizer, qa_rows, batch_size=4)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for row in qa_rows:
            ids, labels = encode_row(row, tokenizer, 512)
            out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
            counted = sum(1 for label in labels[1:] if label != IGNORE)
            total, tokens = total + float(out.loss) * counted, tokens + counted
    assert result.tokens == tokens and result.rows == len(qa_rows)
    assert result.loss == pytest.approx(total / tokens, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.loss), rel=1e-9)


def test_padding_and_batch_size_do_not_change_the_loss(tiny, qa_rows):
    from finetune.services.evaluate import dataset_loss

    model, tokenizer = tiny
    seen = []
    one = dataset_loss(model, tokenizer, qa_rows, batch_size=1)
    five = dataset_loss(model, tokenizer, qa_rows, batch_size=5, on_batch=lambda d, t: seen.append((d, t)))
    assert five.loss == pytest.approx(one.loss, rel=1e-5)
    assert seen == [(1, 3), (2, 3), (3, 3)]  # progress per batch


def test_a_uniform_model_has_perplexity_equal_to_its_vocabulary(tiny_model_dir, qa_rows):
    """All-zero (tied) embeddings make every logit 0: each token has probability 1/V, so perplexity is exactly V."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.services.evaluate import dataset_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.zero_()
    result = dataset_loss(model, AutoTokenizer.from_pretrained(tiny_model_dir), qa_rows, batch_size=3)
    vocab = model.config.vocab_size
    assert result.loss == pytest.approx(math.log(vocab), rel=1e-6)
    assert result.perplexity == pytest.approx(vocab, rel=1e-5)


def test_empty_rows_give_a_clear_error(tiny):
    from finetune.services.evaluate import dataset_loss

    with pytest.raises(ValueError, match="No evaluation rows"):
        dataset_loss(*tiny, [])


# --- win rate and its interval -----------------------------------------------------------------------------

def test_wilson_interval_matches_the_textbook_example():
    from finetune.core.intervals import wilson_interval

    # 8 of 10 successes: the Wilson 95% interval is 0.490 to 0.943 (Newcombe 1998, a standard worked example).
    low, high = wilson_interval(8, 10)
    assert (round(low, 3), round(high, 3)) == (0.490, 0.943)
    low, high = wilson_interval(0, 10)  # unlike p ± z·SE it does not collapse to a point at p = 0
    assert low == 0.0 and round(high, 3) == 0.278


def test_win_rate_counts_ties_and_both_bad_as_half():
    from finetune.core.intervals import wilson_interval
    from finetune.services.evaluate import win_rate

    rate = win_rate("run-a", {"wins": 6, "losses": 2, "ties": 1, "both_bad": 1})
    assert (rate.votes, rate.wins, rate.losses, rate.ties) == (10, 6, 2, 2)
    assert rate.rate == pytest.approx(0.7)
    assert (rate.low, rate.high) == pytest.approx(wilson_interval(7, 10))
    assert rate.low < rate.rate < rate.high
    empty = win_rate("run-b", {"wins": 0, "losses": 0, "ties": 0, "both_bad": 0})
    assert empty.votes == 0 and empty.rate is None and empty.low is None


def test_more_votes_narrow_the_interval():
    from finetune.services.evaluate import win_rate

    few = win_rate("a", {"wins": 7, "losses": 3})
    many = win_rate("a", {"wins": 70, "losses": 30})
    assert few.rate == many.rate
    assert many.high - many.low < few.high - few.low
    assert few.low < 0.5 < few.high and many.low > 0.5  # 70/30 is significant, 7/3 is not


def test_win_rates_read_from_the_real_feedback_store(tmp_path):
    from components.eval_tab import win_rates
    from finetune.services.feedback import FeedbackStore

    db = tmp_path / "feedback.db"
    table, note = win_rates(db)
    assert table.empty and "No votes yet" in note
    store = FeedbackStore(db)
    for choice in ("second", "second", "first", "tie"):  # the tuned answer is second: 2 wins, 1 loss, 1 tie
        ids = store.record_turn(model="m", adapter="run-x", prompt="q", base_history=[], tuned_history=[],
                                settings={}, base_response="b", tuned_response="t")
        store.add_preference(ids["base"], ids["tuned"], choice)
    store.close()
    table, note = win_rates(db)
    row = table.iloc[0]
    assert (row["adapter"], row["votes"], row["wins"], row["losses"]) == ("run-x", 4, 2, 1)
    assert row["win rate"] == pytest.approx(0.625) and row["95% CI low"] < 0.5 < row["95% CI high"]
    assert "half a win" in note


def test_rouge_l_scores_overlap():
    from finetune.services.evaluate import rouge_l

    assert rouge_l("the adapter learns the style", "the adapter learns the style") == pytest.approx(1.0)
    assert rouge_l("completely unrelated words", "the adapter learns the style") == 0.0
    assert 0 < rouge_l("the adapter learns", "the adapter learns the style") < 1
    assert rouge_l("anything", None) is None


# --- a trained adapter against its base -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(style_run):
    """A real tiny LoRA run (4-bit base), trained on the style the eval rows share (shared, see conftest)."""
    return style_run


@pytest.mark.trajectory
def test_adapter_has_lower_validation_loss_than_its_base(trained_run):
    from finetune.services.chat import ChatEngine
    from finetune.core.config import DataConfig
    from finetune.services.evaluate import candidate_loss, candidates, eval_rows

    run_dir, data = trained_run
    rows = eval_rows(DataConfig(source=str(data)), limit=8)
    chosen = candidates({"tiny-style": run_dir})
    assert [c.adapter_dir is None for c in chosen] == [True, False]
    assert chosen[0].name.startswith("base: ") and "4-bit" in chosen[0].name  # the base it trained on
    engine = ChatEngine()
    base, tuned = (candidate_loss(engine, c, rows) for c in chosen)
    assert tuned.loss < base.loss - 0.1, (base, tuned)  # measured: about 10.8 -> 10.5 after 8 steps
    assert base.tokens == tuned.tokens
    # Evaluating the base again after the adapter was attached still gives the base (adapter disabled).
    assert candidate_loss(engine, chosen[0], rows).loss == pytest.approx(base.loss, rel=1e-4)
    assert engine.base_loads == 1


def test_runs_on_different_bases_load_each_base_once(trained_run, tmp_path):
    """Two runs on two bases (4-bit and 32-bit), three prompts: each base loads once, not once per prompt."""
    import shutil

    from components.eval_tab import compare_generations, evaluate_loss
    from finetune.services.chat import ChatEngine
    from finetune.core.config import load_config, save_config
    from finetune.services.scoring import ScorerCache
    from finetune.services.runs import RunManager

    run_dir, data = trained_run
    manager = RunManager(tmp_path / "runs")
    for name, bits in (("run-4bit", 4), ("run-32bit", 32)):
        shutil.copytree(run_dir, manager.root / name)
        cfg = load_config(manager.root / name / "config.yaml")
        cfg.model.bits = bits
        save_config(cfg, manager.root / name / "config.yaml")
    engine = ChatEngine()
    frame, _ = compare_generations(manager, engine, ScorerCache(), ["run-4bit", "run-32bit"], str(data), "train",
                                   3, 4)
    assert engine.base_loads == 2 and len(frame) == 3 * 4
    assert frame["model"].tolist()[:4] == [frame["model"][0], "run-4bit", frame["model"][2], "run-32bit"]
    assert "4-bit" in frame["model"][0] and "32-bit" in frame["model"][2]
    engine = ChatEngine()
    evaluate_loss(manager, engine, ["run-4bit", "run-32bit"], str(data), "train", 4, 4)
    assert engine.base_loads == 2


def test_checkpoints_are_listed_and_answer(trained_run):
    from finetune.services.chat import ChatEngine
    from finetune.core.config import load_config
    from finetune.services.evaluate import Candidate, adapter_name, candidate_answer, run_checkpoints

    run_dir, _ = trained_run
    saved = run_checkpoints(run_dir)
    assert [label for label, _ in saved] == ["checkpoint-4", "checkpoint-8", "final adapter"]
    cfg = load_config(run_dir / "config.yaml").model
    engine = ChatEngine()
    answers = [candidate_answer(engine, Candidate(adapter_name("tiny", label), cfg, folder),
                                [{"role": "user", "content": "What does setting 3 control in LoRA?"}], 6)
               for label, folder in saved]
    assert all(isinstance(a, str) and a for a in answers)


def test_an_answer_cut_by_the_time_budget_is_scored_without_the_chat_note(trained_run):
    """Evaluate scores what the model wrote: the Chat tab's '[cut: ...]' note is not part of the answer."""
    import itertools

    from finetune.services.chat import ChatEngine, budget_note
    from finetune.core.config import load_config
    from finetune.services.evaluate import Candidate, candidate_answer

    run_dir, _ = trained_run
    cfg = load_config(run_dir / "config.yaml").model
    ticks = itertools.count()
    engine = ChatEngine(max_seconds=3, clock=lambda: float(next(ticks)))  # one second per read: ~3 tokens
    prompt = [{"role": "user", "content": "What does setting 3 control in LoRA?"}]
    answer = candidate_answer(engine, Candidate("tiny", cfg, run_dir / "adapter"), prompt, 40)
    streamed = list(engine.stream(prompt[0]["content"], [], cfg, "tiny", run_dir / "adapter"))[-1]
    assert streamed.endswith(budget_note(3)) and answer  # the budget did cut it...
    assert "[cut:" not in answer  # ...and the scored answer carries no note


def test_eval_tab_handlers_report_bad_input(trained_run, tmp_path):
    import gradio as gr

    from components.eval_tab import checkpoint_answers, evaluate_loss
    from finetune.services.chat import ChatEngine
    from finetune.services.runs import RunManager

    manager, engine = RunManager(tmp_path / "runs"), ChatEngine()
    with pytest.raises(gr.Error, match="Pick at least one finished run"):
        evaluate_loss(manager, engine, [], "bundled:course_qa", "validation", 4, 4)
    with pytest.raises(gr.Error, match="No saved adapter"):
        evaluate_loss(manager, engine, ["nope"], "bundled:course_qa", "validation", 4, 4)
    with pytest.raises(gr.Error, match="Type a prompt"):
        checkpoint_answers(manager, engine, "nope", "  ", 16)


def test_side_by_side_generations_with_rouge_and_reward(trained_run, tiny_model_dir, tmp_path):
    """Greedy answers of base and adapter, ROUGE-L against the reference, and (once a real reward run exists,
    trained here with TRL's RewardTrainer on the tiny model) a reward score per answer."""
    import shutil

    from components.eval_tab import add_reward_scores, compare_generations
    from helpers import write_jsonl
    from finetune.services.chat import ChatEngine
    from finetune.core.config import from_dict, save_config
    from finetune.services.scoring import ScorerCache
    from finetune.services.runs import RunManager
    from finetune.train import run

    run_dir, data = trained_run
    manager = RunManager(tmp_path / "runs")
    shutil.copytree(run_dir, manager.root / "tiny-style")
    scorers = ScorerCache()
    assert "No reward model yet" in add_reward_scores(manager, scorers, None, [], [])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": f"What does setting {i} control?", "chosen": f"🧪 Lab note: setting {i} controls the adapter.",
         "rejected": "It depends."} for i in range(8)])
    reward_cfg = from_dict({
        "run_name": "reward", "stage": "reward", "model": {"source": str(tiny_model_dir), "bits": 32},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
        "data": {"source": str(pairs), "max_seq_length": 64, "validation_fraction": 0.0},
        "training": {"learning_rate": 0.01, "max_steps": 2, "batch_size": 4, "eval_steps": 0, "save_steps": 100,
                     "warmup_ratio": 0.0}})
    save_config(reward_cfg, manager.root / "reward" / "config.yaml")
    assert run(reward_cfg, manager.root / "reward") == 0
    frame, summary = compare_generations(manager, ChatEngine(), scorers, ["tiny-style"], str(data), "train", 2, 6)
    assert len(frame) == 4 and frame["model"].tolist()[1::2] == ["tiny-style", "tiny-style"]
    assert frame["reference"].str.contains("Lab note").all()
    assert frame["ROUGE-L"].between(0, 1).all()
    assert frame["reward"].notna().all() and frame["reward"].nunique() > 1
    assert "Mean ROUGE-L" in summary and "Mean reward (run `reward`)" in summary
    assert {"tokens", "distinct-2", "repeated 3-grams", "degenerate"} <= set(frame.columns)
    # These prompts are the run's own training prompts ("train" split): the verdict refuses to use them.
    assert "`tiny-style` vs `base" in summary and "no held-out data: no verdict" in summary
    assert "held-out accuracy: none (no held-out pairs)" in summary  # the reward run held nothing out
    again, _ = compare_generations(manager, ChatEngine(), scorers, ["tiny-style"], str(data), "train", 2, 6)
    assert again["reward"].tolist() == frame["reward"].tolist() and scorers.loads == 1  # loaded once, reused


def test_loss_summary_compares_each_adapter_with_its_own_base(tmp_path):
    import pandas as pd

    from components.eval_tab import LOSS_COLUMNS, _loss_summary
    from finetune.core.config import ModelConfig
    from finetune.services.evaluate import Candidate, model_label

    four, sixteen = ModelConfig(bits=4), ModelConfig(bits=16)
    chosen = [Candidate(model_label(four), four), Candidate(model_label(sixteen), sixteen),
              Candidate("run-a", four, tmp_path), Candidate("run-b", sixteen, tmp_path)]
    losses = [3.0, 2.0, 2.5, 2.2]
    frame = pd.DataFrame([[c.name, x, 0.0, 10, 2] for c, x in zip(chosen, losses)], columns=LOSS_COLUMNS)
    summary = _loss_summary(frame, chosen)
    assert "`run-a`: loss 2.5000 (lower than its base by 0.5000)" in summary
    assert "`run-b`: loss 2.2000 (higher than its base by 0.2000)" in summary


# --- degenerate answers and honest verdicts ---------------------------------------------------------------------

def test_a_collapsed_answer_is_flagged_and_a_normal_one_is_not():
    from finetune.services.evaluate import degeneration

    collapsed = degeneration("Rule of thumb: Rule of thumb: Rule of thumb: Rule of thumb: Rule of thumb:")
    assert collapsed.degenerate and "rule of thumb" in collapsed.problem
    assert collapsed.repeated_3grams > 0.5 and collapsed.distinct_2 < 0.5
    once = degeneration("🧪 Lab note: the rank sets the adapter size.\nRule of thumb: Rule of thumb: start at 8.")
    assert once.degenerate  # one stutter is already a collapse sign
    normal = degeneration("🧪 Lab note: LoRA trains two small matrices per targeted layer while the base stays "
                          "frozen.\nRule of thumb: start with rank 8 and raise it only if the loss stalls.")
    assert not normal.degenerate and normal.repeated_3grams == 0 and normal.words > 20
    assert degeneration("").degenerate and degeneration("Yes.").degenerate  # empty or cut short
    looping = degeneration(" ".join(["the adapter learns the style and"] * 6))
    assert looping.degenerate


def test_no_bundled_answer_counts_as_degenerate():
    import json

    from helpers import ROOT
    from finetune.services.evaluate import degeneration

    answers = []
    for name in ("course_prefs/train.jsonl", "course_prefs/validation.jsonl", "course_qa/train.jsonl"):
        for line in (ROOT / "data" / name).read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            answers += [row[k] for k in ("chosen", "rejected", "completion") if isinstance(row.get(k), str)]
    assert len(answers) > 400
    assert [a for a in answers if degeneration(a).degenerate] == []


def test_verdict_needs_an_interval_clear_of_one_half():
    from finetune.services.evaluate import paired_verdict

    fine = ["🧪 Lab note: a clear answer with several different words in it."] * 8
    close = paired_verdict("dpo", "base", [1.0, 0.0, 1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 1.0, 0.0, 0.0], fine[:6])
    assert (close.wins, close.losses, close.verdict) == (4, 2, "cannot tell") and close.low < 0.5 < close.high
    assert "interval includes 0.5" in close.reason and "cannot tell" in close.text()
    clear = paired_verdict("dpo", "base", [2.0] * 8, [1.0] * 8, fine)
    assert clear.verdict == "better" and clear.low > 0.5 and "-> **better**" in clear.text()
    worse = paired_verdict("dpo", "base", [0.0] * 8, [1.0] * 8, fine)
    assert worse.verdict == "worse" and worse.high < 0.5
    ties = paired_verdict("dpo", "base", [1.0] * 8, [1.0] * 8, fine)
    assert (ties.ties, ties.verdict) == (8, "cannot tell")


def test_degenerate_answers_or_an_unproven_judge_never_earn_better():
    from finetune.core.intervals import wilson_interval
    from finetune.services.evaluate import NO_HELD_OUT, JudgeAccuracy, paired_verdict

    collapsed = ["Rule of thumb: Rule of thumb: Rule of thumb:"] + ["🧪 Lab note: a clear and varied answer."] * 7
    verdict = paired_verdict("dpo", "sft", [2.0] * 8, [1.0] * 8, collapsed)
    assert verdict.verdict == "cannot tell" and verdict.degenerate == 1 and "degenerate" in verdict.reason
    fine = ["🧪 Lab note: a clear and varied answer."] * 8
    memorised = JudgeAccuracy(1.0, 2, *wilson_interval(2, 2))  # 2 of 2 held-out pairs: could be luck
    assert not memorised.proven and "2 pairs" in memorised.text()
    assert paired_verdict("dpo", "sft", [2.0] * 8, [1.0] * 8, fine, memorised).verdict == "cannot tell"
    trusted = JudgeAccuracy(0.9, 40, *wilson_interval(36, 40))
    assert trusted.proven and paired_verdict("dpo", "sft", [2.0] * 8, [1.0] * 8, fine, trusted).verdict == "better"
    assert "none (no held-out pairs)" in JudgeAccuracy(None, 0).text() and not JudgeAccuracy(None, 0).proven
    empty = paired_verdict("dpo", "base", [], [], [])
    assert empty.verdict == "no verdict" and empty.reason == NO_HELD_OUT and NO_HELD_OUT in empty.text()


def test_the_held_out_minimum_is_where_three_in_four_beats_chance():
    from finetune.core.intervals import wilson_interval
    from finetune.core.preference import MIN_HELD_OUT_FOR_VERDICT as n

    assert wilson_interval(0.75 * n, n)[0] > 0.5
    assert all(wilson_interval(0.75 * m, m)[0] <= 0.5 for m in range(4, n, 4))


def test_loss_summary_compares_a_policy_with_its_start_as_well_as_its_base(tmp_path):
    """Issue 15: DPO's loss was lower than the base's and far above the SFT adapter it started from."""
    import pandas as pd

    from components.eval_tab import LOSS_COLUMNS, _loss_summary
    from finetune.core.config import ModelConfig
    from finetune.services.evaluate import Candidate, model_label

    four = ModelConfig(bits=4)
    chosen = [Candidate(model_label(four), four), Candidate("sft", four, tmp_path),
              Candidate("dpo", four, tmp_path, start_name="sft")]
    frame = pd.DataFrame([[c.name, x, 0.0, 10, 2] for c, x in zip(chosen, [4.47, 3.37, 4.09])], columns=LOSS_COLUMNS)
    summary = _loss_summary(frame, chosen)
    assert ("`dpo`: loss 4.0900 (lower than its base by 0.3800; higher than `sft`, the adapter it started from by "
            "0.7200)") in summary


def test_candidates_put_a_policys_start_adapter_beside_it(style_run, tmp_path):
    import json
    import shutil

    from finetune.services.evaluate import candidates

    run_dir, _ = style_run
    policy = tmp_path / "dpo"
    shutil.copytree(run_dir, policy)
    (policy / "run_info.json").write_text(json.dumps({"started_from": str(run_dir / "adapter")}))
    names = [(c.name, c.start_name) for c in candidates({"dpo": policy})]
    assert [n for n, _ in names[1:]] == ["tiny-style", "dpo"] and names[2][1] == "tiny-style"
    both = [c.name for c in candidates({"tiny-style": run_dir, "dpo": policy})]
    assert both.count("tiny-style") == 1 and len(both) == 3


def test_loss_differences_carry_a_paired_bootstrap_interval(tiny, qa_rows):
    """The same model against itself: difference 0 and an interval of exactly 0; against a perturbed copy: an
    interval that holds the observed difference and excludes 0 when every row got worse."""
    import copy

    from finetune.services.evaluate import dataset_loss, loss_difference_interval

    model, tokenizer = tiny
    first = dataset_loss(model, tokenizer, qa_rows, batch_size=4)
    assert len(first.row_nll) == first.rows and sum(t for _, t in first.row_nll) == first.tokens
    assert sum(n for n, _ in first.row_nll) / first.tokens == pytest.approx(first.loss)
    assert loss_difference_interval(first, first) == (0.0, 0.0)
    worse = copy.deepcopy(model)
    with torch.no_grad():
        worse.lm_head.weight.add_(torch.randn_like(worse.lm_head.weight) * 0.5)
    second = dataset_loss(worse, tokenizer, qa_rows, batch_size=2)
    low, high = loss_difference_interval(second, first)
    assert low <= second.loss - first.loss <= high and low < high
    assert loss_difference_interval(second, dataset_loss(model, tokenizer, qa_rows.select(range(3)))) is None


def test_the_loss_interval_excludes_zero_only_when_the_rows_agree():
    from finetune.services.evaluate import LossResult, loss_difference_interval

    def result(row_nll):
        tokens = sum(t for _, t in row_nll)
        return LossResult(sum(n for n, _ in row_nll) / tokens, 1.0, tokens, len(row_nll), tuple(row_nll))

    base = result([(10.0, 5), (20.0, 10), (6.0, 3), (8.0, 4)] * 5)
    every_row_better = result([(n - 1.0, t) for n, t in base.row_nll])
    low, high = loss_difference_interval(every_row_better, base)
    assert high < 0
    mixed = result([(n + (3.0 if i % 2 else -3.0), t) for i, (n, t) in enumerate(base.row_nll)])
    low, high = loss_difference_interval(mixed, base)
    assert low < 0 < high


@pytest.mark.parametrize("held", range(1, 16))
def test_the_small_data_warning_names_the_bar_the_course_verdict_applies(held):
    """Before a run, the warning says which results a held-out set of this size can tell from chance; after it, the
    course's reward sentence must agree for every possible score (a 4-of-4 result said 'better than chance' while
    the warning had said to expect 'cannot tell')."""
    from finetune.core.intervals import fewest_right_beyond_chance
    from finetune.core.preference import held_out_warning
    from finetune.services.course import reward_sentence

    needed, warning = fewest_right_beyond_chance(held), held_out_warning(held, "pairs")
    for right in range(held + 1):
        told = "better than chance" in reward_sentence(right / held, held)
        assert told == (needed is not None and right >= needed), (right, held, warning)
    if needed is None:
        assert "no result at all can be told from chance" in warning
    else:
        assert (f"all {held} right" if needed == held else f"{needed} of {held} ({needed / held:.2f}) or more right") \
            in warning
