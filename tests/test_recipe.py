"""The training recipe: per-hardware choices, padding-free batches that train exactly like padded ones, and the
packed attention that keeps rows apart. Speed itself is measured by bench/train_throughput.py, not here."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch

from finetune.core.attention import register, varlen_supported
from finetune.core.config import ConfigError, from_dict
from finetune.core.hardware import profile_for
from finetune.core.recipe import resolve_recipe
from finetune.stages.sft import build

from helpers import ROOT, tiny_run_config

CPU = profile_for("cpu", "CPU (2 cores)", 24.0)
T4 = profile_for("cuda", "Tesla T4", 15.0, (7, 5))
H100 = profile_for("cuda", "NVIDIA H100", 79.0, (9, 0))


def _config(source: str = "HuggingFaceTB/SmolLM2-1.7B-Instruct", **training):
    return from_dict({"model": {"source": source, "bits": 4}, "lora": {"rank": 16, "target_modules": "all-linear"},
                      "data": {"max_seq_length": training.pop("max_seq_length", 1024)},
                      "training": {"batch_size": training.pop("batch_size", 4), **training}})


def test_old_boolean_checkpointing_still_loads_and_bad_values_are_named():
    assert _config(gradient_checkpointing=True).training.gradient_checkpointing == "on"
    assert _config(gradient_checkpointing=False).training.gradient_checkpointing == "off"
    with pytest.raises(ConfigError) as error:
        _config(gradient_checkpointing="sometimes", padding_free="yes")
    assert set(error.value.problems) == {"training.gradient_checkpointing", "training.padding_free"}


def test_cpu_recipe_skips_gpu_only_parts_and_says_why():
    recipe = resolve_recipe(_config(), CPU)
    assert recipe.padding_free and recipe.packed_attention and not recipe.liger_kernels  # row-by-row SDPA
    assert not recipe.gradient_checkpointing and recipe.optimizer == "adamw_torch"
    assert any("Liger" in note for note in recipe.notes)


def test_gpu_recipe_fuses_the_optimizer_and_packs_attention_only_on_ampere_or_newer():
    assert resolve_recipe(_config(), H100).optimizer == "adamw_torch_fused"
    assert resolve_recipe(_config(), H100).packed_attention == varlen_supported((9, 0))
    assert not resolve_recipe(_config(), T4).packed_attention  # flash attention needs compute capability 8.0
    assert any("block mask" in note for note in resolve_recipe(_config(), T4).notes)
    off = _config(padding_free=False)
    assert not resolve_recipe(off, H100).packed_attention and not resolve_recipe(off, H100).padding_free


def test_auto_checkpointing_follows_the_memory_estimate():
    # The 1.7 B preset (shape known offline): short rows fit a T4 without recomputation, long batches do not.
    small = resolve_recipe(_config(batch_size=1, max_seq_length=256), T4)
    large = resolve_recipe(_config(batch_size=16, max_seq_length=2048), T4)
    assert not small.gradient_checkpointing and large.gradient_checkpointing
    assert not resolve_recipe(_config(batch_size=16, max_seq_length=2048), H100).gradient_checkpointing
    forced = _config(batch_size=1, max_seq_length=256, gradient_checkpointing="on")
    assert resolve_recipe(forced, T4).gradient_checkpointing


def test_packed_rows_attend_only_within_their_own_row():
    """A packed row through the registered attention gives each row the logits it gets alone."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()
    rows = [torch.randint(0, 100, (n,)) for n in (5, 9, 3)]
    with torch.no_grad():
        alone = torch.cat([model(input_ids=r[None]).logits[0] for r in rows])
        model.set_attn_implementation(register())
        positions = torch.cat([torch.arange(len(r)) for r in rows])[None]
        packed = model(input_ids=torch.cat(rows)[None], position_ids=positions).logits[0]
        plain_causal = model(input_ids=torch.cat(rows)[None]).logits[0]  # one long row: rows DO see each other
    assert torch.allclose(packed, alone, atol=1e-5)
    assert not torch.allclose(plain_causal[5:], alone[5:], atol=1e-3)


