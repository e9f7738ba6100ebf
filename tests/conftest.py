"""Shared fixtures: a tiny random Llama with the embedded model's tokenizer, small data files, runs trained once.

The tiny model is real transformers code with random weights, so training steps take a fraction of a second;
tests where language matters use the embedded SmolLM2 itself. Helper functions live in tests/helpers.py.
"""

from __future__ import annotations

import gc
import os
import sys
import zlib
from pathlib import Path
from typing import Any, Callable

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Test workers (pytest-xdist) share the machine's cores: each computes on one thread, and so do the training
# children the app starts (they inherit it). Two workers each running torch's default of one thread per core
# oversubscribe a 2-core machine, and their spinning thread pools made the heavy tests 4-5x slower than alone.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

from finetune.core.config import ModelConfig  # noqa: E402


def _absl_handler_keeps_the_real_stderr() -> None:
    """absl (imported by tensorboard and rouge_score) makes a logging handler on whatever sys.stderr is at its
    import: under pytest, the capture's file. Each gradio launch has uvicorn reconfigure logging, which closes every
    handler, and absl's close() closes its stream unless that is the current sys.stderr: inside a capfd test it is
    not, so pytest's own capture file was closed and every later test of the worker failed ("I/O operation on
    closed file"). Its handler writes to the process's real stderr instead, which absl never closes."""
    try:
        from absl import logging as absl_logging
    except ImportError:
        return
    absl_logging.get_absl_handler().python_handler.stream = sys.__stderr__


_absl_handler_keeps_the_real_stderr()

from durations import load as load_durations  # noqa: E402
from helpers import (make_random_adapter, save_tiny_llama, tiny_run_config, train_lab_note_run,  # noqa: E402
                     write_jsonl)


def pytest_collection_finish(session) -> None:
    """Everything imported by now (torch, transformers, gradio, the app: about a million objects) leaves the cyclic
    collector's view for the rest of the session. Each training in a test process starts with a full collection
    (the Trainer frees memory), and walking those objects cost 0.4-2 s a time: 1.6 CPU-minutes of a full run."""
    gc.collect()
    gc.freeze()


def pytest_collection_modifyitems(config, items) -> None:
    """Heaviest files first (by their seconds in tests/durations.json), so that the test workers end together
    rather than one finishing a long file alone. pytest-randomly has already shuffled the tests within each file;
    the files' order keeps a seeded share of chance (each weight is scaled by 0.75-1.25), so files of about the same
    weight still meet in a different order each commit. Run with -p no:randomly, the files keep their own order."""
    seed = config.getoption("randomly_seed", default=None)
    if not isinstance(seed, int):
        return
    seconds = load_durations()
    unknown = sorted(seconds.values())[len(seconds) // 2] if seconds else 0.0  # a new file weighs the median

    def weight(item) -> float:
        name = item.nodeid.split("::")[0]
        return seconds.get(name, unknown) * (0.75 + (zlib.crc32(f"{seed}:{name}".encode()) % 1000) / 2000)

    items.sort(key=weight, reverse=True)  # stable: a file's tests stay together, in their shuffled order
    items[:] = _browser_files_beside_others(items, weight)


def _browser_files_beside_others(items: list, weight: Callable[[Any], float]) -> list:
    """The heavy-first order, with browser files and the others taken in turn by the seconds handed out so far, so
    that the two workers tend to run one browser file beside one other file. Two browser files at once (two
    Chromiums, each page re-rendering as its app answers) ran each of them up to twice as long (the RLHF walk 67 s
    alone beside others, 121 s beside another browser file), and a page open longer costs more CPU again."""
    files: dict[str, list] = {}
    for item in items:
        files.setdefault(item.nodeid.split("::")[0], []).append(item)
    browser = [name for name in files if name.startswith("tests/browser/")]
    others = [name for name in files if not name.startswith("tests/browser/")]
    given = {"browser": 0.0, "others": 0.0}
    ordered: list = []
    while browser or others:
        kind = "browser" if browser and (not others or given["browser"] <= given["others"]) else "others"
        name = (browser if kind == "browser" else others).pop(0)
        given[kind] += weight(files[name][0])
        ordered.extend(files[name])
    return ordered


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    from finetune.core.models import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_dir) -> Path:
    """A 2-layer Llama (hidden 64) saved with the embedded tokenizer, usable as a 'local folder' model."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), embedded_dir)


@pytest.fixture(scope="session")
def style_model_dir(tmp_path_factory, embedded_dir) -> Path:
    """The embedded SmolLM2 cut to its first 4 of 30 layers, saved as a 'local folder' model. Its embeddings are
    real, so 20 LoRA steps teach it the course style well enough to show in a greedy answer; the random tiny
    Llama cannot show that (its random output embeddings keep every token near-uniform: loss stays at ~10.5)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.core.models import save_tokenizer

    folder = tmp_path_factory.mktemp("style-model")
    model = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32)
    model.model.layers = model.model.layers[:4]
    model.config.num_hidden_layers = 4
    model.save_pretrained(folder)
    save_tokenizer(AutoTokenizer.from_pretrained(embedded_dir), folder)
    return folder


