"""The pre-run estimates: LoRA parameter counts agree with peft's, and memory grows with the bit width."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from finetune.config import LoraSettings, from_dict
from finetune.estimate import (T4_MEMORY_GB, estimate_memory, lora_parameter_count, model_shape,
                               shape_from_config)
from finetune.hardware import profile_for

TINY = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


def _peft_counts(lora: LoraSettings) -> tuple[int, int]:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(TINY), LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, target_modules=lora.target_module_list(), bias=lora.bias,
        task_type="CAUSAL_LM"))
    return model.get_nb_trainable_parameters()


@pytest.mark.parametrize("targets, rank", [("all-linear", 8), ("q_proj,v_proj", 4), ("down_proj", 16)])
def test_lora_count_matches_peft(targets, rank):
    lora = LoraSettings(rank=rank, alpha=2 * rank, target_modules=targets)
    assert lora_parameter_count(shape_from_config(TINY), lora) == _peft_counts(lora)


def test_count_grows_linearly_with_rank():
    shape = shape_from_config(TINY)
    small, _ = lora_parameter_count(shape, LoraSettings(rank=4))
    big, _ = lora_parameter_count(shape, LoraSettings(rank=16))
    assert big == 4 * small


def _run(bits: int, **training):
    return from_dict({"model": {"source": "org/unused", "bits": bits},
                      "training": {"batch_size": 4, **training}, "data": {"max_seq_length": 512}})


def test_memory_orders_by_bit_width():
    shape = shape_from_config(LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                          num_hidden_layers=32, num_attention_heads=32))
    t4 = profile_for("cuda", "Tesla T4", T4_MEMORY_GB, (7, 5))
    totals = [estimate_memory(shape, _run(bits), t4).total_gb for bits in (4, 8, 16, 32)]
    assert totals == sorted(totals) and len(set(totals)) == 4
    # A 7B model: 4-bit weights ~3.5-4 GB, 32-bit ~27 GB; the verdicts say so plainly.
    four, thirty_two = (estimate_memory(shape, _run(b, gradient_checkpointing="on"), t4) for b in (4, 32))
    assert 3 < four.weights_gb < 5 and 20 < thirty_two.weights_gb < 30
    assert four.fits and "fits" in four.verdict
    assert not thirty_two.fits and "will NOT fit" in thirty_two.verdict


def test_memory_grows_with_batch_and_sequence():
    shape = shape_from_config(TINY)
    cpu = profile_for("cpu", "CPU", 8.0)
    small = estimate_memory(shape, _run(4, batch_size=2), cpu).total_gb
    assert estimate_memory(shape, _run(4, batch_size=8), cpu).total_gb > small


def test_shape_of_a_local_folder_needs_no_weights(tiny_model_dir):
    cfg = from_dict({"model": {"source": str(tiny_model_dir)}}).model
    shape = model_shape(cfg)
    assert shape.num_layers == 2 and shape.hidden_size == 64
    assert shape.output_layer == "lm_head"
