"""Does loading adapters change the base? The embedded SmolLM2-135M at 4-bit on the CPU, with and without the fix.

    python bench/chat_base_drift.py

One engine answers a greedy pair with adapter "a", then three more adapters load (peft's load_adapter each
time); after each load the base's next-token logits (adapters disabled) are compared with those before. "without
the fix" swaps ``finetune.services.chat._base_kept`` for a no-op, which is the engine as it was: peft's ``state_dict()``
call unpacks bitsandbytes' CPU-repacked 4-bit weights through a lossy inverse. The adapters are random LoRA r=8
(B ~ N(0, 0.02)), which is all the test needs: what matters is that loading them must not move the base.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import finetune.services.chat as chat  # noqa: E402
from finetune.core.config import ModelConfig  # noqa: E402
from finetune.core.models import embedded_model_dir  # noqa: E402

PROMPT = "What is LoRA in machine learning?"
GREEDY = chat.SamplingSettings(max_new_tokens=40, temperature=0.0)


def random_adapter(source: Path, folder: Path, seed: int, targets: list[str]) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(source),
                           LoraConfig(r=8, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    model.save_pretrained(folder)
    return folder


def drift(cfg: ModelConfig, first: Path, others: list[Path]) -> tuple[list[float], bool, bool]:
    """(max |logit change| of the base after each further load, base answer unchanged, tuned answer unchanged)."""
    engine = chat.ChatEngine()
    before = engine.answer_pair(PROMPT, [], [], cfg, "a", first, GREEDY)
    entry = engine.loaded(cfg)
    ids = entry.tokenizer(PROMPT, return_tensors="pt")

    def base_logits() -> torch.Tensor:
        with torch.inference_mode(), entry.model.disable_adapter():
            return entry.model(**ids).logits

    reference, changes = base_logits(), []
    for index, folder in enumerate(others):
        engine.attach(cfg, f"other-{index}", folder)
        changes.append((base_logits() - reference).abs().max().item())
    after = engine.answer_pair(PROMPT, [], [], cfg, "a", first, GREEDY)
    return changes, before[0] == after[0], before[1] == after[1]


def main() -> None:
    source, root = embedded_model_dir(), Path(tempfile.mkdtemp())
    first = random_adapter(source, root / "a", 1, ["q_proj", "v_proj"])
    second = random_adapter(source, root / "b", 2, ["o_proj", "down_proj"])
    kept = chat._base_kept
    for fixed in (False, True):
        chat._base_kept = kept if fixed else (lambda model: contextlib.nullcontext())
        for double_quant in (True, False):
            cfg = ModelConfig(source=str(source), bits=4, double_quant=double_quant)
            changes, base_same, tuned_same = drift(cfg, first, [second, first, second])
            print(f"{'with' if fixed else 'without'} the fix, double quant {'on' if double_quant else 'off'}: "
                  f"base logits max |change| after 1/2/3 more loads {[round(c, 4) for c in changes]}; "
                  f"same greedy base answer: {base_same}; same tuned answer: {tuned_same}", flush=True)
    chat._base_kept = kept


if __name__ == "__main__":
    main()
