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

Its parts, each a module: what a request may ask (chat_settings.py: limits, sampling settings, prompt and history,
the time-limit note) and the turn-taking a slice is made of (chat_turns.py); this module is the engine itself, the
model cache (bases loaded once, adapters attached by name, the base kept unchanged) and the pair/arena streaming.

    engine = ChatEngine()
    for base_text, tuned_text in engine.stream_pair("What is LoRA?", [], [], cfg.model, run_id, adapter_dir):
        print(base_text, "|", tuned_text)
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from transformers import StoppingCriteriaList

from finetune.core.config import ModelConfig
from finetune.core.data import first_line
from finetune.core.hardware import HardwareProfile, detect
from finetune.core.models import load_model, load_tokenizer
from finetune.core.run_folder import adapter_config, has_adapter
from finetune.services.chat_settings import (DEFAULT_NEW_TOKENS, MAX_NEW_TOKENS, MAX_PROMPT_CHARS, MAX_SECONDS,
                                             Messages, SamplingSettings, _operator_setting, budget_note, check_prompt,
                                             normalize_history, split_budget_note)
from finetune.services.chat_turns import (LOCK_TIMEOUT_SECONDS, SLICE_SECONDS, SLICE_TOKENS, RandomStream, RowsDone,
                                          RowStreamer, SliceEnd, StopFlag, TimeBudget, Turn, Turns, in_own_thread)

# Importable from here as before chat_settings.py and chat_turns.py were split off (the tabs and tests use them).
__all__ = ["DEFAULT_NEW_TOKENS", "MAX_NEW_TOKENS", "MAX_PROMPT_CHARS", "ChatEngine", "SamplingSettings",
           "_operator_setting", "budget_note", "check_prompt", "in_own_thread", "normalize_history",
           "peft_adapter_name", "peft_type", "split_budget_note"]

PACE_WEIGHT = 0.5  # the latest answer's share of the measured pace (older answers fade out in a few turns)


@dataclass
class _LoadedBase:
    model: Any                     # the PeftModel once an adapter is attached, the plain model before
    base: Any                      # the transformers model, loaded once
    tokenizer: Any
    adapters: dict[str, Path] = field(default_factory=dict)


def peft_adapter_name(name: str) -> str:
    """peft keeps adapters in a ModuleDict, whose keys cannot hold '.', while run ids may ('qwen2.5-run')."""
    return name.replace(".", "_")


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
        self._turns = Turns()
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
        turn = Turn(self._turns)
        turn.take()
        try:
            yield
        finally:
            turn.leave()

    def _budget(self) -> TimeBudget:
        return TimeBudget(self.max_seconds, self.clock)

    def _run(self, target: Any, kwargs: dict[str, Any], randomness: RandomStream
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
                           budget: TimeBudget, turn: Turn, streamer: RowStreamer, generate: Callable[..., Any],
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
        stop, randomness, cache, written, spent = threading.Event(), RandomStream(settings.seed), None, 0, 0.0
        while True:
            slice_end = SliceEnd(self._turns, self.slice_tokens, self.slice_seconds)
            config.max_new_tokens = settings.max_new_tokens - written
            kwargs = {**inputs, "past_key_values": cache, "streamer": streamer, "generation_config": config,
                      "stopping_criteria": StoppingCriteriaList(
                          [StopFlag(stop), budget, RowsDone(list(streamer.finished)), slice_end])}
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
        turn = Turn(self._turns)
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
                        conversations: list[Messages], settings: SamplingSettings, turn: Turn
                        ) -> Iterator[tuple[str, str]]:
        """Both rows in one generate call per slice, each with its own adapter (or none) switched on: switched on
        again at every slice, since another request's slice in between may have switched others on."""
        budget, texts = self._budget(), ("", "")
        streamer = RowStreamer(entry.tokenizer, self._eos(entry), 2)
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
                               sides: list[tuple[str, Path] | None], settings: SamplingSettings, turn: Turn
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
        turn = Turn(self._turns)
        turn.take()
        try:
            entry = self.attach(cfg, adapter_name, adapter_dir) if adapter_name else self.loaded(cfg)
            yield from self._stream_side(entry, adapter_name, messages, settings, self._budget(), turn)
        finally:
            turn.leave()

    def _stream_side(self, entry: _LoadedBase, adapter_name: str | None, messages: Messages,
                     settings: SamplingSettings, budget: TimeBudget, turn: Turn) -> Iterator[str]:
        """One answer from an attached model, within what is left of the request's time budget."""
        if budget.ran_out.is_set():  # the other side spent it all: do not start a prompt pass for nothing
            yield budget.mark("")
            return
        streamer = RowStreamer(entry.tokenizer, self._eos(entry), 1)
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
