"""The course's "what to notice" sentences, its per-visitor progress store and the lab report (issue 31).

Every sentence is a pure function of the numbers a step measured: changing a number changes the sentence, and
nothing in it is a template's example. The report holds only the visitor's own runs and votes, and no server path.
"""

from __future__ import annotations

import json
import re

import pytest

from finetune.core import paths
from finetune.core.access import LOCAL, Visitor
from finetune.core.course_progress import CourseProgress, visitor_key
from finetune.services import course


def _numbers(text: str) -> list[str]:
    return re.findall(r"\d[\d,.]*", text)


@pytest.mark.parametrize("rank", [1, 4, 16, 64])
def test_the_lora_sentence_is_the_learners_count(rank):
    trainable, total = rank * 305_280, 134_515_008 + rank * 305_280
    text = course.lora_sentence(rank, trainable, total, 210)
    assert text.startswith(f"Rank {rank} trains {course.millions(trainable)} of {course.millions(total)} weights")
    assert f"({100 * trainable / total:.2f}%)" in text and "210 targeted layers" in text
    assert f"rank {2 * rank} would train {course.millions(2 * trainable)}" in text
    assert text != course.lora_sentence(rank + 1, trainable + 305_280, total + 305_280, 210)


def test_the_quantization_sentence_follows_the_measurements():
    mb = 2**20
    first = course.quant_sentence("bfloat16", 202.5 * mb, 52.45 * mb, 54.98, 74.24, 3)
    assert "3.9x less memory than bfloat16 (52.5 MB vs 202.5 MB)" in first
    assert "on 3 rows rose 35.0% (54.98 → 74.24)" in first
    better = course.quant_sentence("float16", 100 * mb, 50 * mb, 10.0, 9.0, 12)
    assert "2.0x less memory than float16" in better and "fell 10.0% (10.00 → 9.00)" in better


def test_the_run_sentence_quotes_first_and_last_losses():
    text = course.run_sentence(30, 151.2, 2.3141, 1.4199, [2.2, 1.6], 4)
    assert "30 steps on a 4-bit base in 2m 31s" in text
    assert "from 2.314 to 1.420 (-38.6%)" in text and "from 2.200 to 1.600 (-27.3%)" in text
    one_eval = course.run_sentence(2, 9.0, 3.0, 2.5, [2.7], 16)
    assert "held-out loss at the end is 2.700" in one_eval and "16-bit base in 9s" in one_eval


def test_the_vote_sentence_is_a_win_rate_with_its_interval():
    assert "No votes" in course.vote_sentence("run-a", {})
    one = course.vote_sentence("run-a", {"wins": 1})
    assert "You voted 1 time on `run-a`: tuned 1, base 0" in one and "cannot tell from chance" in one
    even = course.vote_sentence("run-a", {"wins": 1, "losses": 1})
    assert "You voted 2 times" in even and "Win rate 0.50" in even and even != one
    many = course.vote_sentence("run-a", {"wins": 40, "losses": 2})
    assert "better than the base beyond chance" in many
    assert "worse than the base beyond chance" in course.vote_sentence("run-a", {"wins": 2, "losses": 40})


def test_the_reward_sentence_says_when_the_data_cannot_tell():
    small = course.reward_sentence(0.75, 4)
    assert "3 of 4 held-out pairs (0.75, 95% interval 0.30-0.95)" in small and "cannot tell from chance" in small
    large = course.reward_sentence(0.9, 100)
    assert "90 of 100" in large and "better than chance" in large
    assert "no held-out pairs" in course.reward_sentence(None, 0)


def test_the_dpo_and_loss_verdict_sentences():
    dpo = course.dpo_sentence(20, [0.0, 0.134], 0.667, 0.1)
    assert "After 20 DPO steps (β = 0.1)" in dpo and "from 0.000 to 0.134" in dpo and "0.67 of held-out" in dpo
    assert "does not prefer" in course.dpo_sentence(2, [0.0, -0.01], None, 0.1)
    lower = course.loss_verdict_sentence("a", "the base", 1.42, 2.31, 12, (-1.05, -0.71))
    assert "loss 1.420 against 2.310" in lower and "lower by 0.890" in lower and "never saw" in lower
    unsure = course.loss_verdict_sentence("a", "the base", 2.30, 2.31, 4, (-0.05, 0.03))
    assert "includes 0: these questions cannot tell them apart" in unsure
    barely = course.loss_verdict_sentence("a", "b", 4.451, 4.455, 4, (-0.0081, -0.0002))
    assert "95% interval -0.008 to -0.0002): it does better" in barely  # never "-0.000", as if it touched 0


