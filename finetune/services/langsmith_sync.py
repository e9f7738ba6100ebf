"""Feedback to LangSmith: the settings (from LANGSMITH_API_KEY, optionally LANGSMITH_ENDPOINT and
LANGSMITH_PROJECT), what each stored generation and feedback event becomes there (its payload), and the sender
that drains the feedback store's outbox in order on a background thread with the real ``langsmith`` client.

An item is marked sent only after the server accepted it; the sender backs off while the server is unreachable.
Items carry the ids they will have in LangSmith (run id = generation id, a fixed feedback id), so a retry after
an ambiguous failure is answered "already exists" (409) and counts as delivered: each arrives exactly once. The
key never reaches a log line or the UI (``redact``).

The outbox itself is a table of the feedback store (finetune/services/feedback.py), written in the same
transaction as the generation or event it reports; the sender reads it through the store's ``pending_items``,
``mark_sent`` and ``mark_retry``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

from finetune.core.preference import VOTE_COLUMNS, Messages

logger = logging.getLogger(__name__)

DEFAULT_PROJECT = "lora-lab"
DEFAULT_ENDPOINT = "https://api.smith.langchain.com"
VOTE_SCORES = {"chosen": 1.0, "rejected": 0.0, "tie": 0.5, "both_bad": 0.0}  # an answer's LangSmith score in a vote


class Outbox(Protocol):
    """What the sender needs of the store that holds the outbox."""

    def pending_items(self, limit: int = 50) -> list[dict[str, Any]]: ...

    def mark_sent(self, seq: int) -> None: ...

    def mark_retry(self, seq: int, delay: float, error: str, give_up: bool = False) -> None: ...


# --- settings and message hygiene ---------------------------------------------------------------------------

@dataclass(frozen=True)
class LangSmithSettings:
    """Where feedback goes. The key is kept out of repr() so it never reaches a log line or the UI."""

    api_key: str = field(repr=False)
    endpoint: str = DEFAULT_ENDPOINT
    project: str = DEFAULT_PROJECT

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> LangSmithSettings | None:
        """Settings from LANGSMITH_API_KEY / LANGSMITH_ENDPOINT / LANGSMITH_PROJECT, or None when no key is set."""
        env = os.environ if env is None else env
        key = (env.get("LANGSMITH_API_KEY") or "").strip()
        if not key:
            return None
        return cls(key, (env.get("LANGSMITH_ENDPOINT") or DEFAULT_ENDPOINT).strip().rstrip("/"),
                   (env.get("LANGSMITH_PROJECT") or DEFAULT_PROJECT).strip())


def redact(text: str, secret: str | None) -> str:
    """``text`` without the secret, its masked form (langsmith prints 'API Key: abcde***yz') or auth headers."""
    text = re.sub(r"(?im)^\s*API Key:.*$", "", text)
    text = re.sub(r"(?i)(x-api-key|authorization)(['\"]?\s*[:=]\s*['\"]?)[^\s'\",}]+", r"\1\2***", text)
    if secret:
        text = text.replace(secret, "***")
    return text.strip()


def describe_error(error: BaseException, secret: str | None) -> str:
    """One safe line for the UI and the log: the error's kind and the first line of its message."""
    first = (str(error).strip().splitlines() or [""])[0]
    return redact(f"{type(error).__name__}: {first}", secret)[:300]


class _RedactFilter(logging.Filter):
    """langsmith logs failed requests with tracebacks that include a masked key; keep only a redacted line."""

    def __init__(self, secret: str):
        super().__init__()
        self.secret = secret

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            message += " " + describe_error(record.exc_info[1], self.secret)
        record.msg, record.args, record.exc_info, record.exc_text = redact(message, self.secret), None, None, None
        return True


def install_redaction(secret: str) -> None:
    """Keep ``secret`` out of langsmith's own log lines."""
    for name in ("langsmith", "langsmith.client", "langsmith._internal"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _RedactFilter) and f.secret == secret for f in log.filters):
            log.addFilter(_RedactFilter(secret))


# --- payloads: a generation is a LangSmith run, a feedback event one or two feedback items -------------------

def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).isoformat()


def run_payload(gen_id: str, created: float, item: dict[str, Any], messages: Messages) -> dict[str, Any]:
    """A generation as a LangSmith run; ``messages`` is the conversation it answered."""
    return {"id": gen_id, "name": "chat-" + (item["side"] or "answer"), "run_type": "llm",
            "inputs": {"messages": messages},
            "outputs": {"response": item["response"]}, "start_time": _iso(created), "end_time": _iso(created),
            "extra": {"metadata": {"model": str(item["model"]), "adapter": item["adapter"], "side": item["side"],
                                   "turn_id": item["turn_id"], "settings": item["settings"],
                                   "notice": item.get("notice"),
                                   "user": item["user"]}}}


