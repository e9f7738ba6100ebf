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