def test_expected_time_text_and_guesses():
    assert course.expected_time_text(75, True) == "Expected time: about 1m 15s (from runs timed on this machine)."
    assert "first guess" in course.expected_time_text(9, False)
    cpu = course.guess_train_seconds(30, 2, 256, False, gpu=False)
    assert cpu > course.guess_train_seconds(2, 2, 256, False, gpu=False)
    assert course.guess_train_seconds(30, 2, 256, True, gpu=False) > cpu > course.guess_train_seconds(
        30, 2, 256, False, gpu=True)
    tiny = course.CourseSize(quant_rows=3)
    assert course.guess_seconds("quantization", tiny, False) < course.guess_seconds(
        "quantization", course.CourseSize(quant_rows=30), False)


def test_first_guesses_count_the_held_out_evaluations():
    assert course.evaluations(30, 10, at_start=False) == 3 and course.evaluations(30, 10, at_start=True) == 4
    assert course.evaluations(25, 10, at_start=False) == 3  # the last one at the end
    assert course.evaluations(30, 0, at_start=True) == 0
    without = course.guess_train_seconds(2, 2, 160, True, gpu=False)
    evaluated = course.guess_train_seconds(2, 2, 160, True, gpu=False, evaluations=2, held_out_rows=24)
    assert evaluated > without
    # DPO scores every answer with the policy and its frozen reference: its evaluations cost twice the reward
    # model's, and 4 held-out pairs cost a sixth of 24.
    dpo = course.guess_train_seconds(2, 2, 160, True, gpu=False, evaluations=2, held_out_rows=24, reference=True)
    assert dpo - without == pytest.approx(2 * (evaluated - without))
    capped = course.guess_train_seconds(2, 2, 160, True, gpu=False, evaluations=2, held_out_rows=4)
    assert capped - without == pytest.approx((evaluated - without) / 6)


def test_the_course_guess_reads_the_bundled_held_out_rows_and_the_cap(monkeypatch):
    from components.course_runs import held_out_rows, preference_step_config, qlora_config
    from finetune.core.hardware import detect

    profile = detect()
    full = preference_step_config("dpo", qlora_config(profile, 16))
    assert full.data.max_eval_samples is None
    monkeypatch.setenv(course.COURSE_ENV, "tiny")
    tiny = preference_step_config("dpo", qlora_config(profile, 16))
    assert tiny.data.max_eval_samples == 4 and qlora_config(profile, 16).data.max_eval_samples == 4
    assert full.model.bits == 4 and tiny.model.bits == 32  # the smoke run skips the CPU's slow 4-bit matmul

    pairs = paths.DATA_DIR / "course_prefs" / "validation.jsonl"
    bundled = sum(1 for line in pairs.read_text(encoding="utf-8").splitlines() if line.strip())
    assert held_out_rows(full) == bundled and held_out_rows(tiny) == 4


def test_tiny_course_size_from_the_environment(monkeypatch):
    monkeypatch.setenv(course.COURSE_ENV, "tiny")
    assert course.CourseSize.from_env().train_steps == 2
    monkeypatch.delenv(course.COURSE_ENV)
    assert course.CourseSize.from_env().train_steps is None  # the preset's own steps


