"""GGUF types side by side: file size, bits per weight and held-out perplexity of each, beside the adapter as the
Chat tab runs it (4-bit base + LoRA) and the merged float model the files are written from.

    python bench/gguf_types.py                       # trains configs/cpu-quick.yaml first (a few minutes on CPU)
    python bench/gguf_types.py --run runs/cpu-quick  # an existing run of the embedded model

Each GGUF is loaded back with transformers' GGUF loader (dequantized to fp32), so the perplexity measures what
the file's rounding costs, not llama.cpp's kernels. The loss is the run's own held-out rows (same split and seed
as in training), token-weighted; the interval is a 95% paired bootstrap of (type - merged) over those rows.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.core.config import load_config  # noqa: E402
from finetune.services.evaluate import dataset_loss, loss_difference_interval  # noqa: E402
from finetune.services.export import comparison_rows, run_config  # noqa: E402
from finetune.core.hardware import profile_for  # noqa: E402
from finetune.core.models import load_model, load_tokenizer  # noqa: E402
from finetune.services.gguf_convert import GGUF_TYPES  # noqa: E402
from finetune.services.gguf_export import write_gguf  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def trained_run(folder: Path) -> Path:
    from finetune.core.config import save_config
    from finetune.train import run

    cfg = load_config(ROOT / "configs" / "cpu-quick.yaml")
    run_dir = folder / "cpu-quick"
    save_config(cfg, run_dir / "config.yaml")
    if run(cfg, run_dir) != 0:
        raise SystemExit(f"training failed: {(run_dir / 'status.json').read_text()}")
    return run_dir


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", type=Path, help="an existing run folder of the embedded model")
    parser.add_argument("--types", default=",".join(GGUF_TYPES))
    args = parser.parse_args()
    run_dir = args.run or trained_run(Path(tempfile.mkdtemp(prefix="gguf-bench-")))
    cfg = run_config(run_dir)
    tokenizer = load_tokenizer(cfg.model)
    rows, held_out = comparison_rows(cfg, tokenizer, limit=10_000)
    length = cfg.data.max_seq_length
    print(f"run {run_dir}; {len(rows)} {'held-out' if held_out else 'training'} rows; torch threads "
          f"{torch.get_num_threads()}", flush=True)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cpu = profile_for("cpu", "CPU", 0.0)
    chat = PeftModel.from_pretrained(load_model(cfg.model, cpu), run_dir / "adapter").eval()
    results = {"adapter (4-bit base + LoRA, as in Chat)": dataset_loss(chat, tokenizer, rows, max_length=length)}
    del chat
    base = load_model(cfg.model, cpu).eval()
    results["base alone (4-bit, no adapter)"] = dataset_loss(base, tokenizer, rows, max_length=length)
    del base
    sizes: dict[str, tuple[float, float]] = {}
    for out_type in args.types.split(","):
        export = write_gguf(run_dir, out_type)
        if "merged (fp32)" not in results:
            merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged", dtype=torch.float32).eval()
            results["merged (fp32)"] = dataset_loss(merged, tokenizer, rows, max_length=length)
            del merged
        model = AutoModelForCausalLM.from_pretrained(export.path.parent, gguf_file=export.path.name,
                                                     dtype=torch.float32).eval()
        results[f"GGUF {out_type}"] = dataset_loss(model, tokenizer, rows, max_length=length)
        sizes[f"GGUF {out_type}"] = (export.size_bytes / 2**20, export.bits_per_weight)
        del model
        print(f"{out_type}: {export.summary()}", flush=True)

    reference = results["merged (fp32)"]
    print("\n| model | file size | bits/weight | held-out loss | perplexity | loss - merged (95% CI) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, result in results.items():
        size, bits = sizes.get(name, (math.nan, math.nan))
        interval = loss_difference_interval(result, reference)
        diff = (f"{result.loss - reference.loss:+.4f} ({interval[0]:+.4f}, {interval[1]:+.4f})"
                if interval and name != "merged (fp32)" else "")
        print(f"| {name} | {'' if math.isnan(size) else f'{size:.1f} MB'} | "
              f"{'' if math.isnan(bits) else f'{bits:.2f}'} | {result.loss:.4f} | {result.perplexity:.3f} | {diff} |")
    print(f"\n{reference.rows} rows, {reference.tokens} scored tokens.")


if __name__ == "__main__":
    main()
