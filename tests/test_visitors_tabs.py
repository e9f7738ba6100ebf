"""Every tab beyond Train respects owners (issue 22): two signed-in visitors through the tabs' real handlers, with
the dev sign-in's session entry on a stand-in request. Alice owns a finished run (a run folder whose status names
her, with an adapter folder: nothing here loads or trains a model); Bob must not see it in any picker, nor zip,
merge, push, chat with or evaluate it; Bob's feedback views hold none of Alice's prompts or comments while the
operator (Carol) sees both; a push with sign-in on uses only the visitor's own token, after consent. Sign-in off:
everything is visible, as before."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr
import pytest

from finetune.core.access import dev_session
from finetune.core.run_folder import ADAPTER_CONFIG, ADAPTER_DIR
from finetune.services.feedback import FeedbackStore
from finetune.services.runs import RunManager

ALICE_PROMPT = "My ID number is 123-45-6789, what does LoRA rank do?"
ALICE_COMMENT = "private note from alice"
BOB_PROMPT = "What is QLoRA?"
HF_SENTINEL = "hf_SPACE_TOKEN_MUST_NOT_BE_USED"


def visiting(name: str | None) -> Any:
    """A stand-in for gr.Request: what components.shared.visitor_of reads (the session's oauth_info)."""
    session = {"oauth_info": dev_session(name)} if name else {}
    return SimpleNamespace(scope={"session": session}, session_hash=f"session-{name}", username=None)


def finished_run(manager: RunManager, run_id: str, owner: str | None) -> str:
    """A completed run with a saved adapter (its config only: enough to be listed, refused or allowed)."""
    folder = manager.root / run_id
    (folder / ADAPTER_DIR).mkdir(parents=True)
    (folder / ADAPTER_DIR / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 4}), encoding="utf-8")
    (folder / "status.json").write_text(json.dumps({"state": "completed", "owner": owner}), encoding="utf-8")
    return run_id


@pytest.fixture
def shared_app(monkeypatch, tmp_path) -> RunManager:
    """Sign-in on (dev), Carol the operator, runs private; Alice's run and Bob's run."""
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv("LORA_LAB_PUBLIC_RUNS", raising=False)
    monkeypatch.setenv("LORA_LAB_SIGN_IN", "dev")
    monkeypatch.setenv("LORA_LAB_OPERATORS", "carol")
    monkeypatch.setenv("HF_TOKEN", HF_SENTINEL)
    manager = RunManager(tmp_path / "runs")
    finished_run(manager, "alice-run", "alice")
    finished_run(manager, "bob-run", "bob")
    return manager


def listed(dropdown: Any) -> list[str]:
    return [choice[0] if isinstance(choice, tuple) else choice for choice in dropdown.choices]


def test_pickers_list_only_the_runs_a_visitor_may_see(shared_app):
    from components.benchmark_section import adapter_choices as benchmark_choices
    from components.chat_tab import adapter_choices
    from components.eval_tab import run_choices
    from components.export_tab import export_choices
    from components.inspect_section import inspect_runs
    from components.rlhf_playground import start_choices

    bob, carol = visiting("bob"), visiting("carol")
    pickers = [lambda r: adapter_choices(shared_app, None, r), lambda r: export_choices(shared_app, None, r),
               lambda r: run_choices(shared_app, None, r)[0], lambda r: run_choices(shared_app, None, r)[1],
               lambda r: inspect_runs(shared_app, None, None, r)[0], lambda r: benchmark_choices(shared_app, None, r)]
    for picker in pickers:
        assert listed(picker(bob)) == ["bob-run"]
        assert set(listed(picker(carol))) == {"alice-run", "bob-run"}  # the operator sees every run
        assert listed(picker(visiting(None))) == []  # signed out, runs private: nothing
    from components.shared import visitor_of
    assert "alice-run" not in listed(start_choices(shared_app, None, visitor_of(bob)))


