"""Measurements of GGUF files: the Quantization tab's GGUF rows (a base model written at each type, loaded back,
its size, perplexity and a greedy answer) and how far a run's built file drifts from the adapter the Chat tab
answers with."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.core.gguf_reading import QuickReader, load_gguf_model
from finetune.core.models import from_hub_or_cache, load_tokenizer
from finetune.services.export import adapter_dir, run_config
from finetune.services.gguf_convert import GgufExport, check_type, convert_folder


# --- the Quantization tab's GGUF rows -----------------------------------------------------------------------------

# The matrices bitsandbytes quantizes (every Linear but the LM head), by their llama.cpp names: the GGUF rows of the
# Quantization tab count the same layers as its bitsandbytes rows.
LINEAR_TENSORS = re.compile(r"blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up|down))\.weight$")


@dataclass(frozen=True)
class GgufMeasurement:
    out_type: str
    file_bytes: int
    layer_bytes: int      # the quantized layers' bytes in the file (blocks with their scales)
    weights: int          # weights in those layers
    loss: float
    perplexity: float
    answer: str           # greedy answer of the file's weights, dequantized to fp32 by transformers


def saved_model_dir(source: str, scratch: Path) -> Path:
    """A folder holding ``source`` as safetensors: the embedded model's cache, a local folder that has them, or
    a copy saved into ``scratch``."""
    from transformers import AutoModelForCausalLM

    from finetune.core.models import resolve_source

    folder = Path(resolve_source(source))
    if folder.is_dir() and any(folder.glob("*.safetensors")):
        return folder
    model = from_hub_or_cache(AutoModelForCausalLM.from_pretrained, source, dtype="float32")
    model.save_pretrained(scratch / "model")
    return scratch / "model"


def measure_gguf(source: str, out_type: str, rows: Any, prompt: str, max_new_tokens: int = 32,
                 batch_size: int = 4) -> GgufMeasurement:
    """Write ``source`` as a GGUF of ``out_type`` into a temp folder, load it back with transformers' GGUF loader,
    and measure its size, perplexity on ``rows`` and a greedy answer (speed is llama.cpp's business, not
    measured: the loaded copy is dequantized fp32)."""
    import tempfile

    import torch

    from finetune.core.config import ModelConfig
    from finetune.services.evaluate import dataset_loss

    out_type = check_type(out_type)
    tokenizer = load_tokenizer(ModelConfig(source=source))
    with tempfile.TemporaryDirectory(prefix="lora-lab-gguf-") as scratch:
        model_dir = saved_model_dir(source, Path(scratch))
        result = convert_folder(model_dir, Path(scratch) / f"model-{out_type}.gguf", out_type, tokenizer, out_type)
        layers = {name: qtype for name, qtype in result.tensor_types.items() if LINEAR_TENSORS.match(name)}
        layer_bytes, weights = _layer_bytes(result.path, set(layers))
        model = load_gguf_model(result.path).eval()
        loss = dataset_loss(model, tokenizer, rows, batch_size=batch_size)
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        batch = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(output[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        return GgufMeasurement(out_type, result.size_bytes, layer_bytes, weights, loss.loss, loss.perplexity,
                               answer)


def _layer_bytes(path: Path, names: set[str]) -> tuple[int, int]:
    """(bytes, weights) of the named tensors as stored in the file, read back with gguf's reader."""
    tensors = [t for t in QuickReader(path).tensors if t.name in names]
    return sum(int(t.n_bytes) for t in tensors), sum(int(t.n_elements) for t in tensors)


# --- how far a built file drifts from the adapter the Chat tab answers with ---------------------------------------

DRIFT_PROMPTS = 3        # held-out prompts whose greedy answers are compared token by token
DRIFT_TOKENS = 24        # tokens generated per prompt


@dataclass(frozen=True)
class GgufDrift:
    out_type: str
    adapter_loss: float
    gguf_loss: float
    rows: int
    held_out: bool
    agreement: tuple[int, ...]  # per prompt: how many leading greedy tokens the file and the adapter share
    tokens: int

    def summary(self) -> str:
        where = "held-out rows" if self.held_out else "training rows (the run kept no validation rows)"
        agree = ", ".join(str(n) for n in self.agreement)
        same = sum(n == self.tokens for n in self.agreement)
        return (f"How far the {self.out_type} file drifts from the adapter as the Chat tab runs it: loss on the same "
                f"{self.rows} {where} {self.adapter_loss:.4f} (adapter) vs {self.gguf_loss:.4f} (GGUF), difference "
                f"{self.gguf_loss - self.adapter_loss:+.4f}; greedy answers to {len(self.agreement)} held-out prompts "
                f"agree for the first {agree} of {self.tokens} tokens ({same} of {len(self.agreement)} identical). "
                "The merged model is the one that answers exactly as the Chat tab; a GGUF rounds it again.")


def _greedy_tokens(model: Any, tokenizer: Any, prompt: list[dict[str, str]], tokens: int) -> list[int]:
    import torch

    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    batch = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, batch["input_ids"].shape[1]:].tolist()


def _leading_agreement(first: list[int], second: list[int]) -> int:
    count = 0
    for a, b in zip(first, second):
        if a != b:
            break
        count += 1
    return count


def gguf_drift(run_dir: str | Path, gguf_file: str | Path, out_type: str, limit: int = 8) -> GgufDrift:
    """The built file against the adapter on its trained (quantized) base, as merge_report does for the merge:
    loss on the same rows and the greedy answers' agreement on the first held-out prompts (CPU, fp32)."""
    from peft import PeftModel

    from finetune.services.evaluate import dataset_loss
    from finetune.services.export import comparison_rows
    from finetune.core.hardware import profile_for
    from finetune.core.models import load_model

    run_dir, gguf_file = Path(run_dir), Path(gguf_file)
    cfg = run_config(run_dir)
    tokenizer = load_tokenizer(cfg.model)
    rows, held_out = comparison_rows(cfg, tokenizer, limit)
    prompts = [row["prompt"] for row in rows.select(range(min(DRIFT_PROMPTS, len(rows))))]
    length = cfg.data.max_seq_length
    adapter = PeftModel.from_pretrained(load_model(cfg.model, profile_for("cpu", "CPU", 0.0)), adapter_dir(run_dir))
    adapter.eval()
    adapter_loss = dataset_loss(adapter, tokenizer, rows, max_length=length).loss
    adapter_answers = [_greedy_tokens(adapter, tokenizer, p, DRIFT_TOKENS) for p in prompts]
    del adapter
    model = load_gguf_model(gguf_file).eval()
    gguf_loss = dataset_loss(model, tokenizer, rows, max_length=length).loss
    agreement = tuple(_leading_agreement(_greedy_tokens(model, tokenizer, p, DRIFT_TOKENS), answer)
                      for p, answer in zip(prompts, adapter_answers))
    return GgufDrift(out_type, adapter_loss, gguf_loss, len(rows), held_out, agreement, DRIFT_TOKENS)


def drift_text(run_dir: str | Path, result: GgufExport) -> str:
    """The drift of a built file, measured once per build and kept beside it (a reused file reuses its text)."""
    kept = result.path.with_name(result.path.name + ".drift.txt")
    if kept.is_file() and kept.stat().st_mtime >= result.path.stat().st_mtime:
        return kept.read_text(encoding="utf-8")
    text = gguf_drift(run_dir, result.path, result.out_type).summary()
    kept.write_text(text, encoding="utf-8")
    return text