def test_progress_is_kept_per_visitor_and_survives_a_new_store(tmp_path):
    alice, bob = (Visitor(name=n, operator=False, sign_in=True) for n in ("alice", "bob"))
    CourseProgress(tmp_path, alice).record("lora", rank=8, sentence="Rank 8 ...")
    CourseProgress(tmp_path, alice).record("qlora", done=False, run_id="r1")
    again = CourseProgress(tmp_path, alice)  # a reload, or an app restart
    assert again.result("lora") == {"rank": 8, "sentence": "Rank 8 ..."}
    assert again.done() == ["lora"] and again.result("qlora")["run_id"] == "r1"
    assert CourseProgress(tmp_path, bob).load() == {}
    assert CourseProgress(tmp_path, Visitor(name="ALICE", operator=False, sign_in=True)).done() == ["lora"]
    signed_out = CourseProgress(tmp_path, Visitor(name=None, operator=False, sign_in=True))
    assert not signed_out.kept and signed_out.record("lora", rank=1)["result"] == {"rank": 1}
    assert signed_out.load() == {}
    assert "alice" not in str(again.path) and visitor_key(LOCAL) == "local"
    again.path.write_text("{broken", encoding="utf-8")
    assert again.load() == {}  # a damaged file starts the course afresh, it does not break the page


def test_the_report_holds_only_the_visitors_runs_and_no_server_path(tmp_path, monkeypatch):
    from finetune.core.config import RunConfig, save_config
    from finetune.services.lab_report import collect, render_html, render_markdown, write_report
    from finetune.core.run_status import write_status
    from finetune.services.runs import RunManager

    monkeypatch.setenv("LORA_LAB_SIGN_IN", "dev")
    root = tmp_path / "runs"
    manager = RunManager(root)
    upload = tmp_path / "uploads" / "secret-data.jsonl"
    for run_id, owner, first, last in (("alice-run", "alice", 2.5, 1.25), ("bob-run", "bob", 9.0, 8.5)):
        folder = root / run_id
        cfg = RunConfig()
        cfg.data.source = str(upload)
        save_config(cfg, folder / "config.yaml")
        write_status(folder, state="completed", owner=owner, step=2, max_steps=2, duration=12.0, stage="sft")
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
            {"step": 1, "loss": first}, {"step": 2, "loss": last}, {"step": 2, "eval_loss": last + 0.1})))
    alice = Visitor(name="alice", operator=False, sign_in=True)
    progress = CourseProgress(root, alice)
    progress.record("qlora", sentence="`alice-run`: the training loss went from 2.500 to 1.250 (-50.0%)",
                    run_id="alice-run")
    progress.record("chat", turns=[{"prompt": "What is r?", "base": "No idea", "tuned": "The rank", "adapter":
                                    "alice-run", "vote": "tuned"}])
    progress.record("quantization", table=[["bfloat16", 202.5, 54.98], ["NF4 + double quant", 52.5, 74.24]])
    data = collect(manager, alice, progress.load())
    page, markdown = render_html(data), render_markdown(data)
    for text in (page, markdown):
        assert "alice-run" in text and "bob-run" not in text and "9.0" not in text
        assert "2.500 to 1.250" in text and "What is r?" in text and "The rank" in text and "74.24" in text
        assert str(tmp_path) not in text and "secret-data" not in text and "/tmp" not in text
    assert "<img" in page and "data:image/png;base64," in page and "(data:image/png;base64," in markdown
    assert "<code>alice-run</code>: the training loss" in page and "`alice-run`: the training loss" in markdown
    html_file, md_file = write_report(data, tmp_path / "out")
    assert html_file.read_text(encoding="utf-8") == page and md_file.name == "lab-report.md"
    # Another learner's report: their run, none of Alice's.
    bob_data = collect(manager, Visitor(name="bob", operator=False, sign_in=True), {})
    assert [r.cells[0] for r in bob_data.runs] == ["bob-run"] and not bob_data.turns
    # HTML in a learner's text is shown, never run.
    progress.record("chat", turns=[{"prompt": "<script>alert(1)</script>", "base": "", "tuned": "", "vote": "base"}])
    assert "<script>alert" not in render_html(collect(manager, alice, progress.load()))


def test_the_rank_sentence_quotes_both_runs_and_leaves_the_verdict_to_the_interval():
    text = course.rank_sentence(4, 1_000_000, 16, 4_000_000, 2.5, 2.25, 12)
    assert "Rank 16 trains 4.0 M weights, 4.0x more than your rank 4's 1.0 M" in text
    assert "2.250 at rank 16, 2.500 at rank 4" in text and "on 12 rows" in text
    assert "better" not in text and "worse" not in text  # no interval here: no verdict
    other = course.rank_sentence(16, 4_000_000, 4, 1_000_000, 2.5, 2.75, 6)
    assert "4.0x fewer than your rank 16's" in other and "2.750 at rank 4" in other and other != text
    assert "nothing to set side by side" in course.rank_sentence(4, 1, 16, 4, None, 2.0, 3)
    assert [course.other_rank(r) for r in (1, 4, 16, 64)] == [4, 16, 4, 4]


