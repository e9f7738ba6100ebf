"""ChatEngine on a tiny random Llama: adapters attach to one base, base and adapter answers differ, text streams."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from finetune.chat import ChatEngine, SamplingSettings, normalize_history
from finetune.config import ModelConfig

GREEDY = SamplingSettings(max_new_tokens=12, temperature=0.0)


def _make_adapter(model_dir: Path, folder: Path, seed: int, targets: list[str]) -> Path:
    """A LoRA adapter with random, non-zero B matrices, so it really changes the output."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {"run-a": _make_adapter(tiny_model_dir, root / "a", 1, ["q_proj", "v_proj"]),
            "run-b": _make_adapter(tiny_model_dir, root / "b", 2, ["o_proj", "down_proj"])}


@pytest.fixture(scope="module")
def engine() -> ChatEngine:
    return ChatEngine()


@pytest.fixture(scope="module")
def model_cfg(tiny_model_dir) -> ModelConfig:
    return ModelConfig(source=str(tiny_model_dir), bits=32)


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
    import time

    settings = _FailingSettings(max_new_tokens=4, temperature=0.0)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="Generation failed"):
        if side == "pair":
            engine.answer_pair("Hello", [], [], model_cfg, "run-a", adapters["run-a"], settings)
        else:
            list(engine.stream("Hello", [], model_cfg, settings=settings))
    assert time.monotonic() - started < 60  # not the 600 s lock timeout
    assert engine.answer_pair("Hello", [], [], model_cfg, "run-a", adapters["run-a"], GREEDY)[1]  # still serves


def test_in_own_thread_returns_and_raises_in_the_caller():
    import threading

    from finetune.chat import in_own_thread

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
    from finetune.hardware import profile_for

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
