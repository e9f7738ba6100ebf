"""LangSmith sync with the real `langsmith` client against a small HTTP server on 127.0.0.1.

The server plays LangSmith (the real service cannot be reached from here): it answers GET /info, POST /sessions,
POST /runs, PATCH /runs/<id> and POST /feedback, keeps what it accepted like LangSmith would (a second POST
with an id it already has is a 409), and records every request, so the tests can assert what arrived, stop it
to simulate an outage, and start it again on the same port.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter

import pytest

from finetune.services.feedback import FeedbackStore
from finetune.services.langsmith_sync import LangSmithSettings
from fake_langsmith import FakeLangSmith
from helpers import wait_until

SECRET = "lsv2_pt_0123456789abcdef_SECRET"


@pytest.fixture
def fake():
    server = FakeLangSmith().start()
    yield server
    try:
        server.stop()
    except Exception:  # already stopped by the test
        pass


def _store(tmp_path, url: str) -> FeedbackStore:
    return FeedbackStore(tmp_path / "feedback.db", LangSmithSettings(SECRET, url, "lora-lab-test"),
                         retry_base=0.1, retry_max=0.5)


def _turn(store: FeedbackStore, n: int) -> dict[str, str]:
    return store.record_turn(model="tiny", adapter="run-a", prompt=f"Question {n}?", base_history=[],
                             tuned_history=[], settings={"temperature": 0.7}, base_response=f"base {n}",
                             tuned_response=f"tuned {n}", user="ann", session="s1")


def _wait(condition) -> None:
    wait_until(condition, "the LangSmith condition", every=0.05)


def test_runs_and_feedback_arrive_and_an_outage_loses_nothing(tmp_path, fake, caplog):
    caplog.set_level(logging.DEBUG)
    store = _store(tmp_path, fake.url)
    try:
        ids = _turn(store, 1)
        thumb = store.add_thumbs(ids["tuned"], True)
        store.add_preference(ids["tuned"], ids["base"], "first", comment="clearer")
        store.add_correction(ids["base"], "A better answer.")
        assert store.flush(20), store.sync_summary()

        assert set(fake.runs) == {ids["base"], ids["tuned"]}
        assert fake.runs[ids["tuned"]]["outputs"] == {"response": "tuned 1"}
        assert fake.runs[ids["tuned"]]["inputs"]["messages"] == [{"role": "user", "content": "Question 1?"}]
        assert fake.runs[ids["tuned"]]["session_name"] == "lora-lab-test"
        assert fake.runs[ids["tuned"]]["extra"]["metadata"]["adapter"] == "run-a"
        by_key = {}
        for item in fake.feedback.values():
            by_key.setdefault(item["key"], []).append(item)
        assert [(f["id"], f["run_id"], f["score"], f["value"]) for f in by_key["thumbs"]] == [
            (thumb, ids["tuned"], 1.0, "up")]
        votes = {f["run_id"]: f for f in by_key["preference"]}
        assert {run: (f["score"], f["value"]) for run, f in votes.items()} == {
            ids["tuned"]: (1.0, "chosen"), ids["base"]: (0.0, "rejected")}
        assert len({f["feedback_group_id"] for f in votes.values()}) == 1 and votes[ids["base"]]["comment"] == "clearer"
        assert by_key["correction"][0]["correction"] == {"response": "A better answer."}
        project = str(uuid.uuid5(uuid.NAMESPACE_URL, "lora-lab-test"))
        assert {f["session_id"] for f in fake.feedback.values()} == {project}
        assert {r["api_key"] for r in fake.requests} == {SECRET}  # the key is sent, as a header only
        assert store.sync_summary() == "LangSmith: on (project lora-lab-test), 0 waiting"

        # The UI never waits for LangSmith: while LangSmith holds the sender's request unanswered, the UI's
        # calls still return, with the feedback stored.
        fake.hold_requests = True
        held = _turn(store, 3)
        assert fake.holding.wait(15)  # the sender is inside a request that LangSmith does not answer...
        store.add_thumbs(held["tuned"], True)  # ...and this returns all the same
        assert not fake.release.is_set() and store.counts()["events"] == 4
        fake.hold_requests = False
        fake.release.set()
        assert store.flush(20), store.sync_summary()

        # LangSmith goes away: feedback is still stored at once and waits in the outbox.
        fake.stop()
        later = _turn(store, 2)
        store.add_thumbs(later["base"], False, comment="wrong")
        store.add_preference(later["base"], later["tuned"], "tie")
        store.add_comment(later["base"], "both verbose", other_id=later["tuned"])
        assert store.counts()["events"] == 7
        _wait(lambda: store.sync_status()["last_error"] is not None)
        summary = store.sync_summary()
        assert "7 waiting" in summary and "ConnectionError" in summary, summary

        fake.start()  # same port, same stored data: LangSmith is back
        assert store.flush(20), store.sync_summary()
    finally:
        store.close()

    expected = {row["item_id"] for row in store_rows(tmp_path)}
    delivered = Counter(r["body"]["id"] for r in fake.requests
                        if r["status"] == 200 and r["path"] in ("/runs", "/feedback"))
    assert set(delivered) == expected and set(delivered.values()) == {1}  # every item exactly once
    assert len(fake.runs) == 6 and len(fake.feedback) == 10
    assert not [r for r in fake.requests if r["status"] == 404]  # nothing went to an endpoint the stub lacks
    for text in (caplog.text, summary):
        assert SECRET not in text and SECRET[:5] + "*" not in text and SECRET[-6:] not in text
    assert "not sent" in caplog.text  # the outage was logged, without the key


def store_rows(tmp_path) -> list[dict]:
    import sqlite3

    db = sqlite3.connect(tmp_path / "feedback.db")
    db.row_factory = sqlite3.Row
    rows = [dict(r) for r in db.execute("SELECT * FROM outbox")]
    db.close()
    assert all(r["sent"] is not None and r["failed"] is None for r in rows)
    return rows


def test_a_lost_answer_is_retried_and_arrives_once(tmp_path, fake):
    """The server stored the item but the reply was lost; the retry meets a 409 and counts as delivered."""
    fake.drop_after_store.update({"/feedback": 1, "/runs": 1})
    store = _store(tmp_path, fake.url)
    try:
        ids = _turn(store, 1)
        store.add_thumbs(ids["tuned"], True)
        assert store.flush(20), store.sync_summary()
        assert store.outbox_counts() == {"waiting": 0, "failed": 0, "sent": 3}
    finally:
        store.close()
    conflicts = [r for r in fake.requests if r["status"] == 409]
    assert {r["path"] for r in conflicts} == {"/runs", "/feedback"}
    assert len(fake.runs) == 2 and len(fake.feedback) == 1