def feedback_payloads(event: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """LangSmith feedback items for one event; a vote becomes one item per answer, sharing a group id."""
    base = {"comment": event["comment"], "source_info": {"user": event["user"], "event_id": event["id"]}}
    kind = event["kind"]
    if kind == "preference":
        first_value, second_value = VOTE_COLUMNS[event["value"]]  # each answer in the reward model's words
        for index, (run_id, value) in enumerate(((event["generation_id"], first_value),
                                                 (event["other_generation_id"], second_value))):
            score = VOTE_SCORES[value]
            item_id = str(uuid.uuid5(uuid.UUID(event["id"]), str(index)))
            yield item_id, {**base, "feedback_id": item_id, "run_id": run_id, "key": "preference", "score": score,
                            "value": value, "feedback_group_id": event["group_id"]}
        return
    payload = {**base, "feedback_id": event["id"], "run_id": event["generation_id"], "key": kind}
    if kind == "thumbs":
        payload.update(score=event["score"], value=event["value"])
    elif kind == "correction":
        payload.update(value=event["value"], correction={"response": event["correction"]})
    if event["other_generation_id"]:
        payload["feedback_group_id"] = event["group_id"]
    yield event["id"], payload
    if kind == "comment" and event["other_generation_id"]:  # a comment on a whole turn reaches both runs
        item_id = str(uuid.uuid5(uuid.UUID(event["id"]), "1"))
        yield item_id, {**payload, "feedback_id": item_id, "run_id": event["other_generation_id"]}


# --- the sender ----------------------------------------------------------------------------------------------

def _langsmith_client(settings: LangSmithSettings) -> Any:
    """The real client, sending each call synchronously so that success means the server accepted it."""
    from langsmith import Client
    from urllib3.util.retry import Retry

    return Client(api_url=settings.endpoint, api_key=settings.api_key, auto_batch_tracing=False,
                  retry_config=Retry(total=0, raise_on_status=False), timeout_ms=(3_000, 15_000))


def _is_transient(error: BaseException) -> bool:
    """Unreachable, overloaded or rate-limited: wait and retry forever. Anything else is retried a few times."""
    from langsmith import utils as ls_utils

    return isinstance(error, (ls_utils.LangSmithConnectionError, ls_utils.LangSmithAPIError,
                              ls_utils.LangSmithRequestTimeout, ls_utils.LangSmithRateLimitError,
                              ConnectionError, TimeoutError, OSError))


class LangSmithSender:
    """Drains the outbox in order on a background thread; backs off while LangSmith is unreachable."""

    MAX_REJECTIONS = 5  # a request the server refuses (400, 422, ...) this many times is set aside as failed

    def __init__(self, store: Outbox, settings: LangSmithSettings, *, retry_base: float = 1.0,
                 retry_max: float = 60.0):
        self.store, self.settings = store, settings
        self.retry_base, self.retry_max = retry_base, retry_max
        self._client: Any = None
        self._project_id: str | None = None
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="langsmith-outbox", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                wait = self.send_due()
            except Exception as error:  # the sender must never die: a bad row or a closed database
                logger.warning("LangSmith outbox: %s", describe_error(error, self.settings.api_key))
                wait = self.retry_max
            self._wake.wait(wait)
            self._wake.clear()

    def send_due(self) -> float:
        """Send the due items in order; returns how long to sleep before looking again."""
        for item in self.store.pending_items():
            if self._stop.is_set():
                return 0.0
            delay = item["next_attempt"] - time.time()
            if delay > 0:  # the head of the queue is backing off; later items wait behind it (runs first)
                return min(delay, self.retry_max)
            try:
                self._send(item["kind"], json.loads(item["payload"]))
            except Exception as error:
                if self._already_there(error):
                    self.store.mark_sent(item["seq"])
                    continue
                transient = _is_transient(error)
                give_up = not transient and item["attempts"] + 1 >= self.MAX_REJECTIONS
                delay = min(self.retry_max, self.retry_base * 2 ** min(item["attempts"], 16))
                message = describe_error(error, self.settings.api_key)
                self.store.mark_retry(item["seq"], delay, message, give_up)
                # One warning per item, not one per retry: an outage would otherwise flood the log.
                logger.log(logging.WARNING if item["attempts"] == 0 else logging.DEBUG,
                           "LangSmith %s %s not sent (attempt %d): %s", item["kind"], item["item_id"],
                           item["attempts"] + 1, message)
                if transient:
                    return delay
                continue
            self.store.mark_sent(item["seq"])
        return self.retry_max if not self.store.pending_items(1) else 0.0

    @staticmethod
    def _already_there(error: BaseException) -> bool:
        """409: an earlier attempt reached the server even though its answer was lost."""
        from langsmith import utils as ls_utils

        return isinstance(error, ls_utils.LangSmithConflictError)

    def client(self) -> Any:
        if self._client is None:
            self._client = _langsmith_client(self.settings)
        return self._client

    def project_id(self) -> str:
        """Feedback names its run's project; upsert makes asking again harmless."""
        if self._project_id is None:
            self._project_id = str(self.client().create_project(self.settings.project, upsert=True).id)
        return self._project_id

    def _send(self, kind: str, payload: dict[str, Any]) -> None:
        client = self.client()
        if kind == "run":
            payload = dict(payload, start_time=dt.datetime.fromisoformat(payload["start_time"]),
                           end_time=dt.datetime.fromisoformat(payload["end_time"]))
            client.create_run(project_name=self.settings.project, **payload)
        elif kind == "feedback":
            client.create_feedback(session_id=self.project_id(), stop_after_attempt=1,
                                   **{k: v for k, v in payload.items() if v is not None})
        else:
            raise ValueError(f"unknown outbox item kind {kind!r}")
