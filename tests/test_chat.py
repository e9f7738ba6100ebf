"""ChatEngine on a tiny random Llama: adapters attach to one base, base and adapter answers differ, text streams."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch

from finetune.core.config import ModelConfig
from finetune.services.chat import ChatEngine, SamplingSettings, normalize_history

from helpers import GREEDY, SlowClock, StepClock, app_client, generation_threads, wait_until


@pytest.fixture
def engine() -> ChatEngine:
    """A fresh engine per test: its counts and attached adapters must not depend on which tests ran before (the
    base is the tiny model, loaded in well under a second)."""
    return ChatEngine()


def test_adapters_attach_to_one_base(engine, model_cfg, adapters):
    first = engine.attach(model_cfg, "run-a", adapters["run-a"])
    base_id = id(first.base)
    second = engine.attach(model_cfg, "run-b", adapters["run-b"])
    assert id(second.base) == base_id and second.model.base_model.model is first.base
    assert engine.base_loads == 1
    assert set(second.model.peft_config) == {"run-a", "run-b"}


def test_base_and_adapter_answers_differ(engine, model_cfg, adapters):
    base, tuned = engine.answer_pair("Hello there", [], [], model_cfg, "run-a", adapters["run-a"], GREEDY)
    assert base and tuned and base != tuned
    # The base side is the model with adapters disabled: the same as generating on the base alone.
    alone = list(engine.stream("Hello there", [], model_cfg, settings=GREEDY))[-1]
    assert alone == base
    only_tuned = list(engine.stream("Hello there", [], model_cfg, "run-a", adapters["run-a"], GREEDY))[-1]
    assert only_tuned == tuned
    other = engine.answer_pair("Hello there", [], [], model_cfg, "run-b", adapters["run-b"], GREEDY)[1]
    assert other != tuned
    assert engine.base_loads == 1


def test_streaming_yields_growing_text(engine, model_cfg, adapters):
    steps = list(engine.stream_pair("Tell me a story", [], [], model_cfg, "run-a", adapters["run-a"],
                                    SamplingSettings(max_new_tokens=10, temperature=0.8, top_p=0.9, seed=3)))
    assert len(steps) >= 3
    for (b0, t0), (b1, t1) in zip(steps, steps[1:]):
        assert b1.startswith(b0) and t1.startswith(t0)
    assert len(steps[-1][0]) > len(steps[0][0]) or len(steps[-1][1]) > len(steps[0][1])


def test_multi_turn_history_and_gradio_content_parts(engine, model_cfg, adapters):
    history = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
               {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]}]
    assert normalize_history(history) == [{"role": "user", "content": "Hi"},
                                          {"role": "assistant", "content": "Hello!"}]
    base, tuned = engine.answer_pair("And now?", history, [], model_cfg, "run-a", adapters["run-a"], GREEDY)
    assert base and tuned


@pytest.mark.parametrize("prompt, settings, message", [
    ("   ", GREEDY, "prompt"),
])
def test_empty_prompt_is_refused(engine, model_cfg, adapters, prompt, settings, message):
    with pytest.raises(ValueError, match=message):
        engine.answer_pair(prompt, [], [], model_cfg, "run-a", adapters["run-a"], settings)


@pytest.mark.parametrize("kwargs", [{"max_new_tokens": 0}, {"max_new_tokens": 10**6}, {"temperature": -1},
                                    {"top_p": 0}, {"seed": -3}, {"max_new_tokens": 2.5}])
def test_absurd_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="Invalid sampling settings"):
        SamplingSettings(**kwargs)


def test_four_bit_base_with_adapter(tiny_model_dir, adapters):
    engine = ChatEngine()
    cfg = ModelConfig(source=str(tiny_model_dir), bits=4)
    base, tuned = engine.answer_pair("Hello", [], [], cfg, "run-a", adapters["run-a"], GREEDY)
    assert base and tuned and base != tuned


def test_dora_adapter_answers_after_the_base(engine, model_cfg, tiny_model_dir, tmp_path):
    """DoRA rescales the base weight, so a zero LoRA scale cannot give the base row: the pair streams one side
    after the other instead, and each side equals that side asked alone."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True,
                                      task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
            elif "magnitude" in name:  # DoRA keeps each column's norm: change the norms too
                parameter.mul_(torch.linspace(0.0, 3.0, parameter.numel()).reshape(parameter.shape))
    model.save_pretrained(tmp_path / "dora")
    frames = list(engine.stream_pair("Hello there", [], [], model_cfg, "dora-run", tmp_path / "dora", GREEDY))
    base, tuned = frames[-1]
    assert frames[0][1] == ""  # the base side streamed first
    assert base == list(engine.stream("Hello there", [], model_cfg, settings=GREEDY))[-1]
    assert tuned == list(engine.stream("Hello there", [], model_cfg, "dora-run", tmp_path / "dora", GREEDY))[-1]
    assert tuned != base