def test_another_visitors_run_is_refused_by_every_action(shared_app):
    from components.chat_tab import chat
    from components.eval_tab import checkpoint_answers, evaluate_loss
    from components.export_tab import build_gguf, export_zip, merge_model, push_model
    from components.inspect_section import inspect_adapter

    bob = visiting("bob")
    for call in (lambda: export_zip(shared_app, "alice-run", bob),
                 lambda: merge_model(shared_app, "alice-run", None, bob),
                 lambda: build_gguf(shared_app, "alice-run", "q8_0", None, bob),
                 lambda: push_model(shared_app, "alice-run", "Adapter", "bob/x", "", True, True, bob),
                 lambda: next(chat(shared_app, None, None, "hello", "alice-run", [], [], 8, 0, 1, 0, request=bob)),
                 lambda: evaluate_loss(shared_app, None, ["alice-run"], "bundled:course_qa", "validation", 4, 4, bob),
                 lambda: checkpoint_answers(shared_app, None, "alice-run", "hello", 8, bob),
                 lambda: inspect_adapter(shared_app, "alice-run", bob)):
        with pytest.raises(gr.Error, match="run alice-run is not one of yours"):
            call()


def test_public_runs_are_seen_but_only_their_owner_acts_on_them(shared_app, monkeypatch):
    from components.export_tab import export_choices, export_zip, merge_model

    monkeypatch.setenv("LORA_LAB_PUBLIC_RUNS", "1")
    bob = visiting("bob")
    assert "alice-run" in listed(export_choices(shared_app, None, bob))
    with pytest.raises(gr.Error, match="You cannot export this run: run alice-run is not one of yours"):
        export_zip(shared_app, "alice-run", bob)
    with pytest.raises(gr.Error, match="You cannot merge this run: run alice-run is not one of yours"):
        merge_model(shared_app, "alice-run", None, bob)


def test_a_push_with_sign_in_uses_only_the_visitors_own_token_after_consent(shared_app):
    from components.export_tab import CONSENT, push_model, push_token
    from components.shared import visitor_of

    alice = visiting("alice")
    with pytest.raises(gr.Error, match=f"Tick '{CONSENT}'"):  # the owner herself, without consent
        push_model(shared_app, "alice-run", "Adapter", "alice/x", HF_SENTINEL, True, False, alice)
    with pytest.raises(gr.Error, match="Sign in .* to push"):  # no sign-in token: no fallback to HF_TOKEN
        push_token(visitor_of(visiting(None)), HF_SENTINEL, True)
    # With consent, her sign-in token and nothing else: neither the typed one nor the Space's HF_TOKEN.
    assert push_token(visitor_of(alice), HF_SENTINEL, True) == "dev-token-alice"



def test_a_push_from_an_offline_machine_says_it_cannot_push(shared_app, monkeypatch):
    from components.export_tab import push_model

    from finetune.core.config import RunConfig, save_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as this machine is: the Hub cannot be reached
    save_config(RunConfig(), shared_app.root / "alice-run" / "config.yaml")  # the card is written from it
    with pytest.raises(gr.Error, match="Cannot reach the Hugging Face Hub to push to 'alice/x'.*download the file"):
        push_model(shared_app, "alice-run", "Adapter", "alice/x", "", True, True, visiting("alice"))


def feedback_of_two(store: FeedbackStore, manager: RunManager) -> None:
    """Alice and Bob each chat once; Alice votes with a private comment, Bob thumbs his answer (chat_tab's own
    handlers record who gave the feedback)."""
    from components.chat_feedback import like_answer, submit_feedback, who as _who

    for name, prompt, run_id in (("alice", ALICE_PROMPT, "alice-run"), ("bob", BOB_PROMPT, "bob-run")):
        who = _who(visiting(name))
        assert who["user"] == name
        ids = store.record_turn(model="m", adapter=run_id, prompt=prompt, base_history=[], tuned_history=[],
                                settings={}, base_response=f"base answer for {name}",
                                tuned_response=f"tuned answer for {name}", **who)
        turn = {"gen": {"left": ids["base"], "right": ids["tuned"]}, "arena": False, "run_id": run_id,
                "messages": {"left": {}, "right": {"1": ids["tuned"]}}}
        if name == "alice":
            submit_feedback(store, turn, "right", ALICE_COMMENT, "", "both", visiting(name))
        else:
            like_answer(store, "right", turn, SimpleNamespace(index=1, liked=True), visiting(name))


