"""The training entry point: one run of any stage (SFT, reward, DPO, KTO, GRPO) in its run folder.

Run it:
    python -m finetune.train configs/cpu-quick.yaml                      # new run folder under runs/
    python -m finetune.train configs/cpu-quick.yaml --output-dir runs/demo
    python -m finetune.train runs/demo/config.yaml --output-dir runs/demo --resume
    python -m finetune.train configs/dpo-cpu.yaml      # `stage: reward|dpo|kto|grpo` picks the stage
    accelerate launch --multi_gpu --num_processes 2 -m finetune.train configs/cpu-quick.yaml --output-dir runs/ddp
      (DDP; on a machine without CUDA this runs 2 CPU processes over gloo. accelerate's --cpu flag alone
      always starts a single process.)

This module only checks the config, keeps status.json right whatever happens and turns failures into messages;
the stages themselves live in finetune/stages/. The run folder's layout: finetune/core/run_folder.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

from finetune.core.noise import quiet_known_noise

quiet_known_noise()  # before the libraries load: the training log shows what a user can act on

import torch  # noqa: E402

from finetune.core.config import ConfigError, RunConfig, load_config, save_config  # noqa: E402
from finetune.core.data import DataError  # noqa: E402
from finetune.core.distributed import process_start, rank_of_process, record_rank  # noqa: E402
from finetune.core.models import ModelSourceError  # noqa: E402
from finetune.core.paths import check_config  # noqa: E402
from finetune.core.run_folder import RUN_CONFIG, STOP_FILE  # noqa: E402
from finetune.core.run_status import HOSTNAME, LAUNCHER_PID_ENV, run_pid, write_status  # noqa: E402
from finetune.core.storage import DISK_FULL_EXIT, disk_full_message, is_disk_full  # noqa: E402
from finetune.stages.runner import run_stage  # noqa: E402

USER_ERRORS = (ConfigError, DataError, ModelSourceError)


def main(cfg: RunConfig, run_dir: str | Path, resume: bool = False) -> Path:
    """Train, save what the stage produces (adapter/, model/ or reward_model/) and return its path."""
    return run_stage(cfg, Path(run_dir), resume=resume)


def _failure_message(error: BaseException) -> str:
    if isinstance(error, USER_ERRORS):
        return str(error)
    if is_disk_full(error):
        return disk_full_message("saving (a checkpoint, the metrics or the status)",
                                 "resume: the previous checkpoint is kept")
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return ("Out of GPU memory. Try a smaller batch size, a shorter max sequence length, gradient "
                "checkpointing, or fewer bits (4-bit).")
    return f"{type(error).__name__}: {error}"


def run(cfg: RunConfig, run_dir: Path, resume: bool = False) -> int:
    """main() with the run's status kept right whatever happens; returns the process exit code."""
    rank, world = rank_of_process()
    rank_zero = rank == 0
    # Under the app's launcher a failure is settled by the launcher, which names the rank that failed first (a
    # rank whose peer died fails too, with a broken collective); run by hand, rank 0 says it.
    settles_failure = rank_zero and not os.environ.get(LAUNCHER_PID_ENV)
    prefix = f"[rank {rank}] " if world > 1 else ""
    started = time.time()
    run_dir.mkdir(parents=True, exist_ok=True)
    if world > 1:
        record_rank(run_dir, rank, pid=os.getpid(), pid_start=process_start(os.getpid()), host=HOSTNAME,
                    started_at=started)
    if rank_zero:
        write_status(run_dir, state="running", stage=cfg.stage, pid=run_pid(), hostname=HOSTNAME,
                     started_at=started, error=None)
    try:
        main(cfg, run_dir, resume=resume)
    except BaseException as error:  # includes KeyboardInterrupt: the status must say what happened
        if world > 1:
            record_rank(run_dir, rank, error=_failure_message(error), failed_at=time.time())
        if settles_failure:
            state = "stopped" if isinstance(error, KeyboardInterrupt) else "failed"
            write_status(run_dir, state=state, error=prefix + _failure_message(error), finished_at=time.time())
        if not isinstance(error, USER_ERRORS):
            traceback.print_exc()
        print(f"{prefix}error: {_failure_message(error)}", file=sys.stderr)
        return DISK_FULL_EXIT if is_disk_full(error) else 1
    if world > 1:
        record_rank(run_dir, rank, finished_at=time.time())
    if rank_zero:
        state = "stopped" if (run_dir / STOP_FILE).exists() else "completed"
        write_status(run_dir, state=state, finished_at=time.time(), duration=round(time.time() - started, 1))
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m finetune.train", description=__doc__.split("\n")[0])
    parser.add_argument("config", help="YAML config (see configs/)")
    parser.add_argument("--output-dir", help="run folder (default: runs/<config name>-<time>)")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    return parser.parse_args(argv)


def cli(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config)
        check_config(cfg, operator=True)  # the operator's own config: local paths allowed, names still checked
    except ConfigError as error:
        print("error: invalid config:", file=sys.stderr)
        for name, message in error.problems.items():
            print(f"  {name}: {message}", file=sys.stderr)
        return 2
    run_dir = Path(args.output_dir or f"runs/{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.mkdir(parents=True, exist_ok=True)
    if int(os.environ.get("RANK", "0")) == 0 and (run_dir / RUN_CONFIG).resolve() != Path(args.config).resolve():
        save_config(cfg, run_dir / RUN_CONFIG)
    return run(cfg, run_dir, resume=args.resume)


if __name__ == "__main__":
    sys.exit(cli())
