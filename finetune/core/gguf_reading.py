"""GGUF files read back about five times faster than gguf-py's reader reads them on its own.

gguf-py's ``GGUFReader`` parses every metadata value (each of SmolLM2's 49k tokens and 48k merges) through
slices of a ``numpy.memmap``, and each slice of a memmap runs Python code (``memmap.__array_finalize__``); it
also builds a scratch array per value to learn its item size. That took 2.6-3.0 s of CPU per read of a file with
SmolLM2's vocabulary, and transformers reads a file once for the config, once for the tokenizer and once more
for the weights. ``QuickReader`` is the same reader over a plain ndarray view of the same mapping (no copy),
with the item sizes cached: ~0.5 s per read (bench/gguf_read.py), the same fields, tensors and dtypes
(tests/test_gguf_export.py compares it with gguf's own reader on the embedded model's file, so a gguf release
that changes the reader fails there).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader


@functools.lru_cache(maxsize=None)
def _typed(dtype: Any, byte_order: str) -> np.dtype:
    return np.dtype(dtype).newbyteorder(byte_order)


class QuickReader(GGUFReader):
    """``GGUFReader`` with a faster ``_get`` (the one method every field, string and tensor is read through)."""

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: str | None = None) -> np.ndarray:
        if type(self.data) is np.memmap:  # the first read: the file is mapped by now, in GGUFReader.__init__
            self.data = self.data.view(np.ndarray)
        typed = _typed(dtype, self.byte_order if override_order is None else override_order)
        return self.data[offset:offset + typed.itemsize * int(count)].view(typed)


def use_quick_reader() -> None:
    """Every later GGUF read of this process goes through ``QuickReader``: transformers' GGUF loader imports
    ``gguf.GGUFReader`` each time it reads a file, so the name is replaced there (idempotent)."""
    import gguf

    gguf.GGUFReader = QuickReader


def load_gguf_tokenizer(path: Path) -> Any:
    """The tokenizer transformers rebuilds from a GGUF file's metadata."""
    from transformers import AutoTokenizer

    use_quick_reader()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def load_gguf_model(path: Path) -> Any:
    """A GGUF file loaded by transformers' GGUF loader (config and weights from the file, dequantized to fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    use_quick_reader()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