def test_a_vote_or_thumb_on_someone_elses_answer_is_refused_as_one_never_given(shared_app, tmp_path):
    """Issue 32: a turn naming Alice's stored answers gets Bob the same refusal as a turn naming made-up ids, for a
    vote, a comment, a correction and a thumb, so feedback cannot probe which answers exist; nothing is stored on
    Alice's answers. (In the app the turn is server-side session state that the API cannot set: see
    test_reliability's sweep; the handlers check again for any other caller.)"""
    from components.chat_feedback import like_answer, submit_feedback, who as _who

    store = FeedbackStore(tmp_path / "feedback.db")
    try:
        ids = store.record_turn(model="m", adapter="alice-run", prompt=ALICE_PROMPT, base_history=[],
                                tuned_history=[], settings={}, base_response="base", tuned_response="tuned",
                                **_who(visiting("alice")))
        turns = {"alice's": {"gen": {"left": ids["base"], "right": ids["tuned"]}, "arena": False,
                             "messages": {"left": {}, "right": {"1": ids["tuned"]}}},
                 "made-up": {"gen": {"left": "made-up-1", "right": "made-up-2"}, "arena": False,
                             "messages": {"left": {}, "right": {"1": "made-up-2"}}}}
        answers: dict[str, list[str]] = {}
        for label, turn in turns.items():
            for action in (lambda: submit_feedback(store, turn, "left", "", "", "both", visiting("bob")),
                           lambda: submit_feedback(store, turn, None, "a comment", "", "both", visiting("bob")),
                           lambda: submit_feedback(store, turn, None, "", "A fix.", "right", visiting("bob")),
                           lambda: like_answer(store, "right", turn, SimpleNamespace(index=1, liked=True),
                                               visiting("bob"))):
                with pytest.raises(gr.Error) as refused:
                    action()
                answers.setdefault(label, []).append(str(refused.value))
        assert answers["alice's"] == answers["made-up"], answers
        assert all("only answers given to you" in message for message in answers["alice's"])
        assert not any(ids[side] in message or "alice" in message for message in answers["alice's"]
                       for side in ("base", "tuned"))
        assert store._rows("SELECT COUNT(*) AS n FROM feedback", ())[0]["n"] == 0  # nothing stored on hers
        # Alice herself rates her answers as before.
        assert "Saved: vote" in submit_feedback(store, turns["alice's"], "left", "", "", "both", visiting("alice"))[0]
    finally:
        store.close()


def test_feedback_is_the_visitors_own_and_the_operator_sees_everyones(shared_app, tmp_path):
    from components.chat_feedback import like_answer, submit_feedback
    from components.feedback_tab import export_pairs, feedback_summary

    store = FeedbackStore(tmp_path / "feedback.db")
    try:
        feedback_of_two(store, shared_app)
        with pytest.raises(gr.Error, match="to give feedback"):  # signed out: may chat, not rate
            submit_feedback(store, {"gen": {}}, "left", "", "", "both", visiting(None))
        with pytest.raises(gr.Error, match="to give feedback"):
            like_answer(store, "right", None, SimpleNamespace(index=1, liked=True), visiting(None))

        def shown(name: str | None) -> str:
            _, counts, recent, wins = feedback_summary(store, visiting(name))
            return counts + recent.to_csv() + wins.to_csv()

        bob_view, carol_view = shown("bob"), shown("carol")
        assert BOB_PROMPT[:40] in bob_view and "bob-run" in bob_view
        assert "123-45-6789" not in bob_view and ALICE_COMMENT not in bob_view and "alice-run" not in bob_view
        assert "123-45-6789" in carol_view and ALICE_COMMENT in carol_view and BOB_PROMPT[:40] in carol_view
        assert "123-45-6789" not in shown(None) and BOB_PROMPT[:40] not in shown(None)

        exports = tmp_path / "exports"
        assert export_pairs(store, exports, visiting("bob"))[0] is None  # Bob gave no vote: nothing of Alice's
        alice_file, _ = export_pairs(store, exports, visiting("alice"))
        carol_file, _ = export_pairs(store, exports, visiting("carol"))
        assert "123-45-6789" in Path(alice_file).read_text(encoding="utf-8")
        assert list((exports / "alice").glob("pairs-*.jsonl")) and list((exports / "all").glob("pairs-*.jsonl"))
        assert not list(exports.glob("pairs-*.jsonl"))  # per-visitor folders: nobody overwrites anybody's file
        assert carol_file != alice_file
        with pytest.raises(gr.Error, match="to export feedback"):
            export_pairs(store, exports, visiting(None))
    finally:
        store.close()


