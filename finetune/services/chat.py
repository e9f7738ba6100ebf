"""Generation for the Chat tab: one base model in memory, adapters attached by name, answers streamed.

A base model is loaded once per (source, bits, quantization) and wrapped in a ``PeftModel``; every finished
run's adapter is added to it with ``load_adapter(path, adapter_name=run_id)``, so switching runs never reloads
the base. The base answer is the same model with the adapters disabled.

Both answers stream at the same time from ONE ``generate`` call: a batch of two rows where row 0 runs with no
adapter and row 1 with the run's adapter. Instead of peft's mixed-adapter batches (``adapter_names``, which
gather and scatter each adapter's rows in every LoRA layer at every token), each LoRA layer's scale becomes a
per-row tensor, 0 for the base row and alpha/r for the adapter row (peft's own ``set_scale``): the plain LoRA
forward pass then serves both rows, 8-14% faster than peft's path on the CPU (``bench/chat_latency.py``).
Adapters a zero scale cannot switch off (DoRA rescales the base weight; IA3 and prompt tuning are not LoRA)
answer one after the other instead. The left row may also be another adapter instead of the base (a DPO policy
next to the SFT adapter it started from): then each row has its own adapter switched on.

The base stays the base: attaching, replacing or removing an adapter never changes the frozen base weights
(``_base_kept``), so the base answer does not depend on which adapters were loaded before it.

Fair use of the one model: requests take turns. While another request waits, an answer generates in slices of
``slice_tokens`` tokens or ``slice_seconds``, whichever comes first, and then hands the model to the request that
has waited longest (first come, first served, so several answers go round-robin); it continues from its own KV
cache when its turn comes back, so a greedy answer is token for token the one an unbroken ``generate`` call writes,
and a sampled one draws from its own seeded random stream. A one-word question is answered in a few slices even
while a long answer runs. Each request also gets a time budget (``LORA_LAB_MAX_SECONDS``, counted only while it
holds the model) as well as a token budget; an answer cut by it says so (``budget_note``). A closed stream (a
client that left, a cancelled request) stops its generation at the next token and frees the model.

    engine = ChatEngine()
    for base_text, tuned_text in engine.stream_pair("What is LoRA?", [], [], cfg.model, run_id, adapter_dir):
        print(base_text, "|", tuned_text)
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import queue
import re
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from finetune.core.config import ModelConfig
from finetune.core.data import first_line
from finetune.core.hardware import HardwareProfile, detect
from finetune.core.models import load_model, load_tokenizer
from finetune.core.run_folder import adapter_config, has_adapter

Messages = list[dict[str, str]]
T = TypeVar("T")


def _operator_setting(name: str, local: str, space: str) -> float:
    """An operator's environment setting, with a stricter default on a public Space (``SPACE_ID`` set), where
    strangers share one CPU."""
    return float(os.environ.get(name, space if os.environ.get("SPACE_ID") else local))


# Server-side limits (a public Space gets API calls that skip the UI's sliders); the operator may change them.
MAX_PROMPT_CHARS = int(_operator_setting("LORA_LAB_MAX_PROMPT_CHARS", "20000", "8000"))
MAX_NEW_TOKENS = int(_operator_setting("LORA_LAB_MAX_NEW_TOKENS", "1024", "512"))
# Seconds of generation one request may use (0 = no limit): the longest a waiting visitor can be held up by one
# answer (plus the prompt's first forward pass, which cannot be interrupted).
MAX_SECONDS = _operator_setting("LORA_LAB_MAX_SECONDS", "600", "60")
LOCK_TIMEOUT_SECONDS = 600.0
# An answer's turn while another request waits for the model: at most 16 tokens or 1 second, whichever comes first
# (a token of a long prompt costs several times one of a short question, so a bound in tokens alone let a long
# answer hold the model far longer per turn); small enough that a waiting question starts at once, large enough
# that handing over (one generate call per slice) costs little.
SLICE_TOKENS = 16
SLICE_SECONDS = 1.0
# The Chat tab's default answer length: on a CPU a long default ran into the time limit on a busy machine.
DEFAULT_NEW_TOKENS = {"cpu": 64, "gpu": 128}
PACE_WEIGHT = 0.5  # the latest answer's share of the measured pace (older answers fade out in a few turns)


def budget_note(seconds: float) -> str:
    """Appended to an answer that the time budget cut short, so nobody mistakes it for the model's whole answer."""
    return f"\n\n[cut: this answer reached the server's time limit of {seconds:g} s per request]"


