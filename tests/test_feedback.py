"""FeedbackStore on real SQLite: generations and events, exports loadable by `datasets`, win counts, concurrency."""

from __future__ import annotations

import json
import sqlite3
import threading

import pytest

from finetune.services.feedback import FeedbackError, FeedbackStore
from finetune.services.feedback_export import thumb_rows, write_pairs, write_thumbs
from finetune.services.langsmith_sync import LangSmithSettings

SETTINGS = {"max_new_tokens": 32, "temperature": 0.7, "top_p": 0.9, "seed": 0}
HISTORY = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


@pytest.fixture
def store(tmp_path):
    store = FeedbackStore(tmp_path / "feedback.db")
    yield store
    store.close()


def _turn(store: FeedbackStore, n: int, adapter: str = "run-a", **kwargs) -> dict[str, str]:
    return store.record_turn(model="tiny", adapter=adapter, prompt=f"Question {n}?", base_history=HISTORY,
                             tuned_history=HISTORY, settings=SETTINGS, base_response=f"base answer {n}",
                             tuned_response=f"tuned answer {n}", user="ann", session="s1", **kwargs)


def test_generations_are_stored_with_everything_needed(store):
    ids = _turn(store, 1)
    tuned = store.generation(ids["tuned"])
    assert tuned["adapter"] == "run-a" and tuned["side"] == "tuned" and tuned["turn_id"] == ids["turn"]
    assert tuned["history"] == HISTORY and tuned["settings"] == SETTINGS and tuned["response"] == "tuned answer 1"
    base = store.generation(ids["base"])
    assert base["adapter"] is None and base["model"] == "tiny" and base["prompt"] == "Question 1?"
    # WAL mode, and the write is visible to a brand-new connection (it was committed before returning).
    fresh = sqlite3.connect(store.path)
    assert fresh.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert fresh.execute("SELECT COUNT(*) FROM generations").fetchone()[0] == 2
    fresh.close()


def test_exports_are_trl_conversational_and_load_with_datasets(store, tmp_path):
    from datasets import load_dataset

    first, second, third = _turn(store, 1), _turn(store, 2), _turn(store, 3)
    store.add_preference(first["tuned"], first["base"], "first", comment="crisper")
    store.add_preference(second["base"], second["tuned"], "first")           # base won, listed first
    store.add_preference(third["tuned"], third["base"], "tie")               # no pair
    store.add_correction(third["base"], "The corrected answer.")
    store.add_thumbs(first["tuned"], True)
    store.add_thumbs(second["tuned"], False)

    assert write_pairs(store, tmp_path / "pairs.jsonl") == 3
    pairs = load_dataset("json", data_files=str(tmp_path / "pairs.jsonl"), split="train")
    assert pairs.column_names == ["prompt", "chosen", "rejected"]
    assert pairs[0]["prompt"] == HISTORY + [{"role": "user", "content": "Question 1?"}]
    assert [p["chosen"][0]["content"] for p in pairs] == ["tuned answer 1", "base answer 2", "The corrected answer."]
    assert [p["rejected"][0]["content"] for p in pairs] == ["base answer 1", "tuned answer 2", "base answer 3"]
    assert all(p["chosen"][0]["role"] == "assistant" for p in pairs)

    assert write_thumbs(store, tmp_path / "thumbs.jsonl") == 2
    thumbs = load_dataset("json", data_files=str(tmp_path / "thumbs.jsonl"), split="train")
    assert thumbs.column_names == ["prompt", "completion", "label"]
    assert thumbs["label"] == [True, False]
    assert thumbs[0]["completion"] == [{"role": "assistant", "content": "tuned answer 1"}]


def test_latest_vote_and_thumb_count_once(store, tmp_path):
    ids = _turn(store, 1)
    store.add_thumbs(ids["tuned"], True, session="s1")
    store.add_thumbs(ids["tuned"], False, session="s1")  # changed their mind: only "down" counts
    store.add_thumbs(ids["base"], True, session="s1")
    store.add_thumbs(ids["base"], None, session="s1")    # taken back: nothing counts
    rows = thumb_rows(store)
    assert [(r["completion"][0]["content"], r["label"]) for r in rows] == [("tuned answer 1", False)]
    store.add_preference(ids["tuned"], ids["base"], "second", session="s1")
    store.add_preference(ids["base"], ids["tuned"], "second", session="s1")  # same pair, listed the other way
    store.add_preference(ids["tuned"], ids["base"], "both_bad", session="s2")
    assert store.win_counts() == {"run-a": {"wins": 1, "losses": 0, "ties": 0, "both_bad": 1}}
    assert store.counts()["preferences"] == 3  # every event is kept; only the tallies use the latest


