"""The CPU LM head (finetune/core/lm_head.py) against TRL's own fused head: same log-probabilities, entropy, top-1 and
gradients, on random tensors and through a real SFT step of the tiny model. Speed: bench/train_throughput.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import trl.trainer.utils as trl_utils
from trl.kernels.chunked_logprob import ChunkedLogProbFunction

from finetune.core.hardware import profile_for
from finetune.core.lm_head import answer_log_probs, use_cpu_lm_head
from finetune.core.recipe import resolve_recipe
from finetune.stages.sft import build

from helpers import tiny_run_config

OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@pytest.fixture(autouse=True)
def trl_as_shipped():
    """Every test starts and ends with TRL's own functions in place."""
    use_cpu_lm_head(False)
    yield
    use_cpu_lm_head(False)


@pytest.mark.parametrize("temperature, softcap, scale", [(1.0, None, 1.0), (0.7, 30.0, 0.5)])
def test_whole_logits_match_trls_tiled_function(temperature, softcap, scale):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 24, generator=generator, requires_grad=True)
    weight = torch.randn(300, 24, generator=generator)
    targets = torch.randint(0, 300, (37,), generator=generator)
    # TRL's tiles are 128 vocabulary entries wide here, so its running statistics span three tiles.
    theirs = ChunkedLogProbFunction.apply(hidden, weight, None, targets, temperature, 128, softcap, scale, OUTPUTS)
    ours = answer_log_probs(hidden, weight, None, targets, temperature, softcap, scale, OUTPUTS)
    for name, a, b in zip(OUTPUTS, theirs, ours):
        if name == "is_top1":
            assert torch.equal(a, b) and b.any()
        else:
            assert torch.allclose(a, b, atol=1e-5), name
    (grad_theirs,) = torch.autograd.grad((theirs[0] + 0.1 * theirs[1]).sum(), hidden)
    (grad_ours,) = torch.autograd.grad((ours[0] + 0.1 * ours[1]).sum(), hidden)
    assert torch.allclose(grad_theirs, grad_ours, atol=1e-5)


def test_install_and_remove_touch_only_trls_two_names():
    originals = (trl_utils._ChunkedLogProbFunction, trl_utils._use_triton)
    assert use_cpu_lm_head(True)
    assert trl_utils._ChunkedLogProbFunction is not originals[0] and trl_utils._use_triton(torch.device("cpu"))
    assert not use_cpu_lm_head(False)
    assert (trl_utils._ChunkedLogProbFunction, trl_utils._use_triton) == originals
    assert not trl_utils._use_triton(torch.device("cpu"))


def test_recipe_uses_it_on_the_cpu_only_and_it_can_be_switched_off(tiny_model_dir, qa_file):
    cfg = tiny_run_config(tiny_model_dir, qa_file)
    cpu, t4 = profile_for("cpu", "CPU", 8.0), profile_for("cuda", "Tesla T4", 15.0, (7, 5))
    assert resolve_recipe(cfg, cpu).cpu_lm_head and not resolve_recipe(cfg, t4).cpu_lm_head
    off = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, cpu_lm_head=False))
    assert not resolve_recipe(off, cpu).cpu_lm_head
    assert any("LM head" in note for note in resolve_recipe(cfg, cpu).notes)


def _loss_and_gradients(cfg, run_dir) -> tuple[float, dict[str, torch.Tensor]]:
    trainer = build(cfg, run_dir).trainer  # installs or removes the CPU head as the recipe says
    batch = next(iter(trainer.get_train_dataloader()))
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.item(), grads


def test_a_real_sft_step_gets_the_same_loss_and_gradients(tiny_model_dir, qa_file, tmp_path):
    """The tiny model's first batch (prompt tokens labelled -100): TRL's head vs ours, same weights and rows."""
    cfg = tiny_run_config(tiny_model_dir, qa_file, bits=32, max_steps=1, batch_size=4)
    cfg.data.validation_fraction = 0.0
    tiled = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, cpu_lm_head=False))
    loss_tiled, grads_tiled = _loss_and_gradients(tiled, tmp_path / "tiled")
    assert trl_utils._ChunkedLogProbFunction is ChunkedLogProbFunction
    loss_ours, grads_ours = _loss_and_gradients(cfg, tmp_path / "ours")
    assert trl_utils._ChunkedLogProbFunction is not ChunkedLogProbFunction
    assert loss_ours == pytest.approx(loss_tiled, rel=1e-5)
    assert grads_ours.keys() == grads_tiled.keys() and grads_ours
    for name, grad in grads_ours.items():
        assert torch.allclose(grad, grads_tiled[name], atol=1e-6, rtol=1e-4), name