def test_packed_rows_get_the_gradients_they_get_alone():
    """Training goes through the row-by-row path on the CPU: its gradients must be those of each row alone."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    rows = [torch.randint(0, 100, (n,)) for n in (6, 11, 4)]

    def gradient(packed: bool) -> torch.Tensor:
        model.zero_grad()
        if packed:
            model.set_attn_implementation(register())
            positions = torch.cat([torch.arange(len(r)) for r in rows])[None]
            logits = model(input_ids=torch.cat(rows)[None], position_ids=positions).logits[0]
        else:
            model.set_attn_implementation("sdpa")
            logits = torch.cat([model(input_ids=r[None]).logits[0] for r in rows])
        logits.pow(2).mean().backward()
        return model.model.layers[0].self_attn.q_proj.weight.grad.clone()

    assert torch.allclose(gradient(packed=True), gradient(packed=False), atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not varlen_supported(
    torch.cuda.get_device_capability() if torch.cuda.is_available() else None), reason="needs an Ampere+ GPU")
def test_varlen_flash_kernel_matches_rows_alone_on_the_gpu():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=128, intermediate_size=256,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    model = model.to("cuda", torch.bfloat16).eval()
    rows = [torch.randint(0, 100, (n,), device="cuda") for n in (17, 40, 9)]
    with torch.no_grad():
        alone = torch.cat([model(input_ids=r[None]).logits[0] for r in rows]).float()
        model.set_attn_implementation(register())
        positions = torch.cat([torch.arange(len(r), device="cuda") for r in rows])[None]
        packed = model(input_ids=torch.cat(rows)[None], position_ids=positions).logits[0].float()
    assert torch.allclose(packed, alone, atol=0.05, rtol=0.05)


def _first_loss(cfg, run_dir) -> float:
    trainer = build(cfg, run_dir).trainer
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, batch).item()


def test_padding_free_batches_give_the_same_loss_as_padded_ones(tiny_model_dir, qa_file, tmp_path):
    """Same rows, same weights: the padding-free loss must equal the padded loss (no leakage, no lost labels)."""
    cfg = tiny_run_config(tiny_model_dir, qa_file, bits=32, max_steps=1, batch_size=4)
    cfg.data.validation_fraction = 0.0
    padded = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, padding_free=False))
    free_loss = _first_loss(cfg, tmp_path / "free")
    padded_loss = _first_loss(padded, tmp_path / "padded")
    assert free_loss == pytest.approx(padded_loss, rel=1e-4)


def test_run_info_records_the_resolved_recipe(tiny_model_dir, qa_file, tmp_path):
    import json

    from finetune.train import run

    cfg = tiny_run_config(tiny_model_dir, qa_file, max_steps=1, eval_steps=0)
    assert run(cfg, tmp_path) == 0
    recipe = json.loads((tmp_path / "run_info.json").read_text())["recipe"]
    assert recipe["padding_free"] is True and recipe["gradient_checkpointing"] is False
    assert recipe["notes"]


def test_benchmark_runs_both_recipes_on_the_same_rows():
    """The benchmark itself (2 steps each, tiny shape): both recipes finish and see the same useful tokens."""
    sys.path.insert(0, str(ROOT / "bench"))
    import train_throughput

    results = train_throughput.main(["--model", "llama-tiny", "--steps", "3", "--warmup", "1", "--rows", "24",
                                     "--max-len", "64", "--batch", "4"])
    assert [r.recipe for r in results] == ["baseline", "default"]
    assert all(r.tokens_per_second > 0 and r.losses and len(r.losses) == 3 for r in results)
    # Same rows, same order, same answer tokens scored, LoRA B starts at zero: the first losses agree closely.
    assert abs(results[0].losses[0] - results[1].losses[0]) < 1e-3