def test_win_counts_per_adapter(store):
    for n, (adapter, choice, tuned_first) in enumerate([("run-a", "first", True), ("run-a", "second", True),
                                                         ("run-a", "first", False), ("run-a", "tie", True),
                                                         ("run-b", "second", False), ("run-b", "both_bad", False)]):
        ids = _turn(store, n, adapter=adapter)
        pair = (ids["tuned"], ids["base"]) if tuned_first else (ids["base"], ids["tuned"])
        store.add_preference(*pair, choice, arena=True)
    assert store.win_counts() == {"run-a": {"wins": 1, "losses": 2, "ties": 1, "both_bad": 0},
                                  "run-b": {"wins": 1, "losses": 0, "ties": 0, "both_bad": 1}}


@pytest.mark.parametrize("call, message", [
    (lambda s, ids: s.add_thumbs("no-such-id", True), "Unknown generation id"),
    (lambda s, ids: s.add_preference(ids["base"], ids["tuned"], "left"), "Unknown vote"),
    (lambda s, ids: s.add_preference(ids["base"], ids["base"], "tie"), "two different answers"),
    (lambda s, ids: s.add_correction(ids["base"], "   "), "corrected answer is empty"),
    (lambda s, ids: s.add_comment(ids["base"], "x" * 30_000), "keep it under"),
    (lambda s, ids: s.add_comment(ids["base"], 42), "must be text"),
])
def test_bad_feedback_is_refused_and_nothing_is_written(store, call, message):
    ids = _turn(store, 1)
    with pytest.raises(FeedbackError, match=message):
        call(store, ids)
    assert store.counts()["events"] == 0


def test_eight_threads_writing_500_events_each_lose_none(tmp_path):
    """Two store objects (as two app processes would have) and 8 writer threads; every event survives."""
    stores = [FeedbackStore(tmp_path / "feedback.db"), FeedbackStore(tmp_path / "feedback.db")]
    targets = [_turn(stores[0], n) for n in range(8)]
    written: list[list[str]] = [[] for _ in range(8)]
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def writer(index: int) -> None:
        store, ids = stores[index % 2], targets[index]
        start.wait()
        try:
            for k in range(500):
                kind = k % 3
                if kind == 0:
                    written[index].append(store.add_thumbs(ids["tuned"], k % 2 == 0, session=f"t{index}"))
                elif kind == 1:
                    written[index].append(store.add_preference(ids["tuned"], ids["base"], "first",
                                                               session=f"t{index}"))
                else:
                    written[index].append(store.add_comment(ids["base"], f"thread {index} note {k}"))
        except BaseException as error:  # surfaced below; a thread's exception is otherwise lost
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for store in stores:
        store.close()
    db = sqlite3.connect(tmp_path / "feedback.db")
    stored = {row[0] for row in db.execute("SELECT id FROM feedback")}
    assert len(stored) == 4000 and stored == {event for ids in written for event in ids}
    notes = {row[0] for row in db.execute("SELECT comment FROM feedback WHERE kind = 'comment'")}
    assert len(notes) == 8 * 166 and "thread 7 note 497" in notes  # k % 3 == 2 for 166 of 500 k
    db.close()


def test_langsmith_settings_from_env_and_off_by_default(store):
    assert LangSmithSettings.from_env({}) is None
    settings = LangSmithSettings.from_env({"LANGSMITH_API_KEY": " lsv2_pt_secret ", "LANGSMITH_PROJECT": "p",
                                           "LANGSMITH_ENDPOINT": "http://127.0.0.1:9/"})
    assert (settings.api_key, settings.endpoint, settings.project) == ("lsv2_pt_secret", "http://127.0.0.1:9", "p")
    assert "secret" not in repr(settings)
    ids = _turn(store, 1)
    store.add_thumbs(ids["tuned"], True)
    assert store.sync_summary().startswith("LangSmith: off")
    assert store.outbox_counts() == {"waiting": 0, "failed": 0, "sent": 0}  # nothing queued when off
    assert json.loads(json.dumps(store.recent()))[0]["kind"] == "thumbs"


def test_feedback_tab_exports_and_tables(store, tmp_path):
    from components.feedback_tab import export_pairs, export_thumbs, recent_table, wins_table

    path, note = export_pairs(store, tmp_path / "exports")
    assert path is None and "No rows" in note and not list((tmp_path / "exports").glob("*.jsonl"))
    ids = _turn(store, 1)
    store.add_preference(ids["base"], ids["tuned"], "second", arena=True)
    store.add_thumbs(ids["base"], False)
    path, note = export_pairs(store, tmp_path / "exports")
    kept = list((tmp_path / "exports").glob("pairs-*.jsonl"))
    assert "Wrote 1 rows" in note and len(kept) == 1 and open(path).read() == kept[0].read_text()
    assert json.loads(kept[0].read_text())["chosen"][0]["content"] == "tuned answer 1"
    assert export_thumbs(store, tmp_path / "exports")[1].startswith("Wrote 1 rows")
    recent = recent_table(store)
    assert list(recent["kind"]) == ["thumbs", "preference"] and recent["value"][1] == "tuned better"
    # One vote is a win rate of 1.0 whose interval holds 0.5: no verdict.
    assert wins_table(store).values.tolist() == [["run-a", 1, 0, 0, 0, 1, 1.0, "0.21-1.00",
                                                  "cannot tell yet (1 vote: the interval holds 0.5)"]]


