"""The pre-run estimates: LoRA parameter counts agree with peft's, and memory grows with the bit width."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from finetune.core.config import LoraSettings, from_dict
from finetune.core.estimate import T4_MEMORY_GB, estimate_memory, lora_parameter_count, model_shape, shape_from_config
from finetune.core.hardware import profile_for

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


def test_cpu_logits_are_counted_whole_only_below_the_lm_heads_limit():
    """finetune/core/lm_head.py holds the answer tokens' logits whole on the CPU; above its limit it hands the batch to
    TRL's tiles, and so does the GPU: the estimate must follow it, not charge the limit itself."""
    from finetune.core.lm_head import WHOLE_LOGITS_LIMIT

    shape = shape_from_config(LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                          num_hidden_layers=2, num_attention_heads=16))
    cpu, t4 = profile_for("cpu", "CPU", 64.0), profile_for("cuda", "Tesla T4", T4_MEMORY_GB, (7, 5))
    small = _run(4, batch_size=1)  # 512 tokens: 66M logits, under the limit
    assert estimate_memory(shape, small, cpu).logits_gb == pytest.approx(512 * 128256 * 12 / 2**30)
    off = _run(4, batch_size=1, cpu_lm_head=False)
    tiled = estimate_memory(shape, off, cpu).logits_gb
    assert tiled < estimate_memory(shape, small, cpu).logits_gb and tiled == estimate_memory(shape, small, t4).logits_gb
    large = _run(4, batch_size=16)  # 8192 tokens: over the limit, TRL's tiles
    assert 8192 * 128256 > WHOLE_LOGITS_LIMIT
    assert estimate_memory(shape, large, cpu).logits_gb == estimate_memory(shape, large, t4).logits_gb == tiled


def test_shape_of_a_local_folder_needs_no_weights(tiny_model_dir):
    cfg = from_dict({"model": {"source": str(tiny_model_dir)}}).model
    shape = model_shape(cfg)
    assert shape.num_layers == 2 and shape.hidden_size == 64
    assert shape.output_layer == "lm_head"