# The note as shown, whatever the limit was (an earlier server may have had another): what split_budget_note finds.
BUDGET_NOTE = re.compile(r"\n\n\[cut: this answer reached the server's time limit of [^\]\n]* s per request\]\Z")


def split_budget_note(text: str) -> tuple[str, str | None]:
    """(what the model wrote, the time-limit notice shown after it or None). The notice is the UI's, not the
    model's: stored answers, histories fed back to the model and exported pairs must not carry it."""
    found = BUDGET_NOTE.search(text or "")
    if found is None:
        return text, None
    return text[:found.start()], found.group(0).strip()


@dataclass
class SamplingSettings:
    """Shared by both sides. temperature 0 means greedy decoding (then top_p and seed do not matter)."""

    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        # Text, None or bools from an API call become NaN, which fails every range check below with a message.
        new_tokens, temperature, top_p, seed = (
            float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else float("nan")
            for v in (self.max_new_tokens, self.temperature, self.top_p, self.seed))
        if not new_tokens.is_integer() or not 1 <= new_tokens <= MAX_NEW_TOKENS:
            problems.append(f"max new tokens must be a whole number from 1 to {MAX_NEW_TOKENS}, "
                            f"got {self.max_new_tokens!r}")
        if not 0 <= temperature <= 5:
            problems.append(f"temperature must be between 0 (greedy) and 5, got {self.temperature!r}")
        if not 0 < top_p <= 1:
            problems.append(f"top-p must be above 0 and at most 1, got {self.top_p!r}")
        if not seed.is_integer() or seed < 0:
            problems.append(f"seed must be a whole number >= 0, got {self.seed!r}")
        if problems:
            raise ValueError("Invalid sampling settings: " + "; ".join(problems) + ".")
        self.max_new_tokens, self.seed = int(self.max_new_tokens), int(self.seed)

    def generation_config(self, tokenizer: Any, eos: list[int]) -> GenerationConfig:
        sampling = {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p} \
            if self.temperature > 0 else {"do_sample": False}
        return GenerationConfig(max_new_tokens=self.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=eos, use_cache=True, **sampling)


@dataclass
class _LoadedBase:
    model: Any                     # the PeftModel once an adapter is attached, the plain model before
    base: Any                      # the transformers model, loaded once
    tokenizer: Any
    adapters: dict[str, Path] = field(default_factory=dict)


class _StopFlag(StoppingCriteria):
    """Lets an abandoned stream (closed browser tab) end its generation thread early."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> bool:
        return self.event.is_set()


class _TimeBudget(StoppingCriteria):
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


class _Turns:
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


class _Turn:
    """One request's hold on the model: taken when it starts, passed on between slices while others wait."""

    def __init__(self, turns: _Turns) -> None:
        self.turns, self.held = turns, False

    def take(self) -> None:
        self.turns.take()
        self.held = True

    def pass_on(self, budget: _TimeBudget) -> None:
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


