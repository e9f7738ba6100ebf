"""Human feedback: the SQLite store, the source of truth.

Every answer the Chat tab shows is a *generation* (id, time, model, adapter, prompt and history, sampling
settings, response). Every thumb, pairwise vote, comment and corrected answer is a *feedback event* pointing at
one generation (a vote also at the other side of the turn). Writes are one transaction each, committed before
the call returns; the database runs in WAL mode with a connection per thread, so concurrent users never lose a
write and readers never block writers.

When LangSmith is configured, the same transaction that stores a generation or an event also queues the
LangSmith calls for it in an ``outbox`` table, which finetune/services/langsmith_sync.py sends. The training
data made from the feedback (preference pairs, thumbs) is finetune/services/feedback_export.py's.

    store = FeedbackStore("runs/feedback.db", langsmith=LangSmithSettings.from_env())
    ids = store.record_turn(model="SmolLM2", adapter="run-1", prompt="What is LoRA?", base_history=[],
                            tuned_history=[], settings={"temperature": 0.7}, base_response="…",
                            tuned_response="…")
    store.add_preference(ids["tuned"], ids["base"], "first")           # the fine-tuned answer won
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from finetune.core.preference import Messages
from finetune.services.langsmith_sync import (LangSmithSender, LangSmithSettings, feedback_payloads, install_redaction,
                                              run_payload)

CHOICES = ("first", "second", "tie", "both_bad")      # pairwise vote, relative to (first_id, second_id)
MAX_TEXT_CHARS = 20_000                                # comments and corrected answers

SCHEMA = """
CREATE TABLE IF NOT EXISTS generations (
    id TEXT PRIMARY KEY, created REAL NOT NULL, turn_id TEXT, side TEXT, model TEXT NOT NULL, adapter TEXT,
    prompt TEXT NOT NULL, history TEXT NOT NULL, settings TEXT NOT NULL, response TEXT NOT NULL,
    user TEXT, session TEXT);
CREATE INDEX IF NOT EXISTS generations_turn ON generations(turn_id);
CREATE TABLE IF NOT EXISTS feedback (
    id TEXT PRIMARY KEY, created REAL NOT NULL, kind TEXT NOT NULL,
    generation_id TEXT NOT NULL REFERENCES generations(id), other_generation_id TEXT REFERENCES generations(id),
    value TEXT, score REAL, comment TEXT, correction TEXT, arena INTEGER NOT NULL DEFAULT 0, group_id TEXT,
    user TEXT, session TEXT);
CREATE INDEX IF NOT EXISTS feedback_generation ON feedback(generation_id, kind);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, item_id TEXT NOT NULL UNIQUE, kind TEXT NOT NULL,
    payload TEXT NOT NULL, created REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0, sent REAL, failed REAL, last_error TEXT);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox(sent, failed, seq);
"""

# The latest vote per (pair, session) and the latest thumb per (generation, session) count: a changed mind or
# a double click must not count twice.
LATEST_PREFERENCES = """
SELECT * FROM (
    SELECT f.*, ROW_NUMBER() OVER (
        PARTITION BY MIN(f.generation_id, f.other_generation_id), MAX(f.generation_id, f.other_generation_id),
                     COALESCE(f.session, f.id)
        ORDER BY f.created DESC, f.rowid DESC) AS latest
    FROM feedback f WHERE f.kind = 'preference') WHERE latest = 1
"""
LATEST_THUMBS = """
SELECT * FROM (
    SELECT f.*, ROW_NUMBER() OVER (PARTITION BY f.generation_id, COALESCE(f.session, f.id)
                                   ORDER BY f.created DESC, f.rowid DESC) AS latest
    FROM feedback f WHERE f.kind = 'thumbs') WHERE latest = 1 AND value IN ('up', 'down')
"""


class FeedbackError(ValueError):
    """Bad feedback input (unknown generation, empty comment, ...); the message says what to fix."""


# --- the store -----------------------------------------------------------------------------------------------

def _now() -> float:
    return time.time()


def _clean_text(text: Any, what: str) -> str | None:
    """None for an empty optional text; a clear error for one that is not text or is far too long."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise FeedbackError(f"The {what} must be text, got {type(text).__name__}.")
    text = text.strip()
    if len(text) > MAX_TEXT_CHARS:
        raise FeedbackError(f"The {what} is {len(text):,} characters long; keep it under {MAX_TEXT_CHARS:,}.")
    return text or None