def test_pair_leaves_every_lora_scale_as_it_was(engine, model_cfg, adapters):
    from peft.tuners.lora import LoraLayer

    entry = engine.attach(model_cfg, "run-a", adapters["run-a"])
    layers = [m for m in entry.model.modules() if isinstance(m, LoraLayer) and "run-a" in m.scaling]
    before = [layer.scaling["run-a"] for layer in layers]
    engine.answer_pair("Hello", [], [], model_cfg, "run-a", adapters["run-a"], GREEDY)
    assert [layer.scaling["run-a"] for layer in layers] == before and all(isinstance(s, float) for s in before)


class _FailingSettings(SamplingSettings):
    """Asks generate() to ban a token id the vocabulary does not have: generate fails in its worker thread."""

    def generation_config(self, tokenizer, eos):
        config = super().generation_config(tokenizer, eos)
        config.bad_words_ids = [[10**9]]
        return config


@pytest.mark.parametrize("side", ["pair", "one"])
def test_a_failing_generation_ends_the_stream_with_its_error(engine, model_cfg, adapters, side):
    """The error ends the stream itself: the reader does not sit out the lock timeout waiting for tokens that
    never come (it would then fail with the streamer's queue.Empty, not with the generation's error)."""
    settings = _FailingSettings(max_new_tokens=4, temperature=0.0)
    with pytest.raises(RuntimeError, match="Generation failed") as failure:
        if side == "pair":
            engine.answer_pair("Hello", [], [], model_cfg, "run-a", adapters["run-a"], settings)
        else:
            list(engine.stream("Hello", [], model_cfg, settings=settings))
    assert failure.value.__cause__ is not None and "queue" not in type(failure.value.__cause__).__module__
    assert not generation_threads()  # the worker ended with its error, nothing left running
    assert engine.idle()  # and the model is free for the next request
    assert engine.answer_pair("Hello", [], [], model_cfg, "run-a", adapters["run-a"], GREEDY)[1]  # still serves


def test_in_own_thread_returns_and_raises_in_the_caller():
    import threading

    from finetune.services.chat import in_own_thread

    assert in_own_thread(lambda: threading.current_thread().name) == "chat-load"
    with pytest.raises(ZeroDivisionError):
        in_own_thread(lambda: 1 / 0)


def test_a_run_id_with_dots_chats_like_any_other(engine, model_cfg, adapters):
    """Run ids may hold dots ('qwen2.5-run'); peft's adapter names may not: the engine maps them itself."""
    base, tuned = engine.answer_pair("Hello there", [], [], model_cfg, "run-a.v2", adapters["run-a"], GREEDY)
    assert tuned == engine.answer_pair("Hello there", [], [], model_cfg, "run-a", adapters["run-a"], GREEDY)[1]
    alone = list(engine.stream("Hello there", [], model_cfg, "run-a.v2", adapters["run-a"], GREEDY))[-1]
    assert alone == tuned and base != tuned


def test_on_a_gpu_the_adapter_is_kept_in_the_models_dtype(tiny_model_dir, adapters):
    """peft loads LoRA weights in fp32; on a GPU each layer would then cast its input and output every token.
    No GPU here: the rule runs with a CUDA hardware profile on CPU tensors (the speed is bench/chat_latency.py's)."""
    from finetune.core.hardware import profile_for

    engine, cfg = ChatEngine(), ModelConfig(source=str(tiny_model_dir), bits=16)
    entry = engine.attach(cfg, "run-a", adapters["run-a"])
    lora = {n: p for n, p in entry.model.named_parameters() if "lora_" in n}
    model_dtype = entry.base.get_input_embeddings().weight.dtype
    assert model_dtype != torch.float32 and {p.dtype for p in lora.values()} == {torch.float32}  # CPU: kept

    engine.profile = profile_for("cuda", "Tesla T4", 15.0, (7, 5))
    entry = engine.attach(cfg, "run-b", adapters["run-b"])
    by_adapter = {name: {p.dtype for n, p in entry.model.named_parameters() if f".{name}." in n}
                  for name in ("run-a", "run-b")}
    assert by_adapter == {"run-a": {torch.float32}, "run-b": {model_dtype}}
    base, tuned = engine.answer_pair("Hello", [], [], cfg, "run-b", adapters["run-b"], GREEDY)
    assert base and tuned and base != tuned