def test_the_rank_experiment_repeats_the_learners_run_and_step_7_judges_the_pair(tmp_path, tiny_model_dir,
                                                                                 monkeypatch):
    """Real runs of the tiny model through the run queue: the experiment differs from the learner's run only in
    its rank, its sentence quotes both runs' own counts and held-out losses, and step 7 sets the two side by side
    on the same held-out questions with an interval. The path's count of steps is not changed by it."""
    import gradio as gr

    from components import course_runs, course_tab
    from finetune.core.config import BUNDLED_DATASET, to_dict
    from finetune.core.hardware import detect
    from finetune.core.run_folder import read_run_info
    from finetune.core.run_status import read_metrics
    from finetune.services.chat import ChatEngine
    from finetune.services.lab_report import collect
    from finetune.services.runs import RunManager
    from helpers import tiny_run_config

    monkeypatch.setenv("LORA_LAB_COURSE", "tiny")
    manager, profile = RunManager(tmp_path / "runs"), detect()
    with pytest.raises(gr.Error, match="Start step 3's QLoRA run first"):
        course_runs.start_rank_experiment(manager, profile)
    assert course_runs.course_timer(manager).active is False  # nothing of the course's is underway: no polling
    learner_cfg = tiny_run_config(tiny_model_dir, tmp_path / "unused.jsonl", bits=32, max_steps=2)
    learner_cfg.data.source = BUNDLED_DATASET
    learner = manager.start(learner_cfg)
    CourseProgress(manager.root, LOCAL).record("qlora", done=False, run_id=learner, sentence=None)

    started = course_runs.start_rank_experiment(manager, profile)
    experiment = CourseProgress(manager.root, LOCAL).result("rank")["run_id"]
    assert course_runs.course_timer(manager).active is True  # the experiment was queued a moment ago
    assert f"`{learner}` again at rank 16 instead of 4" in started
    for run_id in (learner, experiment):
        assert manager.wait(run_id)["state"] == "completed", manager.status(run_id)
    assert course_runs.course_timer(manager).active is False
    mine, theirs = to_dict(learner_cfg), to_dict(manager.summary(experiment).config)
    assert {k: v for k, v in theirs["lora"].items() if k not in ("rank", "alpha")} == \
        {k: v for k, v in mine["lora"].items() if k not in ("rank", "alpha")}
    assert (theirs["lora"]["rank"], theirs["lora"]["alpha"]) == (16, 32)
    assert {s: theirs[s] for s in ("model", "data", "training")} == {s: mine[s] for s in ("model", "data", "training")}

    views = dict(zip([f"{k}_{p}" for k in course_runs.POLLED for p in ("progress", "notice")] + ["path"],
                     course_runs.poll_course(manager)))
    counts = [read_run_info(manager.run_dir(r))["trainable_parameters"] for r in (learner, experiment)]
    assert f"Rank 16 trains {course.millions(counts[1])} weights, {counts[1] / counts[0]:.1f}x more than your " \
           f"rank 4's {course.millions(counts[0])}" in views["rank_notice"]
    last_losses = [course_runs._values(read_metrics(manager.run_dir(r)), "eval_loss")[-1] for r in (learner, experiment)]
    assert f"{last_losses[1]:.3f} at rank 16, {last_losses[0]:.3f} at rank 4" in views["rank_notice"]
    assert "1 of 8 done" in views["path"]  # the QLoRA step; the experiment is not a step of the path

    verdict = course_tab.evaluate_course(manager, ChatEngine(profile), progress=lambda *a, **k: None)
    assert "Rank experiment:" in verdict and experiment in verdict and "95% interval" in verdict
    report = collect(manager, LOCAL, CourseProgress(manager.root, LOCAL).load())
    assert any(title.startswith("Experiment:") and "Rank 16 trains" in text for title, text in report.sentences)
