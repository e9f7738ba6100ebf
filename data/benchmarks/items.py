"""Loads the bundled benchmark's items for lm-evaluation-harness (the task YAML's ``custom_dataset``).

The path is taken from this file, not from the working directory, so the task runs wherever the harness starts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

ITEMS_FILE = Path(__file__).resolve().parent / "lora_lab_basics.json"


def load_items(**_metadata: Any) -> datasets.DatasetDict:
    # The harness passes the task's metadata (version ...) as keyword arguments; the items do not depend on it.
    rows = json.loads(ITEMS_FILE.read_text(encoding="utf-8"))
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