class _SliceEnd(StoppingCriteria):
    """Ends a slice once it wrote ``tokens`` tokens or held the model ``seconds`` (at least one token) while another
    request is waiting for the model (never while the request is alone: then the answer is one unbroken generate
    call, as fast as before)."""

    def __init__(self, turns: _Turns, tokens: int, seconds: float):
        self.turns, self.tokens, self.written, self.fired = turns, max(1, tokens), 0, False
        self.ends = time.monotonic() + seconds

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> bool:
        self.written += 1
        turn_over = self.written >= self.tokens or time.monotonic() >= self.ends
        self.fired = self.fired or (turn_over and self.turns.others_waiting())
        return self.fired


class _RowsDone(StoppingCriteria):
    """Rows that ended (end-of-answer token) in an earlier slice stay ended: a new generate call starts with every
    row open, and would otherwise write past a finished answer until the longest row ends."""

    def __init__(self, finished: list[bool]):
        self.finished = finished

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.Tensor:
        return torch.tensor(self.finished, dtype=torch.bool, device=input_ids.device)


class _RandomStream:
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


class _RowStreamer(BaseStreamer):
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


def peft_adapter_name(name: str) -> str:
    """peft keeps adapters in a ModuleDict, whose keys cannot hold '.', while run ids may ('qwen2.5-run')."""
    return name.replace(".", "_")


def normalize_history(history: Any) -> Messages:
    """Chat history as plain {'role', 'content': str} dicts; gradio 6 hands content as a list of parts."""
    messages = []
    for message in history or []:
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content
                              if isinstance(part, dict) and part.get("type", "text") == "text")
        if message.get("role") == "assistant" and isinstance(content, str):
            content = split_budget_note(content)[0]  # the model never said the UI's time-limit notice
        if message.get("role") in ("system", "user", "assistant") and isinstance(content, str):
            messages.append({"role": message["role"], "content": content})
    return messages


def check_prompt(prompt: Any) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("Type a prompt first: the message is empty.")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"The prompt is {len(prompt):,} characters long; keep it under {MAX_PROMPT_CHARS:,}.")
    return prompt.strip()


def peft_type(adapter_dir: str | Path) -> str:
    """'LORA' (also DoRA / rsLoRA), 'IA3', 'PROMPT_TUNING', ... from the adapter's config."""
    try:
        return str(adapter_config(Path(adapter_dir)).get("peft_type", "LORA"))
    except (OSError, ValueError):
        return "LORA"


def _base_key(cfg: ModelConfig) -> tuple[Any, ...]:
    return (cfg.source, cfg.bits, cfg.quant_type, cfg.double_quant, cfg.compute_dtype)


@contextlib.contextmanager
def _base_kept(model: Any) -> Iterator[None]:
    """Within the block, peft may read the whole model's state_dict(); afterwards every 4-bit base weight is the
    same packed weight with the same quantization state as before.

    Why: on a CPU with AVX512-BF16, bitsandbytes repacks each 4-bit weight for its CPU kernel at the first
    forward pass (``Linear4bit.forward``: bf16 block scales, transposed, double quantization undone). peft's
    ``load_adapter`` / ``delete_adapter`` / ``PeftModel.from_pretrained`` call ``model.state_dict()`` (to map
    the checkpoint's keys, ``BaseTuner._remap_adapter_state_dict_for_load``), and ``Linear4bit._save_to_state_dict``
    converts the packed weight back IN PLACE through a lossy inverse: with double quantization the bf16 scales
    are quantized again (some of them move, and the next forward repacks the moved ones), without it the
    scales stay transposed and are read in the wrong order. Each adapter load would change the base. The packed
    tensor and the state's fields are only reassigned by that inverse, never written into, so keeping
    references to them and putting them back restores the exact weights, at no copying cost. 8-bit and 16/32-bit
    weights are not repacked and are left alone.
    """
    kept = []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            kept.append((weight, weight.data, state, dict(vars(state))))
    try:
        yield
    finally:
        for weight, data, state, fields in kept:
            vars(state).clear()
            vars(state).update(fields)
            weight.data, weight.quant_state = data, state