# --- the base stays the base ----------------------------------------------------------------------------------


def _logits(engine: ChatEngine, cfg: ModelConfig, adapter: str | None = None, prompt: str = "Hello there"):
    """The next-token logits of the engine's model for ``prompt``: the base (adapters disabled) or one adapter."""
    entry = engine.loaded(cfg)
    ids = entry.tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        if adapter:
            entry.model.set_adapter(adapter)
            return entry.model(**ids).logits
        with entry.model.disable_adapter():
            return entry.model(**ids).logits


QUANTIZED = [pytest.param({"bits": 4, "double_quant": True}, id="4bit-double-quant"),
             pytest.param({"bits": 4, "double_quant": False}, id="4bit-single-quant"),
             pytest.param({"bits": 8}, id="8bit")]


@pytest.mark.parametrize("bits", QUANTIZED)
def test_loading_switching_and_replacing_adapters_leaves_the_base_bit_identical(tiny_model_dir, adapters, bits):
    """On the CPU bitsandbytes repacks 4-bit weights at the first forward, and peft's adapter loading reads the
    whole state_dict, which unpacked them through a lossy inverse: the base drifted with every adapter load."""
    engine, cfg = ChatEngine(), ModelConfig(source=str(tiny_model_dir), **bits)
    first = engine.answer_pair("Hello there", [], [], cfg, "run-a", adapters["run-a"], GREEDY)
    base_before, tuned_before = _logits(engine, cfg), _logits(engine, cfg, "run-a")
    engine.attach(cfg, "run-b", adapters["run-b"])  # a second adapter
    engine.answer_pair("Hello there", [], [], cfg, "run-b", adapters["run-b"], GREEDY)  # switching to it
    engine.attach(cfg, "run-b", adapters["run-a"])  # the same name from another folder: peft deletes, then loads
    assert torch.equal(_logits(engine, cfg), base_before)
    assert torch.equal(_logits(engine, cfg, "run-a"), tuned_before)
    assert engine.answer_pair("Hello there", [], [], cfg, "run-a", adapters["run-a"], GREEDY) == first
    assert engine.base_loads == 1


def test_the_base_row_of_a_pair_equals_the_base_model_alone(tiny_model_dir, adapters):
    """After two adapters were loaded, the pair's base side is still what a base model that never saw an adapter
    says, token for token and logit for logit."""
    cfg = ModelConfig(source=str(tiny_model_dir), bits=4)
    engine = ChatEngine()
    engine.answer_pair("Hello there", [], [], cfg, "run-a", adapters["run-a"], GREEDY)
    base_row = engine.answer_pair("Hello there", [], [], cfg, "run-b", adapters["run-b"], GREEDY)[0]
    alone = ChatEngine()
    assert base_row == list(alone.stream("Hello there", [], cfg, settings=GREEDY))[-1]
    entry = alone.loaded(cfg)
    with torch.inference_mode():
        alone_logits = entry.model(**entry.tokenizer("Hello there", return_tensors="pt")).logits
    assert torch.equal(_logits(engine, cfg), alone_logits)


def test_a_checkpoint_and_the_final_adapter_of_its_step_answer_alike(style_run):
    """The run saved a checkpoint at its last step (8) and its final adapter from the same weights: in one engine,
    loaded one after the other, they give the same answer and the same logits."""
    from finetune.core.config import load_config

    run_dir, _ = style_run
    cfg = load_config(run_dir / "config.yaml").model
    checkpoint, final = run_dir / "checkpoints" / "checkpoint-8", run_dir / "adapter"
    assert (checkpoint / "adapter_config.json").is_file() and (final / "adapter_config.json").is_file()
    engine = ChatEngine()
    prompt = "What does setting 3 control in LoRA?"
    from_checkpoint = engine.answer_pair(prompt, [], [], cfg, "checkpoint-8", checkpoint, GREEDY)
    checkpoint_logits = _logits(engine, cfg, "checkpoint-8", prompt)
    from_final = engine.answer_pair(prompt, [], [], cfg, "final", final, GREEDY)
    assert from_final == from_checkpoint
    assert torch.equal(_logits(engine, cfg, "final", prompt), checkpoint_logits)
    assert from_final[0] != from_final[1]  # the trained adapter does change the answer