def test_closing_the_app_stops_the_sender_and_closes_the_database(tmp_path, monkeypatch):
    import app

    monkeypatch.setenv("LANGSMITH_API_KEY", "lsv2-test-key")
    monkeypatch.setenv("LANGSMITH_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: items would just wait
    demo = app.build_app(str(tmp_path / "runs"))
    store = demo.feedback_store
    assert store.sender is not None and store.sender._thread.is_alive()
    assert store.counts() is not None
    connection = store._connection()  # the one this thread uses
    app.close_app(demo)
    assert not store.sender._thread.is_alive()
    with pytest.raises(sqlite3.ProgrammingError):  # closed
        connection.execute("SELECT 1")


def test_comments_count_wherever_they_were_typed(store):
    """A comment saved with a vote, a thumb or a correction counts as a comment, as does one on its own."""
    from components.feedback_tab import counts_text

    first, second = _turn(store, 1), _turn(store, 2)
    store.add_preference(first["tuned"], first["base"], "first", comment="crisper")
    store.add_thumbs(second["tuned"], True, comment="  ")  # blank: not a comment
    store.add_thumbs(second["base"], False, comment="rambles")
    store.add_correction(second["base"], "The corrected answer.", comment="fixed the figure")
    store.add_comment(first["base"], "too long")
    assert store.counts()["comments"] == 4
    assert "**4** comments" in counts_text(store)


def test_last_chat_turn_survives_an_arena_toggle(store):
    """The RLHF playground's "Take the last Chat turn" reads this session's newest stored turn: an arena toggle
    empties the chats, and an arena shows the two answers in random order. Another session's turn never shows."""
    from types import SimpleNamespace

    import gradio as gr

    from components.rlhf_playground import last_chat_turn

    _turn(store, 1)  # session s1
    store.record_turn(model="tiny", adapter="run-a", prompt="Someone else's question?", base_history=[],
                      tuned_history=[], settings=SETTINGS, base_response="theirs, base",
                      tuned_response="theirs, tuned", session="s2")
    mine = SimpleNamespace(session_hash="s1")
    # The chats were emptied by the toggle: the stored turn still answers, base and tuned by their real sides.
    assert last_chat_turn(store.path, [], [], mine) == ("Question 1?", "base answer 1", "tuned answer 1")
    stranger = SimpleNamespace(session_hash="s3")
    with pytest.raises(gr.Error, match="No chat turn yet"):
        last_chat_turn(store.path, [], [], stranger)
    # Without a store the visible chats are used, as before.
    shown = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A"}]
    assert last_chat_turn(None, shown, shown[:1] + [{"role": "assistant", "content": "B"}], mine) == ("Q?", "A", "B")


def test_every_handler_that_asks_for_the_request_gets_it(tmp_path):
    """Gradio hands a handler the visitor's request only when it can read the gr.Request hint; a plain
    functools.partial hides it, and the handler then sees None (the RLHF tab's 'Take the last Chat turn' fell back
    to the emptied chats after an arena toggle that way)."""
    import functools
    import inspect

    import app
    from gradio.utils import get_type_hints

    demo = app.build_app(str(tmp_path / "runs"))
    try:
        asking = []
        for block_fn in demo.fns.values():
            handler = block_fn.fn.func if isinstance(block_fn.fn, functools.partial) else inspect.unwrap(block_fn.fn) \
                if block_fn.fn else None
            wants = [name for name, p in inspect.signature(handler).parameters.items()
                     if "Request" in str(p.annotation)] if handler else []
            if wants:
                asking.append(handler.__name__)
                hints = get_type_hints(block_fn.fn)
                assert all("Request" in str(hints.get(name)) for name in wants), handler.__name__
        assert {"chat", "last_chat_turn"} <= set(asking)  # the sweep did reach the handlers that need it
    finally:
        app.close_app(demo)


def test_a_vote_on_a_follow_up_says_the_conversation_is_its_prompt():
    from components.chat_feedback import show_vote
    from components.chat_tab import _next_turn

    ids = {"turn": "t1", "base": "g1", "tuned": "g2"}
    first = _next_turn(None, ids, ("base", "tuned"), False, "run", {"left": [], "right": []})
    earlier = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}]
    follow_up = _next_turn(first, ids, ("base", "tuned"), False, "run", {"left": earlier, "right": earlier})
    assert "whole conversation" not in show_vote(first)[2]
    assert "whole conversation as its prompt" in show_vote(follow_up)[2]


@pytest.mark.parametrize("counts, verdict", [
    ({"wins": 9}, "tuned better"), ({"losses": 9}, "base better"),
    ({"wins": 6, "losses": 3}, "cannot tell yet (9 votes: the interval holds 0.5)")])
def test_the_win_table_gives_a_verdict_only_where_the_votes_support_one(counts, verdict):
    from components.feedback_tab import win_verdict
    from finetune.services.evaluate import win_rate

    assert win_verdict(win_rate("run-a", counts)) == verdict
