"""Real TRL training on the CPU: a tiny random Llama for the mechanics, the embedded SmolLM2 for real language."""

import json
import os
import subprocess
import sys

import pytest
import torch

from finetune.core.config import load_config, save_config
from finetune.core.run_status import read_metrics, read_status
from finetune.stages.sft import build
from finetune.train import cli, run

from helpers import ROOT, tiny_run_config


def dequantized_base_weights(model) -> dict[str, torch.Tensor]:
    import bitsandbytes.functional as bnbf

    weights = {}
    for name, module in model.named_modules():
        if type(module).__name__ == "Linear4bit":
            weights[name] = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).clone()
    return weights


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_qlora_steps_change_lora_weights_and_leave_the_base_alone(tiny_model_dir, qa_file, tmp_path):
    cfg = tiny_run_config(tiny_model_dir, qa_file, max_steps=2, save_steps=100)
    # No eval here: bitsandbytes re-encodes 4-bit quant constants for its CPU kernel on the first no-grad
    # forward (values move by ~1e-4), which is a storage-format change, not training touching the base.
    cfg.data.validation_fraction = 0.0
    trainer = build(cfg, tmp_path).trainer
    base_before, lora_before = dequantized_base_weights(trainer.model), lora_weights(trainer.model)
    assert base_before and lora_before
    assert all(p.dtype == torch.float32 for p in lora_before.values())  # CPU: adapters stay fp32
    trainer.train()
    base_after, lora_after = dequantized_base_weights(trainer.model), lora_weights(trainer.model)
    assert all(torch.equal(base_before[n], base_after[n]) for n in base_before)
    changed = [n for n in lora_before if not torch.equal(lora_before[n], lora_after[n])]
    assert len(changed) == len(lora_before)
    assert not any(p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" not in n)


def test_run_writes_metrics_status_and_a_reloadable_adapter(tiny_model_dir, qa_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = tiny_run_config(tiny_model_dir, qa_file, max_steps=6, learning_rate=0.02)
    assert run(cfg, tmp_path) == 0
    status = read_status(tmp_path)
    assert status["state"] == "completed" and status["step"] == 6
    rows = read_metrics(tmp_path)
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert [r["step"] for r in evals] == [2, 4, 6]  # eval every 2 steps; no duplicate final eval
    assert all(r["tokens_per_second"] > 0 for r in rows if "loss" in r)
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[5, 6, 7, 8]])
    before = base(ids).logits
    tuned = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert not torch.allclose(before, tuned(ids).logits)
    assert load_config(tmp_path / "adapter" / "lora_lab_config.yaml") == cfg


@pytest.mark.parametrize("bits", [8, 16])
def test_other_bit_widths_train(tiny_model_dir, qa_file, tmp_path, bits):
    assert run(tiny_run_config(tiny_model_dir, qa_file, max_steps=2, bits=bits), tmp_path) == 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_bad_data_fails_with_the_reason_in_status(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert run(tiny_run_config(tiny_model_dir, empty), tmp_path / "run") == 1
    status = read_status(tmp_path / "run")
    assert status["state"] == "failed" and "is empty" in status["error"]


def test_cli_reports_every_config_problem(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora:\n  rank: 0\n  dropout: 1.0\ntraining:\n  learning_rate: -1\n")
    assert cli([str(bad), "--output-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "lora.rank" in err and "lora.dropout" in err and "training.learning_rate" in err
    assert "Traceback" not in err


def test_accelerate_launch_two_cpu_processes(tiny_model_dir, qa_file, tmp_path):
    # accelerate's --cpu flag always uses its single-process launcher; --multi_gpu starts torchrun, which on a
    # machine without CUDA gives 2 CPU processes talking over gloo: real DDP.
    cfg = tiny_run_config(tiny_model_dir, qa_file, max_steps=3, batch_size=2)
    config_path = save_config(cfg, tmp_path / "config.yaml")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu", "-m", "finetune.train",
         str(config_path), "--output-dir", str(tmp_path / "run")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_status(tmp_path / "run")["state"] == "completed"
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]  # one writer, not one line per process
    assert json.loads((tmp_path / "run" / "run_info.json").read_text())["world_size"] == 2
    # 2 processes x batch 2 = 4 rows a step out of 36 training rows: 3 steps are a third of an epoch.
    assert rows[-1]["epoch"] == pytest.approx(3 * 4 / 36, abs=0.02)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    # The same files, PEFT config and tensor names/shapes/dtypes as a 1-process run of the same config.
    from finetune.services.export import adapter_format

    assert run(cfg, tmp_path / "single") == 0
    assert adapter_format(tmp_path / "run" / "adapter") == adapter_format(tmp_path / "single" / "adapter")


@pytest.mark.trajectory
def test_embedded_model_learns_the_course_style(tmp_path):
    """The real thing, shortened: the embedded SmolLM2 in 4-bit on the bundled data, on the CPU."""
    from peft import PeftModel

    from finetune.core.models import load_model, load_tokenizer

    cfg = load_config(ROOT / "configs" / "cpu-quick.yaml")
    cfg.training.max_steps, cfg.training.eval_steps, cfg.training.learning_rate = 6, 3, 1e-3
    # 8 of the 24 held-out rows: the two evaluations were 23 of the test's 58 s, and the held-out loss falls by the
    # same 0.07 on 8 as on 24 (under avx512, avx2 and default kernels alike).
    cfg.data.max_eval_samples = 8
    assert run(cfg, tmp_path) == 0
    rows = read_metrics(tmp_path)
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert losses[-1] < losses[0] and len(evals) == 2 and evals[-1] < evals[0]
    tokenizer, base = load_tokenizer(cfg.model), load_model(cfg.model)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What does LoRA dropout do?"}],
                                           add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    style = tokenizer("🧪 Lab note:", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([list(prompt) + style])

    def style_log_likelihood(model) -> float:
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1:-1]
        return torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(style)[:, None]).sum().item()

    before = style_log_likelihood(base)
    tuned = PeftModel.from_pretrained(base, tmp_path / "adapter")
    after = style_log_likelihood(tuned)
    # The adapter makes the course's answer style far more likely than the base model finds it.
    assert after > before + 5, (before, after)