class ChatEngine:
    """Keeps base models and their adapters in memory; one generation at a time (the CPU has no room for two),
    several answers taking turns in slices."""

    def __init__(self, profile: HardwareProfile | None = None, max_bases: int = 1, max_seconds: float = MAX_SECONDS,
                 clock: Callable[[], float] = time.monotonic, slice_tokens: int = SLICE_TOKENS,
                 slice_seconds: float = SLICE_SECONDS):
        self.profile = profile or detect()
        self.max_bases = max(1, max_bases)
        self.max_seconds, self.clock = max_seconds, clock  # the time budget of one request (0 = none)
        self.slice_tokens, self.slice_seconds = slice_tokens, slice_seconds  # a turn while another request waits
        self._bases: OrderedDict[tuple[Any, ...], _LoadedBase] = OrderedDict()
        self._load_lock = threading.RLock()
        self._turns = _Turns()
        self.base_loads = 0  # how many times a base model was loaded from disk (tests check reuse)
        # Seconds per generated token (both sides of a pair together), measured on every answer and weighted
        # towards the latest: what the Chat tab's expected time uses, re-measured as the machine's load changes.
        self.seconds_per_token: float | None = None

    def _record_pace(self, seconds: float, tokens: int) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        latest = seconds / tokens
        last = self.seconds_per_token
        self.seconds_per_token = latest if last is None else PACE_WEIGHT * latest + (1 - PACE_WEIGHT) * last

    def expected_seconds(self, max_new_tokens: int) -> float | None:
        """About how long an answer of ``max_new_tokens`` takes at the recent pace; None before any answer."""
        return None if self.seconds_per_token is None else self.seconds_per_token * max_new_tokens

    # --- models and adapters ------------------------------------------------------------------------------

    def loaded(self, cfg: ModelConfig) -> _LoadedBase:
        """The base for ``cfg``, loading it (and evicting the least recently used one) if needed."""
        key = _base_key(cfg)
        with self._load_lock:
            if key in self._bases:
                self._bases.move_to_end(key)
                return self._bases[key]
            while len(self._bases) >= self.max_bases:
                self._bases.popitem(last=False)
                gc.collect()  # release the evicted model's memory before loading the next one
            model = in_own_thread(lambda: load_model(cfg, self.profile).eval())
            self.base_loads += 1
            self._bases[key] = _LoadedBase(model, model, load_tokenizer(cfg))
            return self._bases[key]

    def attach(self, cfg: ModelConfig, name: str, adapter_dir: str | Path) -> _LoadedBase:
        """Add the adapter under ``name`` to the base (once); the base itself is never reloaded."""
        from peft import PeftModel

        name, adapter_dir = peft_adapter_name(name), Path(adapter_dir)
        if not has_adapter(adapter_dir):
            raise ValueError(f"No adapter in {adapter_dir}: the run has not finished saving one.")
        with self._load_lock:
            entry = self.loaded(cfg)
            if entry.adapters.get(name) == adapter_dir:
                return entry
            kinds = {peft_type(folder) for folder in entry.adapters.values()}
            if kinds and kinds != {peft_type(adapter_dir)}:
                # peft holds one adapter family per model (LoRA next to IA3 or prompt tuning is refused):
                # start again from a freshly loaded base.
                self._bases.pop(_base_key(cfg), None)
                gc.collect()
                entry = self.loaded(cfg)
            try:
                with _base_kept(entry.base):
                    if not entry.adapters:
                        entry.model = in_own_thread(
                            lambda: PeftModel.from_pretrained(entry.base, adapter_dir, adapter_name=name).eval())
                    else:
                        if name in entry.adapters:  # same name, new folder: replace it
                            entry.model.delete_adapter(name)
                        in_own_thread(lambda: entry.model.load_adapter(adapter_dir, adapter_name=name))
            except (RuntimeError, ValueError, KeyError) as error:
                # Layers were already injected into the base: drop it, so the next request loads a clean one.
                self._bases.pop(_base_key(cfg), None)
                gc.collect()
                raise ValueError(self._mismatch_message(adapter_dir, cfg, error)) from None
            entry.adapters[name] = adapter_dir
            self._adapter_in_model_dtype(entry, name)
            entry.model.eval()
            return entry

    def _adapter_in_model_dtype(self, entry: _LoadedBase, name: str) -> None:
        """On a GPU, the adapter's weights in the dtype the hidden states flow in (bf16/fp16). peft loads them in
        fp32, so every LoRA layer casts its input up and its output back: two more kernel launches per layer and
        token, and decoding a small model is bound by launches, not arithmetic. The CPU keeps fp32: its bf16
        path is slower for these thin products (docs/benchmarks.md)."""
        if not self.profile.is_cuda:
            return
        dtype = entry.base.get_input_embeddings().weight.dtype
        marker = f".{name}."
        for parameter_name, parameter in entry.model.named_parameters():
            if marker in parameter_name and parameter.is_floating_point() and parameter.dtype != dtype:
                parameter.data = parameter.data.to(dtype)

    @staticmethod
    def _mismatch_message(adapter_dir: Path, cfg: ModelConfig, error: BaseException) -> str:
        """One readable line instead of torch's page of size mismatches."""
        try:
            trained_on = adapter_config(adapter_dir).get("base_model_name_or_path")
        except (OSError, ValueError):
            trained_on = None
        detail = first_line(error, 200)
        return (f"The adapter in '{adapter_dir.name}' does not fit the base model '{cfg.source}'"
                f"{f' (it was trained on {trained_on!r})' if trained_on else ''}: pick a run trained on this "
                f"base. ({detail})")

    # --- generation ---------------------------------------------------------------------------------------

    def _inputs(self, entry: _LoadedBase, conversations: list[Messages], settings: SamplingSettings
                ) -> dict[str, torch.Tensor]:
        tokenizer = entry.tokenizer
        limit = getattr(entry.base.config, "max_position_embeddings", None) or 4096
        texts = [self._fit(tokenizer, messages, limit - settings.max_new_tokens) for messages in conversations]
        tokenizer.padding_side = "left"  # new tokens must follow each row's prompt directly
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return {k: v.to(entry.base.device) for k, v in batch.items()}

    @staticmethod
    def _fit(tokenizer: Any, messages: Messages, budget: int) -> str:
        """The chat-templated prompt, dropping the oldest turns until it leaves room for the answer."""
        if budget < 8:
            raise ValueError("max new tokens is larger than this model's context; lower it.")
        while True:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            if len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= budget or len(messages) <= 1:
                return text
            messages = messages[2:] if len(messages) > 2 else messages[-1:]

    @staticmethod
    def _row_switchable_layers(entry: _LoadedBase, adapter_name: str) -> list[Any] | None:
        """The LoRA layers holding ``adapter_name``, or None when a zero scale would not give the base output."""
        from peft.tuners.lora import LoraLayer

        layers = [m for m in entry.model.modules() if isinstance(m, LoraLayer) and adapter_name in m.scaling]
        variants = any(adapter_name in getattr(layer, "lora_variant", {}) for layer in layers)
        return layers if layers and not variants else None

    @staticmethod
    @contextlib.contextmanager
    def _adapters_on_rows(entry: _LoadedBase, layers: dict[str, list[Any]], row_adapters: list[str | None]
                          ) -> Iterator[None]:
        """Within the block, each row of the batch gets only its own adapter's LoRA update (None: the base alone).
        Every named adapter is active, and its scale is a per-row mask (broadcast over (rows, tokens, features)),
        so a layer adds adapter A's update to A's row only; afterwards every layer has its usual scale back."""
        names = list(layers)
        entry.model.base_model.set_adapter(names, inference_mode=True)
        try:
            for name, adapter_layers in layers.items():
                rows_on = [row == name for row in row_adapters]
                masks: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
                for layer in adapter_layers:
                    weight = (layer.lora_B[name].weight if name in layer.lora_B
                              else layer.lora_embedding_B[name])  # LoRA on an embedding layer
                    key = (weight.dtype, weight.device)
                    if key not in masks:
                        masks[key] = torch.tensor(rows_on, dtype=key[0], device=key[1]).view(-1, 1, 1)
                    layer.set_scale(name, masks[key])
            yield
        finally:
            for name, adapter_layers in layers.items():
                for layer in adapter_layers:
                    layer.set_scale(name, 1.0)
            entry.model.set_adapter(names[-1])  # one active adapter again, as the single-side answers expect

    def _eos(self, entry: _LoadedBase) -> list[int]:
        eos = entry.base.generation_config.eos_token_id or entry.tokenizer.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        return [e for e in eos if e is not None]

    def idle(self) -> bool:
        """No request holds the model or waits for it."""
        return self._turns.idle()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """The model for a whole block of work that is not sliced (a held-out loss pass): it waits for its turn
        like an answer, and answers wait for it. Visitors queue in gradio first (each event's concurrency slot);
        the turns decide who runs among the requests gradio let in."""
        turn = _Turn(self._turns)
        turn.take()
        try:
            yield
        finally:
            turn.leave()

    def _budget(self) -> _TimeBudget:
        return _TimeBudget(self.max_seconds, self.clock)

    def _run(self, target: Any, kwargs: dict[str, Any], randomness: _RandomStream
             ) -> tuple[threading.Thread, dict[str, Any]]:
        """generate() in a thread; an error there ends the stream (instead of leaving the reader waiting for the
        lock timeout) and is handed back under "error", for the reader to raise; the result under "output"."""
        outcome: dict[str, Any] = {}

        def work() -> None:
            randomness.resume()
            try:
                with torch.inference_mode():
                    outcome["output"] = target(**kwargs)
                randomness.keep()
            except Exception as error:  # noqa: BLE001 - reported to the reader by _raise_failure
                outcome["error"] = error
                kwargs["streamer"].end()

        thread = threading.Thread(target=work, daemon=True, name="chat-generate")
        thread.start()
        return thread, outcome

    @staticmethod
    def _raise_failure(outcome: dict[str, Any]) -> None:
        if "error" in outcome:
            error = outcome["error"]
            raise RuntimeError(f"Generation failed: {first_line(error)}") from error

    def _generate_in_turns(self, entry: _LoadedBase, conversations: list[Messages], settings: SamplingSettings,
                           budget: _TimeBudget, turn: _Turn, streamer: _RowStreamer, generate: Callable[..., Any],
                           switched: Callable[[], Any]) -> Iterator[tuple[str, ...]]:
        """Each row's answer so far, after every new token, from ``generate`` called within ``switched()`` (the
        rows' adapters switched on). While another request waits, a call ends after ``slice_tokens`` tokens or
        ``slice_seconds`` (a slice), the turn passes on, and the next call continues from this request's KV cache:
        the same forward passes as one unbroken call, so greedy answers are the same tokens. Entered and left
        holding the turn."""
        inputs = self._inputs(entry, conversations, settings)
        prompt_mask, prompt_length = inputs["attention_mask"], inputs["input_ids"].shape[1]
        config = settings.generation_config(entry.tokenizer, self._eos(entry))
        config.return_dict_in_generate = True  # the KV cache comes back for the next slice
        stop, randomness, cache, written, spent = threading.Event(), _RandomStream(settings.seed), None, 0, 0.0
        while True:
            slice_end = _SliceEnd(self._turns, self.slice_tokens, self.slice_seconds)
            config.max_new_tokens = settings.max_new_tokens - written
            kwargs = {**inputs, "past_key_values": cache, "streamer": streamer, "generation_config": config,
                      "stopping_criteria": StoppingCriteriaList(
                          [_StopFlag(stop), budget, _RowsDone(list(streamer.finished)), slice_end])}
            streamer.begin_slice()
            started = time.monotonic()
            with switched():
                thread, outcome = self._run(generate, kwargs, randomness)
                try:
                    while (texts := streamer.queue.get(timeout=LOCK_TIMEOUT_SECONDS)) is not None:
                        yield texts
                except BaseException:
                    stop.set()  # a closed stream (client gone, request cancelled) ends generate at its next token
                    raise
                finally:
                    thread.join()
            spent += time.monotonic() - started
            self._raise_failure(outcome)
            sequences = outcome["output"].sequences
            written = sequences.shape[1] - prompt_length
            if (not slice_end.fired or budget.ran_out.is_set() or all(streamer.finished)
                    or written >= settings.max_new_tokens):
                break
            ones = prompt_mask.new_ones((prompt_mask.shape[0], written))
            inputs = {"input_ids": sequences, "attention_mask": torch.cat([prompt_mask, ones], dim=1)}
            cache = outcome["output"].past_key_values
            turn.pass_on(budget)
        self._record_pace(spent, streamer.steps)

    def stream_pair(self, prompt: str, base_history: Any, tuned_history: Any, cfg: ModelConfig,
                    adapter_name: str, adapter_dir: str | Path, settings: SamplingSettings | None = None,
                    reference: tuple[str, str | Path] | None = None) -> Iterator[tuple[str, str]]:
        """Yield (left answer so far, right answer so far) as both grow, one token at a time. Right is the adapter;
        left is the base model, or the ``reference`` adapter (name, folder) when given, e.g. the SFT adapter a
        DPO policy started from (``base_history`` is then that side's history)."""
        prompt, settings = check_prompt(prompt), settings or SamplingSettings()
        sides: list[tuple[str, Path] | None] = [
            (peft_adapter_name(reference[0]), Path(reference[1])) if reference else None,
            (peft_adapter_name(adapter_name), Path(adapter_dir))]
        conversations = [normalize_history(h) + [{"role": "user", "content": prompt}]
                         for h in (base_history, tuned_history)]
        turn = _Turn(self._turns)
        turn.take()
        try:
            layers = self._batchable(cfg, [side for side in sides if side])
            if layers is not None:
                entry = self.loaded(cfg)
                yield from self._stream_batched(entry, layers, [side and side[0] for side in sides],
                                                conversations, settings, turn)
            else:
                yield from self._stream_one_then_other(conversations, cfg, sides, settings, turn)
        finally:
            turn.leave()

    def _batchable(self, cfg: ModelConfig, adapters: list[tuple[str, Path]]) -> dict[str, list[Any]] | None:
        """Each adapter's LoRA layers (all attached to one base), or None when a per-row scale cannot give each
        row its own model (not LoRA, or a LoRA variant such as DoRA)."""
        if any(peft_type(folder) != "LORA" for _, folder in adapters):
            return None
        entry = None
        for name, folder in adapters:
            entry = self.attach(cfg, name, folder)
        layers = {name: self._row_switchable_layers(entry, name) for name, _ in adapters}
        return None if any(found is None for found in layers.values()) else layers  # type: ignore[return-value]

    def _stream_batched(self, entry: _LoadedBase, layers: dict[str, list[Any]], row_adapters: list[str | None],
                        conversations: list[Messages], settings: SamplingSettings, turn: _Turn
                        ) -> Iterator[tuple[str, str]]:
        """Both rows in one generate call per slice, each with its own adapter (or none) switched on: switched on
        again at every slice, since another request's slice in between may have switched others on."""
        budget, texts = self._budget(), ("", "")
        streamer = _RowStreamer(entry.tokenizer, self._eos(entry), 2)
        for texts in self._generate_in_turns(entry, conversations, settings, budget, turn, streamer,
                                             entry.model.generate,
                                             lambda: self._adapters_on_rows(entry, layers, row_adapters)):
            yield texts  # type: ignore[misc]
        if budget.ran_out.is_set():
            yield tuple(text if done else budget.mark(text)  # type: ignore[misc]
                        for text, done in zip(texts, streamer.finished))
        elif not any(texts):
            yield texts

    def _stream_one_then_other(self, conversations: list[Messages], cfg: ModelConfig,
                               sides: list[tuple[str, Path] | None], settings: SamplingSettings, turn: _Turn
                               ) -> Iterator[tuple[str, str]]:
        """Mixed-adapter batches exist for LoRA-type adapters only: IA3, prompt tuning and DoRA answer one side
        after the other, within the same time budget."""
        self.attach(cfg, *sides[1])  # before the left answer, so the base is not loaded twice
        budget, texts = self._budget(), ["", ""]
        for index, side in enumerate(sides):
            entry = self.attach(cfg, *side) if side else self.loaded(cfg)
            for texts[index] in self._stream_side(entry, side and side[0], conversations[index], settings, budget,
                                                  turn):
                yield texts[0], texts[1]
        if not any(texts):
            yield "", ""

    def stream(self, prompt: str, history: Any, cfg: ModelConfig, adapter_name: str | None = None,
               adapter_dir: str | Path | None = None, settings: SamplingSettings | None = None) -> Iterator[str]:
        """One side only: the base (no adapter given, or adapters disabled) or one adapter; yields growing text."""
        prompt, settings = check_prompt(prompt), settings or SamplingSettings()
        adapter_name = peft_adapter_name(adapter_name) if adapter_name else None
        messages = normalize_history(history) + [{"role": "user", "content": prompt}]
        turn = _Turn(self._turns)
        turn.take()
        try:
            entry = self.attach(cfg, adapter_name, adapter_dir) if adapter_name else self.loaded(cfg)
            yield from self._stream_side(entry, adapter_name, messages, settings, self._budget(), turn)
        finally:
            turn.leave()

    def _stream_side(self, entry: _LoadedBase, adapter_name: str | None, messages: Messages,
                     settings: SamplingSettings, budget: _TimeBudget, turn: _Turn) -> Iterator[str]:
        """One answer from an attached model, within what is left of the request's time budget."""
        if budget.ran_out.is_set():  # the other side spent it all: do not start a prompt pass for nothing
            yield budget.mark("")
            return
        streamer = _RowStreamer(entry.tokenizer, self._eos(entry), 1)
        text = ""
        for (text,) in self._generate_in_turns(entry, [messages], settings, budget, turn, streamer,
                                               self._side(entry, adapter_name), contextlib.nullcontext):
            yield text
        if budget.ran_out.is_set():
            yield budget.mark(text)

    @staticmethod
    def _side(entry: _LoadedBase, adapter_name: str | None) -> Any:
        """generate() with the adapter switched on, or with every adapter disabled for the base answer (switched
        at every slice: another request's slice in between may have switched another adapter on)."""
        def generate(**kwargs: Any) -> Any:
            if adapter_name:
                entry.model.set_adapter(adapter_name)
                return entry.model.generate(**kwargs)
            if entry.model is entry.base:
                return entry.base.generate(**kwargs)
            with entry.model.disable_adapter():
                return entry.model.generate(**kwargs)
        return generate

    def answer_pair(self, prompt: str, base_history: Any, tuned_history: Any, cfg: ModelConfig,
                    adapter_name: str, adapter_dir: str | Path, settings: SamplingSettings | None = None,
                    reference: tuple[str, str | Path] | None = None) -> tuple[str, str]:
        """Both final answers (the last item of ``stream_pair``)."""
        texts = ("", "")
        for texts in self.stream_pair(prompt, base_history, tuned_history, cfg, adapter_name, adapter_dir,
                                      settings, reference):
            pass
        return texts
