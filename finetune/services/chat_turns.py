"""Fair use of the one model in memory: requests take turns. While another request waits, an answer generates in
slices (``SLICE_TOKENS`` tokens or ``SLICE_SECONDS``, whichever comes first) and then hands the model on, first come
first served; these are the parts a slice is made of: the FIFO of turns, the stopping criteria (a closed stream,
the time budget, the slice's end, rows that already ended), the random stream a sampled answer keeps across slices,
the streamer that lasts across them, and a thread that ends with its work. ChatEngine (chat.py) puts them together.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
import time
from collections import deque
from typing import Any, Callable, Iterator, TypeVar

import torch
from transformers import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from finetune.services.chat_settings import budget_note

T = TypeVar("T")
LOCK_TIMEOUT_SECONDS = 600.0
# An answer's turn while another request waits for the model: at most 16 tokens or 1 second, whichever comes first
# (a token of a long prompt costs several times one of a short question, so a bound in tokens alone let a long
# answer hold the model far longer per turn); small enough that a waiting question starts at once, large enough
# that handing over (one generate call per slice) costs little.
SLICE_TOKENS = 16
SLICE_SECONDS = 1.0


class StopFlag(StoppingCriteria):
    """Lets an abandoned stream (closed browser tab) end its generation thread early."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> bool:
        return self.event.is_set()


class TimeBudget(StoppingCriteria):
    """Stops generation once the request's time is spent, and remembers that it did (for ``budget_note``).

    ``clock`` is time.monotonic; tests hand in a clock that advances by a known step per token instead of
    relying on how fast this machine generates."""

    def __init__(self, seconds: float, clock: Callable[[], float]):
        self.seconds, self.clock = seconds, clock
        self.ends = clock() + seconds if seconds > 0 else math.inf
        self.ran_out = threading.Event()  # an Event, not a bool: set in the generation thread, read in the reader

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> bool:
        if self.clock() >= self.ends:
            self.ran_out.set()
        return self.ran_out.is_set()

    def mark(self, text: str) -> str:
        return text + budget_note(self.seconds) if self.ran_out.is_set() else text

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent waiting for the model while other requests have their turn is not this request's time."""
        waiting_since = self.clock()
        try:
            yield
        finally:
            self.ends += self.clock() - waiting_since


class Turns:
    """The model, held by one request at a time, handed over in the order requests asked for it (a FIFO of
    tickets): a request that gives its turn back and asks again queues behind everyone already waiting, which
    makes the slices of several answers go round-robin. Not tied to threads: gradio advances a streaming
    generator from different worker threads, so the thread that gives a turn back is not always the one that
    took it."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._waiting: deque[object] = deque()
        self._held = False

    def take(self, timeout: float = LOCK_TIMEOUT_SECONDS) -> None:
        ticket = object()
        with self._changed:
            self._waiting.append(ticket)
            if not self._changed.wait_for(lambda: not self._held and self._waiting[0] is ticket, timeout):
                self._waiting.remove(ticket)
                self._changed.notify_all()
                raise RuntimeError("The model is busy with other answers; try again in a moment.")
            self._waiting.popleft()
            self._held = True

    def give_back(self) -> None:
        with self._changed:
            self._held = False
            self._changed.notify_all()

    def others_waiting(self) -> bool:
        return bool(self._waiting)

    def idle(self) -> bool:
        with self._changed:
            return not self._held and not self._waiting


class Turn:
    """One request's hold on the model: taken when it starts, passed on between slices while others wait."""

    def __init__(self, turns: Turns) -> None:
        self.turns, self.held = turns, False

    def take(self) -> None:
        self.turns.take()
        self.held = True

    def pass_on(self, budget: TimeBudget) -> None:
        """Let every request already waiting have a turn, then continue; the wait is not charged to the budget."""
        if not self.turns.others_waiting():
            return
        with budget.paused():
            self.leave()
            self.take()

    def leave(self) -> None:
        if self.held:
            self.held = False
            self.turns.give_back()


class SliceEnd(StoppingCriteria):
    """Ends a slice once it wrote ``tokens`` tokens or held the model ``seconds`` (at least one token) while another
    request is waiting for the model (never while the request is alone: then the answer is one unbroken generate
    call, as fast as before)."""

    def __init__(self, turns: Turns, tokens: int, seconds: float):
        self.turns, self.tokens, self.written, self.fired = turns, max(1, tokens), 0, False
        self.ends = time.monotonic() + seconds

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> bool:
        self.written += 1
        turn_over = self.written >= self.tokens or time.monotonic() >= self.ends
        self.fired = self.fired or (turn_over and self.turns.others_waiting())
        return self.fired


class RowsDone(StoppingCriteria):
    """Rows that ended (end-of-answer token) in an earlier slice stay ended: a new generate call starts with every
    row open, and would otherwise write past a finished answer until the longest row ends."""

    def __init__(self, finished: list[bool]):
        self.finished = finished

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.Tensor:
        return torch.tensor(self.finished, dtype=torch.bool, device=input_ids.device)


class RandomStream:
    """One request's random numbers across its slices: seeded at its first slice, and put back before each later
    one (another request's sampling in between moves torch's global generator), so a sampled answer is the same
    whether or not others took turns in the middle of it."""

    def __init__(self, seed: int):
        self.seed, self.state = seed, None

    def resume(self) -> None:
        if self.state is None:
            torch.manual_seed(self.seed)
            return
        cpu, cuda = self.state
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)

    def keep(self) -> None:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        self.state = (torch.get_rng_state(), cuda)


class RowStreamer(BaseStreamer):
    """A streamer for a batch of ``rows`` that lasts across slices: queues each row's text so far after every new
    token, and None at the end of each generate call (a slice); a row's end-of-answer token ends that row."""

    def __init__(self, tokenizer: Any, eos: list[int], rows: int):
        self.tokenizer, self.eos, self.rows = tokenizer, set(eos), rows
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.finished = [False] * rows
        self.steps = 0
        self.prompt_seen = False
        self.queue: queue.Queue[tuple[str, ...] | None] = queue.Queue()

    def begin_slice(self) -> None:
        self.prompt_seen = False  # each generate() call first hands over its input ids: the prompt and more

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.steps += 1
        for row, token in enumerate(value.reshape(self.rows, -1)[:, -1].tolist()):
            if self.finished[row] or token in self.eos:
                self.finished[row] = True
                continue
            self.tokens[row].append(token)
        self.queue.put(tuple(self.tokenizer.decode(t, skip_special_tokens=True) for t in self.tokens))

    def end(self) -> None:
        self.queue.put(None)


def in_own_thread(work: Callable[[], T]) -> T:
    """``work()`` run in a thread that ends with it; its result returned, its exception raised here.

    Why: torch's CPU parallelism (OpenMP) keeps a team of worker threads for every live thread that ever ran
    parallel code. Once those outnumber the cores, OpenMP stops spinning and each parallel region waits for a
    kernel wake-up: on a 2-core machine, small ops got 4x slower and CPU answers 1.5-1.8x slower after a
    model was loaded in the thread that then waited on the generation thread. A thread that ends frees its
    team, so loading here leaves none behind in the long-lived request thread.
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = work()
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread below
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True, name="chat-load")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