class FeedbackStore:
    """Generations and feedback events in SQLite (WAL), safe across threads and processes."""

    def __init__(self, path: str | Path, langsmith: LangSmithSettings | None = None, *,
                 retry_base: float = 1.0, retry_max: float = 60.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.langsmith = langsmith
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._create_schema()
        self.sender: LangSmithSender | None = None
        if langsmith is not None:
            install_redaction(langsmith.api_key)
            self.sender = LangSmithSender(self, langsmith, retry_base=retry_base, retry_max=retry_max)
            self.sender.start()

    # --- connections and transactions ----------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE), so a write takes the lock up
            # front instead of failing with "database is locked" on upgrade from a read.
            db = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: a commit survives an app crash or kill; only a power cut can undo the last few.
            # FULL (an fsync per commit) made 4000 concurrent writes take 16 s instead of 0.7 s here.
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA busy_timeout=60000")
            self._local.db = db
            with self._connections_lock:
                self._connections.append(db)
        return db

    def _create_schema(self) -> None:
        db = self._connection()
        for statement in SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        columns = {row[1] for row in db.execute("PRAGMA table_info(generations)")}
        if "notice" not in columns:  # a store written before notices were kept beside the answers
            try:
                db.execute("ALTER TABLE generations ADD COLUMN notice TEXT")
            except sqlite3.OperationalError as error:  # another process added it first
                if "duplicate column" not in str(error):
                    raise
        self._move_notices_out_of_answers()

    def _move_notices_out_of_answers(self) -> None:
        """Answers stored before notices had a column of their own carry the chat's time-limit notice at their
        end: move it into ``notice``, so exports and the reward model see only what the model wrote."""
        rows = self._rows("SELECT id, response FROM generations WHERE notice IS NULL AND response LIKE ?",
                          ("%[cut: %",))
        if not rows:
            return
        from finetune.services.chat import split_budget_note  # only for such old rows: it loads torch

        with self._write() as db:
            for row in rows:
                text, notice = split_budget_note(row["response"])
                if notice is not None:
                    db.execute("UPDATE generations SET response = ?, notice = ? WHERE id = ?",
                               (text, notice, row["id"]))

    class _Transaction:
        def __init__(self, db: sqlite3.Connection):
            self.db = db

        def __enter__(self) -> sqlite3.Connection:
            self.db.execute("BEGIN IMMEDIATE")
            return self.db

        def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
            self.db.execute("COMMIT" if kind is None else "ROLLBACK")

    def _write(self) -> FeedbackStore._Transaction:
        """A write transaction: committed when the block ends, rolled back on any error."""
        return self._Transaction(self._connection())

    def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        return [dict(row) for row in self._connection().execute(sql, params).fetchall()]

    def close(self) -> None:
        """Stop the sender and close every connection this store opened."""
        if self.sender is not None:
            self.sender.stop()
        with self._connections_lock:
            for db in self._connections:
                try:
                    db.close()
                except sqlite3.ProgrammingError:  # closed from another thread already
                    pass
            self._connections.clear()
        self._local = threading.local()

    # --- generations -----------------------------------------------------------------------------------------

    def record_turn(self, *, model: str, adapter: str, prompt: str, base_history: Messages,
                    tuned_history: Messages, settings: dict[str, Any], base_response: str, tuned_response: str,
                    user: str | None = None, session: str | None = None,
                    base_adapter: str | None = None, base_notice: str | None = None,
                    tuned_notice: str | None = None) -> dict[str, str]:
        """Both answers of one side-by-side turn in one transaction: {'turn', 'base', 'tuned'} ids. The 'base' side
        is the base model, or the adapter named by ``base_adapter`` (a policy compared with its starting adapter).
        A response is what the model wrote; a notice the app showed with it (the time limit cut it) is kept
        beside it, never in it."""
        turn = str(uuid.uuid4())
        common = dict(model=model, prompt=prompt, settings=settings, turn_id=turn, user=user, session=session)
        base, tuned = self._record_generations([
            dict(common, adapter=base_adapter, history=base_history, response=base_response, side="base",
                 notice=base_notice),
            dict(common, adapter=adapter, history=tuned_history, response=tuned_response, side="tuned",
                 notice=tuned_notice)])
        return {"turn": turn, "base": base, "tuned": tuned}

    def _record_generations(self, items: list[dict[str, Any]]) -> list[str]:
        ids, created = [], _now()
        with self._write() as db:
            for item in items:
                gen_id = str(uuid.uuid4())
                db.execute("INSERT INTO generations (id, created, turn_id, side, model, adapter, prompt, history, "
                           "settings, response, notice, user, session) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                           (gen_id, created, item["turn_id"], item["side"], str(item["model"]), item["adapter"],
                            item["prompt"], json.dumps(item["history"], ensure_ascii=False),
                            json.dumps(item["settings"], ensure_ascii=False), item["response"], item.get("notice"),
                            item["user"], item["session"]))
                self._enqueue(db, gen_id, "run", run_payload(gen_id, created, item,
                                                              conversation(item["history"], item["prompt"])))
                ids.append(gen_id)
        self._wake_sender()
        return ids

    def generation(self, generation_id: str) -> dict[str, Any]:
        rows = self._rows("SELECT * FROM generations WHERE id = ?", (generation_id,))
        if not rows:
            raise FeedbackError(f"Unknown generation id {generation_id!r}: it was never recorded.")
        row = rows[0]
        row["history"], row["settings"] = json.loads(row["history"]), json.loads(row["settings"])
        return row

    def given_to(self, generation_ids: list[Any], user: str | None, session: str | None) -> bool:
        """Whether every one of these answers was recorded for this visitor: the same signed-in (or logged-in)
        user, or, with nobody signed in, the same browser session. Feedback names only such answers, and the app
        gives one refusal whether an id is someone else's or was never recorded."""
        ids = {g for g in generation_ids if isinstance(g, str) and g}
        if not ids or len(ids) != len([g for g in generation_ids if g]):
            return False
        rows = self._rows(f"SELECT user, session FROM generations WHERE id IN ({', '.join('?' * len(ids))})",
                          tuple(ids))
        return len(rows) == len(ids) and all(row["user"] == user and (user is not None or row["session"] == session)
                                             for row in rows)

    def last_turn(self, session: str | None) -> dict[str, str] | None:
        """The newest side-by-side turn of one browser session as {'prompt', 'base', 'tuned'} (the sides as
        stored, whatever order an arena showed them in); None when the session has none. Other sessions' turns
        are never returned: on a shared app they are other visitors' conversations."""
        newest = self._rows("SELECT turn_id FROM generations WHERE session IS ? AND turn_id IS NOT NULL "
                            "ORDER BY created DESC, rowid DESC LIMIT 1", (session,))
        if not newest:
            return None
        sides = {row["side"]: row for row in self._rows(
            "SELECT side, prompt, response FROM generations WHERE turn_id = ?", (newest[0]["turn_id"],))}
        if not {"base", "tuned"} <= set(sides):
            return None
        return {"prompt": sides["tuned"]["prompt"], "base": sides["base"]["response"],
                "tuned": sides["tuned"]["response"]}

    # --- feedback events -------------------------------------------------------------------------------------

    def add_thumbs(self, generation_id: str, up: bool | None, *, comment: str | None = None,
                   user: str | None = None, session: str | None = None) -> str:
        """Thumbs up (True), down (False) or taken back (None) on one answer; returns the event id."""
        value, score = {True: ("up", 1.0), False: ("down", 0.0), None: ("cleared", None)}[up]
        return self._add_event("thumbs", generation_id, value=value, score=score,
                               comment=_clean_text(comment, "comment"), user=user, session=session)

    def add_preference(self, first_id: str, second_id: str, choice: str, *, comment: str | None = None,
                       arena: bool = False, user: str | None = None, session: str | None = None) -> str:
        """A pairwise vote between two answers to the same prompt: 'first', 'second', 'tie' or 'both_bad'."""
        if choice not in CHOICES:
            raise FeedbackError(f"Unknown vote {choice!r}; use one of {', '.join(CHOICES)}.")
        if first_id == second_id:
            raise FeedbackError("A pairwise vote needs two different answers.")
        score = {"first": 1.0, "second": 0.0, "tie": 0.5, "both_bad": None}[choice]
        return self._add_event("preference", first_id, other_id=second_id, value=choice, score=score,
                               comment=_clean_text(comment, "comment"), arena=arena, user=user, session=session)

    def add_comment(self, generation_id: str, comment: str, *, other_id: str | None = None,
                    user: str | None = None, session: str | None = None) -> str:
        text = _clean_text(comment, "comment")
        if not text:
            raise FeedbackError("The comment is empty.")
        return self._add_event("comment", generation_id, other_id=other_id, comment=text, user=user,
                               session=session)

    def add_correction(self, generation_id: str, correction: str, *, comment: str | None = None,
                       user: str | None = None, session: str | None = None, group_id: str | None = None) -> str:
        """The answer the model should have given; exported as a pair (correction chosen over the original).
        One correction typed for several answers (both sides of a turn) shares a ``group_id``: it is stored once
        per answer (one pair each) but counted once, as the one thing the person did."""
        text = _clean_text(correction, "corrected answer")
        if not text:
            raise FeedbackError("The corrected answer is empty.")
        return self._add_event("correction", generation_id, value="corrected", correction=text,
                               comment=_clean_text(comment, "comment"), user=user, session=session,
                               group_id=group_id)

    def _add_event(self, kind: str, generation_id: str, *, other_id: str | None = None, value: str | None = None,
                   score: float | None = None, comment: str | None = None, correction: str | None = None,
                   arena: bool = False, user: str | None = None, session: str | None = None,
                   group_id: str | None = None) -> str:
        event_id, created = str(uuid.uuid4()), _now()
        group_id = group_id or (str(uuid.uuid4()) if other_id else None)
        event = dict(id=event_id, created=created, kind=kind, generation_id=generation_id,
                     other_generation_id=other_id, value=value, score=score, comment=comment,
                     correction=correction, arena=int(bool(arena)), group_id=group_id, user=user, session=session)
        try:
            with self._write() as db:
                db.execute(f"INSERT INTO feedback ({', '.join(event)}) VALUES ({', '.join('?' * len(event))})",
                           tuple(event.values()))
                for item_id, payload in feedback_payloads(event):
                    self._enqueue(db, item_id, "feedback", payload)
        except sqlite3.IntegrityError as error:
            if "FOREIGN KEY" in str(error):
                missing = [g for g in (generation_id, other_id) if g and not self._exists(g)]
                raise FeedbackError(f"Unknown generation id {missing[0] if missing else generation_id!r}: "
                                    "send a prompt first, then rate its answer.") from None
            raise
        self._wake_sender()
        return event_id

    def _wake_sender(self) -> None:
        """New items are committed: send them now rather than at the sender's next idle check."""
        if self.sender is not None:
            self.sender.wake()

    def _exists(self, generation_id: str) -> bool:
        return bool(self._rows("SELECT 1 FROM generations WHERE id = ?", (generation_id,)))

    def _enqueue(self, db: sqlite3.Connection, item_id: str, kind: str, payload: dict[str, Any]) -> None:
        if self.langsmith is not None:
            db.execute("INSERT INTO outbox (item_id, kind, payload, created) VALUES (?,?,?,?)",
                       (item_id, kind, json.dumps(payload, ensure_ascii=False), _now()))

    # --- reading -----------------------------------------------------------------------------------------------

    def counts(self, owner: str | None = None) -> dict[str, int]:
        """How many generations and events of each kind are stored (only ``owner``'s when given)."""
        db = self._connection()
        mine, params = _owned("user", owner)
        counts = {"generations": db.execute(f"SELECT COUNT(*) FROM generations WHERE {mine}", params).fetchone()[0]}
        for kind, value in (("thumbs_up", "up"), ("thumbs_down", "down")):
            counts[kind] = db.execute(f"SELECT COUNT(*) FROM feedback WHERE kind='thumbs' AND value=? AND {mine}",
                                      (value, *params)).fetchone()[0]
        counts["preferences"] = db.execute(f"SELECT COUNT(*) FROM feedback WHERE kind='preference' AND {mine}",
                                           params).fetchone()[0]
        # What the person did, not the rows it stored: one correction for both answers is one act (one group).
        counts["corrections"] = db.execute(f"SELECT COUNT(DISTINCT COALESCE(group_id, id)) FROM feedback WHERE "
                                           f"kind='correction' AND {mine}", params).fetchone()[0]
        counts["corrected_answers"] = db.execute(f"SELECT COUNT(*) FROM feedback WHERE kind='correction' AND {mine}",
                                                 params).fetchone()[0]
        # A comment typed with a vote, a thumb or a correction is stored on that event, not as a "comment" event;
        # one typed with a correction for both answers is on each of its rows: counted once per act.
        counts["comments"] = db.execute(f"SELECT COUNT(DISTINCT CASE WHEN kind='correction' THEN "
                                        f"COALESCE(group_id, id) ELSE id END) FROM feedback WHERE "
                                        f"TRIM(COALESCE(comment, '')) != '' AND {mine}", params).fetchone()[0]
        counts["events"] = db.execute(f"SELECT COUNT(*) FROM feedback WHERE {mine}", params).fetchone()[0]
        return counts

    def recent(self, limit: int = 50, owner: str | None = None) -> list[dict[str, Any]]:
        """The newest feedback events with the answer they are about, newest first (only ``owner``'s)."""
        mine, params = _owned("f.user", owner)
        return self._rows(
            "SELECT f.created, f.kind, f.value, f.score, f.arena, f.comment, f.correction, f.user, g.model, "
            "g.adapter, g.side, g.prompt, g.response, o.side AS other_side, o.adapter AS other_adapter "
            "FROM feedback f JOIN generations g ON g.id = f.generation_id "
            "LEFT JOIN generations o ON o.id = f.other_generation_id "
            f"WHERE {mine} ORDER BY f.created DESC, f.rowid DESC LIMIT ?", (*params, int(limit)))

    def win_counts(self, owner: str | None = None) -> dict[str, dict[str, int]]:
        """Per adapter: the fine-tuned model's wins/losses/ties/both_bad against the base in pairwise votes."""
        mine, params = _owned("p.user", owner)
        rows = self._rows(f"SELECT p.value, a.adapter AS first_adapter, b.adapter AS second_adapter "
                          f"FROM ({LATEST_PREFERENCES}) p JOIN generations a ON a.id = p.generation_id "
                          f"JOIN generations b ON b.id = p.other_generation_id WHERE {mine}", params)
        counts: dict[str, dict[str, int]] = {}
        for row in rows:
            first, second = row["first_adapter"], row["second_adapter"]
            if bool(first) == bool(second):  # two adapters, or two base answers: not a base comparison
                continue
            tuned_first = bool(first)
            outcome = {"first": "wins" if tuned_first else "losses", "second": "losses" if tuned_first else "wins",
                       "tie": "ties", "both_bad": "both_bad"}[row["value"]]
            tally = counts.setdefault(first or second, {"wins": 0, "losses": 0, "ties": 0, "both_bad": 0})
            tally[outcome] += 1
        return counts

    # --- rows for the training data (finetune/services/feedback_export.py shapes them) ---------------------

    def decided_votes(self, owner: str | None = None) -> list[dict[str, Any]]:
        """The latest vote of each pair that has a winner ('first' or 'second'), oldest first, with both answers:
        a_prompt, a_history, a_text for the first and b_* for the second (only ``owner``'s when given)."""
        mine, params = _owned("p.user", owner)
        return self._rows(f"SELECT p.value, a.prompt AS a_prompt, a.history AS a_history, a.response AS a_text, "
                          f"b.prompt AS b_prompt, b.history AS b_history, b.response AS b_text "
                          f"FROM ({LATEST_PREFERENCES}) p JOIN generations a ON a.id = p.generation_id "
                          f"JOIN generations b ON b.id = p.other_generation_id "
                          f"WHERE p.value IN ('first', 'second') AND {mine} ORDER BY p.created, p.rowid", params)

    def corrections(self, owner: str | None = None) -> list[dict[str, Any]]:
        """Each corrected answer with the answer it corrects (correction, prompt, history, response), oldest first."""
        mine, params = _owned("f.user", owner)
        return self._rows("SELECT f.correction, g.prompt, g.history, g.response FROM feedback f "
                          "JOIN generations g ON g.id = f.generation_id WHERE f.kind = 'correction' "
                          f"AND {mine} ORDER BY f.created, f.rowid", params)

    def latest_thumbs(self, owner: str | None = None) -> list[dict[str, Any]]:
        """The latest thumb up or down of each answer and session (value, prompt, history, response), oldest first."""
        mine, params = _owned("t.user", owner)
        return self._rows(f"SELECT t.value, g.prompt, g.history, g.response FROM ({LATEST_THUMBS}) t "
                          f"JOIN generations g ON g.id = t.generation_id WHERE {mine} ORDER BY t.created, t.rowid",
                          params)

    # --- outbox ------------------------------------------------------------------------------------------------

    def outbox_counts(self) -> dict[str, int]:
        db = self._connection()
        waiting = db.execute("SELECT COUNT(*) FROM outbox WHERE sent IS NULL AND failed IS NULL").fetchone()[0]
        failed = db.execute("SELECT COUNT(*) FROM outbox WHERE failed IS NOT NULL").fetchone()[0]
        sent = db.execute("SELECT COUNT(*) FROM outbox WHERE sent IS NOT NULL").fetchone()[0]
        return {"waiting": waiting, "failed": failed, "sent": sent}

    def pending_items(self, limit: int = 50) -> list[dict[str, Any]]:
        return self._rows("SELECT * FROM outbox WHERE sent IS NULL AND failed IS NULL ORDER BY seq LIMIT ?",
                          (limit,))

    def mark_sent(self, seq: int) -> None:
        with self._write() as db:
            db.execute("UPDATE outbox SET sent = ?, last_error = NULL WHERE seq = ?", (_now(), seq))

    def mark_retry(self, seq: int, delay: float, error: str, give_up: bool = False) -> None:
        with self._write() as db:
            db.execute("UPDATE outbox SET attempts = attempts + 1, next_attempt = ?, last_error = ?, failed = ? "
                       "WHERE seq = ?", (_now() + delay, error, _now() if give_up else None, seq))

    def retry_now(self) -> None:
        """Make every waiting item due now (the UI's "send now"); failed items get another chance too."""
        with self._write() as db:
            db.execute("UPDATE outbox SET next_attempt = 0, failed = NULL, attempts = 0 WHERE sent IS NULL")
        if self.sender is not None:
            self.sender.wake()

    def sync_status(self) -> dict[str, Any]:
        """Whether LangSmith is on, how many items wait, and the last error (redacted)."""
        if self.langsmith is None:
            return {"enabled": False, "waiting": 0, "failed": 0, "sent": 0, "last_error": None, "project": None}
        counts = self.outbox_counts()
        last = self._rows("SELECT last_error FROM outbox WHERE sent IS NULL AND last_error IS NOT NULL "
                          "ORDER BY seq LIMIT 1")
        return {"enabled": True, **counts, "project": self.langsmith.project,
                "last_error": last[0]["last_error"] if last else None}

    def sync_summary(self) -> str:
        """One line for the UI: 'LangSmith: on (project p), 2 waiting'."""
        status = self.sync_status()
        if not status["enabled"]:
            return "LangSmith: off (set LANGSMITH_API_KEY to sync feedback)"
        line = f"LangSmith: on (project {status['project']}), {status['waiting']} waiting"
        if status["failed"]:
            line += f", {status['failed']} failed"
        if status["last_error"] and (status["waiting"] or status["failed"]):
            line += f" (last error: {status['last_error']})"
        return line

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until the outbox is empty (True) or the timeout passes (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.outbox_counts()["waiting"] == 0:
                return True
            if self.sender is not None:
                self.sender.wake()
            time.sleep(0.05)
        return self.outbox_counts()["waiting"] == 0


# --- rows -----------------------------------------------------------------------------------------------------

def _owned(column: str, owner: str | None) -> tuple[str, tuple[str, ...]]:
    """A WHERE condition keeping one visitor's rows (``owner``), or every row when owner is None."""
    return (f"{column} = ?", (owner,)) if owner is not None else ("1 = 1", ())


def conversation(history: str | Messages, prompt: str) -> Messages:
    """What an answer replied to: its history (as stored, JSON, or as messages) and then the prompt."""
    history = json.loads(history) if isinstance(history, str) else history
    return [*history, {"role": "user", "content": prompt}]