def test_comparisons_show_only_the_visitors_own(shared_app):
    from components.compare_tab import poll_comparison, show_scatter
    from finetune.services.compare import CompareQueue

    queue = CompareQueue(shared_app)
    state = {"id": "compare-alice", "state": "completed", "stop_requested": False, "created_at": 0, "request": {},
             "items": [], "owner": "alice"}
    queue.path("compare-alice").write_text(json.dumps(state), encoding="utf-8")
    assert poll_comparison(queue, "compare-alice", "", visiting("bob"))[:2] == ("", "No comparison yet.")
    assert show_scatter(queue, "compare-alice", visiting("bob")) is None
    assert poll_comparison(queue, "", "", visiting("alice"))[0] == "compare-alice"


def test_without_sign_in_everything_is_visible_as_before(monkeypatch, tmp_path):
    from components.chat_feedback import who as _who
    from components.chat_tab import adapter_choices
    from components.export_tab import export_choices, push_token
    from components.feedback_tab import feedback_summary
    from components.shared import visitor_of

    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.setenv("LORA_LAB_SIGN_IN", "off")
    manager = RunManager(tmp_path / "runs")
    finished_run(manager, "alice-run", "alice")
    finished_run(manager, "old-run", None)
    for request in (None, visiting("bob")):
        assert set(listed(adapter_choices(manager, None, request))) == {"alice-run", "old-run"}
        assert set(listed(export_choices(manager, None, request))) == {"alice-run", "old-run"}
    assert push_token(visitor_of(None), "typed-token", False) == "typed-token"  # the token field, as today
    assert _who(SimpleNamespace(username="auth-user", session_hash="s"))["user"] == "auth-user"  # LORA_LAB_AUTH
    store = FeedbackStore(tmp_path / "feedback.db")
    try:
        ids = store.record_turn(model="m", adapter="alice-run", prompt=ALICE_PROMPT, base_history=[],
                                tuned_history=[], settings={}, base_response="a", tuned_response="b", user="alice")
        store.add_thumbs(ids["tuned"], True, user="alice")
        assert "123-45-6789" in feedback_summary(store, None)[2].to_csv()
    finally:
        store.close()


def test_benchmark_jobs_belong_to_the_visitor_who_started_them(shared_app, tmp_path):
    from components.benchmark_section import poll_benchmark, stop_benchmark
    from components.course_tab import forgetting_markdown
    from finetune.services.benchmarks import BenchmarkService
    from finetune.core.run_status import write_status

    service = BenchmarkService(shared_app.root, tmp_path / "benchmarks")
    job_id = "bench-20261130-010203-abcdef"  # Alice's job as start() lays it out (no model is loaded here)
    folder = tmp_path / "benchmarks" / "jobs" / job_id
    folder.mkdir(parents=True)
    (folder / "plan.json").write_text(json.dumps({"tasks": [], "limit": 5, "units": [], "seconds": 0,
                                                  "batch_size": 8}), encoding="utf-8")
    write_status(folder, state="completed", owner="alice")

    assert service.latest_job(visitor_of_name("alice")) == job_id
    assert service.latest_job(visitor_of_name("bob")) is None  # Bob's page does not re-attach to it
    assert poll_benchmark(service, job_id, visiting("bob"))[0] == ""
    assert stop_benchmark(service, job_id, visiting("bob")) == "No benchmark is running."
    assert "no forgetting check yet" in forgetting_markdown(service, visiting("bob"))
    assert poll_benchmark(service, "../../etc", visiting("carol"))[0] == ""  # an id is never a path


def visitor_of_name(name: str) -> Any:
    from components.shared import visitor_of

    return visitor_of(visiting(name))


def test_the_quantization_comparison_and_the_chat_labels_keep_to_the_visitors_rights(shared_app):
    from components.chat_tab import _reference_name
    from components.quant_tab import run_comparison
    from finetune.core.hardware import detect

    with pytest.raises(gr.Error, match="Sign in .* to run a quantization comparison"):  # models on the shared GPU
        next(run_comparison(detect(), "smollm2-135m-instruct", ["fp32"], "bundled:course_qa", "train", 2, "Hi", 4,
                            visiting(None)))
    (shared_app.root / "alice-run" / "config.yaml").write_text(
        "stage: dpo\npreference:\n  start_adapter: bob-run\n", encoding="utf-8")  # Alice's DPO started from a run
    assert _reference_name(shared_app, "alice-run", "start", visiting("carol")) == "bob-run"
    assert _reference_name(shared_app, "alice-run", "start", visiting("bob")) is None  # nothing of Alice's run