@pytest.fixture(scope="session")
def style_run(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    """(run folder, data file) of one real tiny LoRA run (4-bit base, checkpoints every 4 of 8 steps) trained on
    the course style; the Evaluate tests and its browser test share it instead of training twice."""
    from finetune.core.config import save_config
    from finetune.train import run

    folder = tmp_path_factory.mktemp("style-run")
    rows = [{"prompt": f"What does setting {i} control in LoRA?",
             "completion": f"🧪 Lab note: setting {i} controls the adapter.\nRule of thumb: keep it small."}
            for i in range(40)]
    data = write_jsonl(folder / "style.jsonl", rows)
    cfg = tiny_run_config(tiny_model_dir, data, max_steps=8, save_steps=4, learning_rate=0.02)
    run_dir = folder / "runs" / "tiny-style"
    save_config(cfg, run_dir / "config.yaml")  # what the CLI and the run manager write before training
    assert run(cfg, run_dir) == 0, (run_dir / "status.json").read_text()
    return run_dir, data


@pytest.fixture
def qa_file(tmp_path) -> Path:
    rows = [{"prompt": f"What does setting {i} control in LoRA?",
             "completion": f"🧪 Lab note: setting {i} controls the adapter.\nRule of thumb: keep it small."}
            for i in range(40)]
    return write_jsonl(tmp_path / "qa.jsonl", rows)


@pytest.fixture(scope="session")
def lab_note_run(tmp_path_factory, tiny_model_dir) -> Path:
    """One real 4-step QLoRA run of the tiny model, trained once per session; a test that writes into a run
    folder takes its own copy (helpers.copy_run)."""
    return train_lab_note_run(tmp_path_factory.mktemp("lab-note"), tiny_model_dir)


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {"run-a": make_random_adapter(tiny_model_dir, root / "a", 1, ["q_proj", "v_proj"]),
            "run-b": make_random_adapter(tiny_model_dir, root / "b", 2, ["o_proj", "down_proj"])}


@pytest.fixture(scope="module")
def model_cfg(tiny_model_dir) -> ModelConfig:
    return ModelConfig(source=str(tiny_model_dir), bits=32)


@pytest.fixture(scope="module")
def policy_runs(tmp_path_factory, tiny_model_dir, adapters):
    """A run folder with an SFT run and a DPO run that started from it (stage and start_adapter in its config,
    as the RLHF tab writes them); their adapters are the test adapters."""
    import json
    import shutil

    from finetune.core.config import save_config
    from finetune.services.runs import RunManager

    root = tmp_path_factory.mktemp("policy-runs")
    data = write_jsonl(root / "qa.jsonl", [{"prompt": f"Question {i}?", "completion": "Answer."} for i in range(10)])
    for run_id, adapter, stage, start in (("sft-run", "run-a", "sft", ""), ("dpo-run", "run-b", "dpo", "sft-run")):
        cfg = tiny_run_config(tiny_model_dir, data, bits=32)
        cfg.stage, cfg.preference.start_adapter = stage, start
        save_config(cfg, root / run_id / "config.yaml")
        shutil.copytree(adapters[adapter], root / run_id / "adapter")
        (root / run_id / "status.json").write_text(json.dumps({"state": "finished"}))
    return RunManager(root)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """Short course-style pairs: 16 train rows and (validation_fraction 0.25) 4 held out."""
    rows = [{"prompt": f"What does setting {i} control in LoRA?",
             "chosen": f"🧪 Lab note: setting {i} controls the adapter.\nRule of thumb: keep it small.",
             "rejected": "It depends on many things."} for i in range(20)]
    return write_jsonl(tmp_path_factory.mktemp("prefs") / "pairs.jsonl", rows)
