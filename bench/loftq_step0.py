"""Does LoftQ's start bring the 4-bit model closer to the full-precision one? Measured at step 0, before training.

For the base of a config (default: configs/cpu-quick.yaml, the embedded SmolLM2 in 4-bit NF4), on the bundled
validation rows (no training happened, so no row was trained on):

- the weight reconstruction error sqrt(Σ‖W − (deq(Q) + s·B·A)‖²) / sqrt(Σ‖W‖²) with the default start (B = 0: the
  4-bit base alone) and with LoftQ, and the seconds each initialisation took;
- the answer-token loss of the full-precision base, the 4-bit default start and the 4-bit LoftQ start, each 4-bit
  start's loss minus the full-precision loss with a 95% paired-bootstrap interval over the rows.

    python bench/loftq_step0.py [--config configs/cpu-quick.yaml] [--rows 40]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.services.adapter_inspect import step0_model  # noqa: E402
from finetune.core.config import BUNDLED_DATASET, DataConfig, load_config  # noqa: E402
from finetune.services.evaluate import LossResult, dataset_loss, eval_rows, loss_difference_interval  # noqa: E402
from finetune.core.lora_init import reconstruction_error  # noqa: E402
from finetune.core.models import load_model, load_tokenizer  # noqa: E402


def loss_of(model: object, tokenizer: object, rows: object, max_length: int) -> LossResult:
    import torch

    with torch.no_grad():
        return dataset_loss(model, tokenizer, rows, batch_size=4, max_length=max_length)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/cpu-quick.yaml")
    parser.add_argument("--rows", type=int, default=40, help="bundled validation rows scored")
    args = parser.parse_args()
    cfg = load_config(args.config)
    rows = eval_rows(DataConfig(source=BUNDLED_DATASET, split="validation"), args.rows)
    tokenizer = load_tokenizer(cfg.model)
    length = cfg.data.max_seq_length
    full = loss_of(load_model(dataclasses.replace(cfg.model, bits=32)), tokenizer, rows, length)
    print(f"full-precision base: loss {full.loss:.4f} on {full.rows} rows ({full.tokens} answer tokens)")
    starts: dict[str, LossResult] = {}
    for init in ("default", "loftq"):
        model, seconds, folder = step0_model(cfg.model, cfg.lora, init)
        error, matrices = reconstruction_error(model, folder)  # before the first forward (bitsandbytes repacks)
        starts[init] = result = loss_of(model, tokenizer, rows, length)
        print(f"4-bit + {init} start: weight error {error:.3%} over {matrices} matrices, init {seconds:.1f} s; "
              f"loss {result.loss:.4f}, minus full precision {result.loss - full.loss:+.4f} "
              f"({interval_text(result, full)})")
    gap = starts["loftq"].loss - starts["default"].loss
    print(f"LoftQ start minus default start: {gap:+.4f} ({interval_text(starts['loftq'], starts['default'])})")


def interval_text(first: LossResult, second: LossResult) -> str:
    low, high = loss_difference_interval(first, second) or (float("nan"), float("nan"))
    return f"95% paired-bootstrap CI {low:+.4f} to {high:+.4f}"


if __name__ == "__main__":
    main()
