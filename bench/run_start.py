"""How long a run takes from Start to its saved adapter: a fresh `python -m finetune.train` vs a child forked from
the fork server (finetune/services/forkserver.py), side by side on this machine.

    python bench/run_start.py [--runs 4] [--model embedded|tiny]

Each side trains the same config ``--runs`` times, one after the other, through the app's own spawn(); the fork
side's first run includes starting the server (it imports the libraries once). Prints wall seconds and the CPU
seconds of the children, per run, and the ratio fork/fresh. Only meaningful without CUDA (with a GPU every run is a
fresh process).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.core.config import from_dict, save_config  # noqa: E402
from finetune.core.models import embedded_model_dir, save_tokenizer  # noqa: E402
from finetune.services import forkserver  # noqa: E402
from finetune.services.processes import spawn  # noqa: E402


def tiny_model(folder: Path) -> Path:
    """A 2-layer random Llama with the embedded tokenizer: the startup, not the training, dominates its runs."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
    return folder


def config_file(folder: Path, model: str) -> Path:
    source = str(tiny_model(folder / "tiny")) if model == "tiny" else "smollm2-135m-instruct"
    cfg = from_dict({"run_name": "start", "model": {"source": source, "bits": 4},
                     "data": {"source": "bundled:course_qa", "max_seq_length": 128, "max_samples": 48},
                     "training": {"max_steps": 3, "batch_size": 2, "eval_steps": 100, "save_steps": 100}})
    save_config(cfg, folder / "config.yaml")
    return folder / "config.yaml"


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def side(config: Path, folder: Path, runs: int) -> tuple[list[float], float]:
    """Wall seconds of each run, and the CPU seconds of this process's own reaped children: the fresh processes
    (a forked child is the server's child, counted by ``forkserver_cpu`` instead)."""
    walls, cpu = [], 0.0
    for index in range(runs):
        run_dir = folder / f"run-{index}"
        run_dir.mkdir(parents=True)
        before, started = children_cpu(), time.perf_counter()
        child = spawn([sys.executable, "-m", "finetune.train", str(config), "--output-dir", str(run_dir)],
                      run_dir / "train.log")
        code = child.wait()
        walls.append(time.perf_counter() - started)
        cpu += children_cpu() - before
        assert code == 0 and (run_dir / "adapter").is_dir(), (run_dir / "train.log").read_text()[-2000:]
    return walls, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--model", choices=["embedded", "tiny"], default="tiny")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = config_file(Path(tmp), args.model)
        os.environ[forkserver.FORKSERVER_ENV] = "0"
        fresh, fresh_cpu = side(config, Path(tmp) / "fresh", args.runs)
        os.environ[forkserver.FORKSERVER_ENV] = "auto"
        server_cpu_before = forkserver_cpu()
        forked, _ = side(config, Path(tmp) / "forked", args.runs)
        forked_cpu = forkserver_cpu() - server_cpu_before
    print(f"{args.runs} runs of {args.model} (3 steps, 4-bit), one after the other, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"fresh process : wall per run {', '.join(f'{w:.1f}' for w in fresh)} s; total {sum(fresh):.1f} s; "
          f"CPU {fresh_cpu:.1f} s")
    print(f"fork server   : wall per run {', '.join(f'{w:.1f}' for w in forked)} s; total {sum(forked):.1f} s; "
          f"CPU {forked_cpu:.1f} s (server start included)")
    print(f"ratio fork/fresh: wall {sum(forked) / sum(fresh):.2f}, CPU {forked_cpu / fresh_cpu:.2f}")


def forkserver_cpu() -> float:
    """CPU seconds of the fork servers this process started, their reaped children included (from /proc)."""
    total = 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    for server in list(forkserver._servers.values()):
        fields = Path(f"/proc/{server.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += sum(int(value) for value in fields[11:15]) / ticks  # utime, stime, cutime, cstime
    return total


if __name__ == "__main__":
    main()