# --- a policy next to the adapter it started from --------------------------------------------------------------

@pytest.mark.parametrize("bits", [32, 4])
def test_a_pair_can_set_a_reference_adapter_against_the_tuned_one(tiny_model_dir, adapters, bits):
    """The left side is the reference adapter (a DPO policy's starting SFT adapter) instead of the base; each side
    equals that adapter asked alone, both answered from one base."""
    engine, cfg = ChatEngine(), ModelConfig(source=str(tiny_model_dir), bits=bits)
    left, right = engine.answer_pair("Hello there", [], [], cfg, "run-b", adapters["run-b"], GREEDY,
                                     reference=("run-a", adapters["run-a"]))
    assert left == list(engine.stream("Hello there", [], cfg, "run-a", adapters["run-a"], GREEDY))[-1]
    assert right == list(engine.stream("Hello there", [], cfg, "run-b", adapters["run-b"], GREEDY))[-1]
    base = list(engine.stream("Hello there", [], cfg, settings=GREEDY))[-1]
    assert len({left, right, base}) == 3 and engine.base_loads == 1


def test_a_dora_policy_next_to_its_reference_answers_one_side_after_the_other(engine, model_cfg, adapters,
                                                                              tmp_path, tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True,
                                      task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    model.save_pretrained(tmp_path / "dora")
    frames = list(engine.stream_pair("Hello there", [], [], model_cfg, "dora-policy", tmp_path / "dora", GREEDY,
                                     reference=("run-a", adapters["run-a"])))
    assert frames[0][1] == ""  # the reference side streamed first
    assert frames[-1][0] == list(engine.stream("Hello there", [], model_cfg, "run-a", adapters["run-a"],
                                               GREEDY))[-1]
    assert frames[-1][1] == list(engine.stream("Hello there", [], model_cfg, "dora-policy", tmp_path / "dora",
                                               GREEDY))[-1]


# --- fair use: a time budget per request, and a closed stream frees the model ----------------------------------


LONG = SamplingSettings(max_new_tokens=400, temperature=0.0)


@pytest.mark.parametrize("side", ["pair", "one"])
def test_an_answer_cut_by_the_time_budget_says_so(tiny_model_dir, model_cfg, adapters, side):
    from finetune.services.chat import budget_note

    engine = ChatEngine(max_seconds=6, clock=StepClock())
    if side == "pair":
        answers = engine.answer_pair("Tell me a story", [], [], model_cfg, "run-a", adapters["run-a"], LONG)
    else:
        answers = (list(engine.stream("Tell me a story", [], model_cfg, settings=LONG))[-1],)
    tokenizer = engine.loaded(model_cfg).tokenizer
    for answer in answers:
        assert answer.endswith(budget_note(6))
        assert 0 < len(tokenizer(answer.removesuffix(budget_note(6)))["input_ids"]) <= 8  # not LONG's 400


def test_a_long_request_is_cut_by_its_budget_while_a_short_one_is_answered_in_full(model_cfg, adapters):
    """A visitor asking for 400 tokens while another waits with 'hi': the answers take turns (in whichever order
    the slices fall on this machine), the long answer ends at its time budget and says so, the short one is whole."""
    import threading

    from finetune.services.chat import budget_note

    engine = ChatEngine(max_seconds=10, clock=StepClock())
    engine.answer_pair("warm up", [], [], model_cfg, "run-a", adapters["run-a"], GREEDY)  # loaded before the race
    long_started, long_done, results = threading.Event(), threading.Event(), {}

    def long_request() -> None:
        for texts in engine.stream_pair("Tell me a story", [], [], model_cfg, "run-a", adapters["run-a"], LONG):
            long_started.set()
            results["long"] = texts
        long_done.set()

    thread = threading.Thread(target=long_request)
    thread.start()
    long_started.wait()
    short = []
    for texts in engine.stream_pair("hi", [], [], model_cfg, "run-a", adapters["run-a"],
                                    SamplingSettings(max_new_tokens=4, temperature=0.0)):
        short.append((long_done.is_set(), texts))
    thread.join()
    assert all(text.endswith(budget_note(10)) for text in results["long"])  # cut by the budget, and says so
    assert short[-1][1][1] and budget_note(10) not in "".join(short[-1][1])  # the short one answered in full


class _GateClock:
    """A clock (the engine reads it once per token) whose ``opens_at``-th read waits until another request is
    queued for the model, then never waits again: the other request certainly arrives while the long answer is
    generating, on any machine (a condition, not a timed race)."""

    def __init__(self, engine: ChatEngine, opens_at: int = 3) -> None:
        import threading

        self.engine, self.opens_at, self.reads, self._lock = engine, opens_at, 0, threading.Lock()

    def __call__(self) -> float:
        import time

        with self._lock:
            self.reads += 1
            gate = self.reads == self.opens_at
        if gate:
            wait_until(self.engine._turns.others_waiting, "another request to queue for the model", every=0.01)
        return time.monotonic()


# Long enough for several 16-token slices, short enough for a busy 2-core machine.
FAIR_LONG = SamplingSettings(max_new_tokens=100, temperature=0.0)
SAMPLED_LONG = SamplingSettings(max_new_tokens=100, temperature=0.9, top_p=0.9, seed=3)


@pytest.mark.parametrize("side, settings", [("pair", FAIR_LONG), ("one", FAIR_LONG), ("pair", SAMPLED_LONG)],
                         ids=["pair-greedy", "one-greedy", "pair-sampled"])
def test_a_short_question_is_answered_while_a_long_answer_is_still_generating(model_cfg, adapters, side, settings):
    """Issue 32: a visitor's long answer must not make another visitor's 'hi' wait for all of it. The answers
    take turns in slices of 16 tokens: 'hi' (with another adapter, so the slices switch adapters in between)
    finishes while the long answer is still writing, and the long answer, continued from its own KV cache, is token
    for token the one it writes alone (greedy), or the same draw from its seed (sampled)."""
    import threading

    engine = ChatEngine(max_seconds=0)
    short_settings = SamplingSettings(max_new_tokens=4, temperature=0.0)

    def long_stream():
        return (engine.stream_pair("Tell me a story", [], [], model_cfg, "run-a", adapters["run-a"], settings)
                if side == "pair" else engine.stream("Tell me a story", [], model_cfg, "run-a", adapters["run-a"],
                                                     settings))

    alone = list(long_stream())  # unsliced: nobody else waits
    short_alone = list(engine.stream("hi", [], model_cfg, "run-b", adapters["run-b"], short_settings))[-1]
    engine.clock = _GateClock(engine)
    frames: list[Any] = []
    started = threading.Event()

    def long_request() -> None:
        for texts in long_stream():
            frames.append(texts)
            started.set()

    thread = threading.Thread(target=long_request)
    thread.start()
    started.wait()
    short = list(engine.stream("hi", [], model_cfg, "run-b", adapters["run-b"], short_settings))
    long_frames_when_short_ended = len(frames)
    thread.join()
    assert len(alone) > 2 * engine.slice_tokens  # long enough to be sliced
    assert long_frames_when_short_ended < len(frames)  # the short answer ended while the long one was generating
    assert long_frames_when_short_ended <= 2 * engine.slice_tokens  # ...within its first slices, not at its end
    assert short[-1] == short_alone  # and in full
    assert frames[-1] == alone[-1]  # the long answer is the same as when nobody interrupted it
    assert engine.idle()


@pytest.mark.parametrize("side", ["pair", "one"])
def test_a_closed_stream_stops_generating_and_frees_the_model(model_cfg, adapters, side):
    """gradio closes the generator when the client disconnects or the request is cancelled: generation must stop
    at its next token (not run on to 400 tokens) and the lock must be free once close() returns."""
    clock = StepClock()
    engine = ChatEngine(max_seconds=0, clock=clock)  # no time budget: only the close can stop it
    stream = (engine.stream_pair("Tell me a story", [], [], model_cfg, "run-a", adapters["run-a"], LONG)
              if side == "pair" else engine.stream("Tell me a story", [], model_cfg, settings=LONG))
    next(stream)
    next(stream)
    stream.close()
    assert not generation_threads()
    assert engine.idle()
    assert clock.reads < LONG.max_new_tokens // 4  # generation stopped within a few tokens of the close


# --- the Chat tab: a policy against its starting adapter ------------------------------------------------------


def _tab_answers(manager, engine, run_id: str, compare: str, store=None) -> tuple[str, str]:
    from components.chat_tab import chat

    frames = list(chat(manager, engine, store, "Hello there", run_id, [], [], 12, 0.0, 0.9, 0, False, None,
                       compare))
    left, right, _, _ = frames[-1]
    return left[-1]["content"], right[-1]["content"]


def test_the_chat_tab_compares_a_policy_with_its_starting_adapter(policy_runs, engine, model_cfg, adapters,
                                                                  tmp_path):
    from components.chat_tab import select_adapter
    from finetune.services.feedback import FeedbackStore

    store = FeedbackStore(tmp_path / "feedback.db")
    left, right = _tab_answers(policy_runs, engine, "dpo-run", "start", store)
    assert left == list(engine.stream("Hello there", [], model_cfg, "sft-run", adapters["run-a"], GREEDY))[-1]
    assert right == list(engine.stream("Hello there", [], model_cfg, "dpo-run", adapters["run-b"], GREEDY))[-1]
    base_left, base_right = _tab_answers(policy_runs, engine, "dpo-run", "base")
    assert base_left == list(engine.stream("Hello there", [], model_cfg, settings=GREEDY))[-1] != left
    assert base_right == right
    # The stored left answer names the adapter that gave it, so feedback never calls it the base model's.
    stored = store._rows("SELECT side, adapter FROM generations", ())
    assert sorted((row["side"], row["adapter"]) for row in stored) == [("base", "sft-run"), ("tuned", "dpo-run")]
    # "Compare with" is offered for the DPO run only, and refused for a run that started from nothing.
    assert select_adapter(policy_runs, "dpo-run")[3].visible is True
    assert select_adapter(policy_runs, "sft-run")[3].visible is False
    import gradio as gr

    with pytest.raises(gr.Error, match="did not start from an adapter"):
        _tab_answers(policy_runs, engine, "sft-run", "start")


# --- fair use through gradio's own queue: a visible position, and a cancelled request stops -------------------


@contextlib.contextmanager
def _served_chat_tab(manager, engine):
    """The real Chat tab behind gradio's real queue on a free loopback port, queued as app.main() queues the app
    (the tab's own engine, so the test can see its lock and clock)."""
    import socket

    import gradio as gr

    from components.chat_tab import build_chat_tab
    from components.page_loads import answer_page_loads

    with gr.Blocks() as demo:
        build_chat_tab(manager, engine, None)
        answer_page_loads(demo)  # as the app does
    demo.queue(default_concurrency_limit=4)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def _wait_for(condition) -> Any:
    """Poll until ``condition()`` is truthy (a wait on a condition, not a timed sleep); returns its value."""
    return wait_until(condition, "the chat condition", every=0.05)


def test_through_gradio_a_short_chat_is_answered_during_a_long_one_and_stop_frees_the_model(policy_runs,
                                                                                          model_cfg):
    """The Chat tab behind gradio's queue: a second visitor's 'hi' streams its answer while the first visitor's
    400-token answer is still generating (the chat slot lets both in and the engine gives them turns); then the
    long one is cancelled (what Stop and a closed tab do), its generation ends and the model is free."""

    clock = SlowClock(slow_from=4)
    engine = ChatEngine(max_seconds=0, clock=clock)  # no time budget: only the cancel can end the long answer
    with _served_chat_tab(policy_runs, engine) as url:
        busy, other = app_client(url), app_client(url)
        long_job = busy.submit("Tell me a story", "sft-run", [], [], 400, 0.0, 0.9, 0, api_name="/chat")
        _wait_for(lambda: clock.generating.is_set() or long_job.done())
        assert not long_job.done(), long_job.exception()  # the long answer is generating
        short_job = other.submit("hi", "sft-run", [], [], 4, 0.0, 0.9, 0, api_name="/chat")
        left, right, _ = short_job.result()  # the other visitor is served...
        assert right[-1]["role"] == "assistant" and right[-1]["content"]
        assert not long_job.done()  # ...while the long answer still runs
        long_job.cancel()  # what gradio does when a client goes away, too: it closes the handler's generator
        _wait_for(lambda: not generation_threads())
    assert engine.idle()  # nothing holds the model any more
    assert clock.reads < 300  # the cancelled answer stopped long before its 400 tokens


def test_operator_limits_are_stricter_on_a_space_and_the_operator_decides(monkeypatch):
    from finetune.services.chat import _operator_setting

    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv("LORA_LAB_MAX_SECONDS", raising=False)
    assert _operator_setting("LORA_LAB_MAX_SECONDS", "600", "60") == 600
    monkeypatch.setenv("SPACE_ID", "someone/lora-lab")
    assert _operator_setting("LORA_LAB_MAX_SECONDS", "600", "60") == 60
    monkeypatch.setenv("LORA_LAB_MAX_SECONDS", "15")
    assert _operator_setting("LORA_LAB_MAX_SECONDS", "600", "60") == 15
