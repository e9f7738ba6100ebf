"""Past one device from the app: one run, several processes, one story.

A run whose config asks ``training.processes > 1`` is started by the run manager as
``python -m finetune.core.distributed runs/<id> runs/<id>/config.yaml [--resume]``. That small launcher (the process
the manager watches, leading its own session; the ranks accelerate starts lead sessions of their own, so Stop's
SIGKILL reaches them through their records in ``ranks/``) picks a free rendezvous port and runs

    python -m accelerate.commands.launch --config_file runs/<id>/accelerate.yaml --main_process_port PORT \\
        -m finetune.train runs/<id>/config.yaml --output-dir runs/<id> [--resume]

with the accelerate config generated here from ``configs/accelerate/`` (DDP or FSDP-QLoRA) and recorded in the
run folder. Rank 0 writes metrics and status as a one-process run does. Every rank records itself in
``runs/<id>/ranks/rank-N.json`` (pid, and its error if it fails); when the launch fails, the launcher names the
first rank that failed in status.json, and ends any rank still running.

Pure functions for the tests and the form: ``accelerate_config``, ``launch_problems``, ``effective_batch``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from finetune.core.config import ConfigError, RunConfig, load_config
from finetune.core.paths import CONFIGS_DIR
from finetune.core.run_folder import ACCELERATE_CONFIG, rank_record, rank_records

TEMPLATES = CONFIGS_DIR / "accelerate"
TEMPLATE_FOR = {"ddp": "2gpu-ddp.yaml", "fsdp": "fsdp-qlora-2gpu.yaml"}
STRATEGY_NAMES = {"single": "one process", "ddp": "data parallel (DDP)", "fsdp": "FSDP-QLoRA (sharded base)"}
# torchrun's failure summary: "exitcode  : -9 (pid: 1234)"; a negative code is the signal that ended the rank.
LAUNCH_NOTE = "LoRA Lab: starting the processes through accelerate; rendezvous on port"
EXIT_LINE = re.compile(r"exitcode\s*:\s*(-?\d+)\s*\(pid:\s*(\d+)\)")


def is_multi_process(cfg: RunConfig) -> bool:
    return cfg.training.processes > 1


def effective_batch(cfg: RunConfig) -> int:
    """Rows per optimizer step: batch size (per process) x gradient accumulation x processes."""
    t = cfg.training
    return t.batch_size * t.gradient_accumulation * t.processes


# --- what this machine offers ----------------------------------------------------------------------------------

def device_counts() -> tuple[int, int]:
    """(CUDA GPUs, CPU cores) on this machine."""
    import torch  # the launcher process never needs it; the app has it loaded already

    return (torch.cuda.device_count() if torch.cuda.is_available() else 0), (os.cpu_count() or 1)


def offers_processes() -> bool:
    """Whether the form shows the processes choice: with two GPUs or more, and on the CPU (processes over gloo,
    when asked); not on a machine with one GPU, where a second process has no device of its own."""
    gpus, _ = device_counts()
    return gpus != 1


def launch_problems(cfg: RunConfig, gpus: int, cores: int) -> dict[str, str]:
    """What this machine cannot run of the config's processes and strategy, by field (empty: it can)."""
    n, strategy = cfg.training.processes, cfg.training.strategy
    if n < 2:
        return {}
    if gpus:
        if n > gpus:
            fix = f"set processes to {gpus} or fewer" if gpus > 1 else "set processes to 1 and strategy to 'single'"
            return {"training.processes": f"{n} processes need {n} GPUs (one each), but this machine has {gpus}: "
                                          f"{fix}"}
        return {}
    if strategy == "fsdp":
        return {"training.strategy": "FSDP shards the base across GPUs, and this machine has none: use 'ddp' "
                                     "(CPU processes over gloo) or 'single'"}
    if n > cores:
        return {"training.processes": f"{n} processes on the CPU need a core each, but this machine has {cores}: "
                                      f"set processes to {cores} or fewer"}
    return {}


def launch_problems_here(cfg: RunConfig) -> dict[str, str]:
    """launch_problems on this machine's devices."""
    return launch_problems(cfg, *device_counts()) if is_multi_process(cfg) else {}


def check_launch(cfg: RunConfig) -> None:
    """Refuse, before any child starts, a run this machine cannot launch (ConfigError names the field)."""
    problems = launch_problems_here(cfg)
    if problems:
        raise ConfigError(problems)


# --- the launch --------------------------------------------------------------------------------------------------

def accelerate_config(cfg: RunConfig) -> dict[str, Any]:
    """The accelerate launch config for the run: the template of its strategy with its number of processes."""
    template = TEMPLATES / TEMPLATE_FOR[cfg.training.strategy]
    config = yaml.safe_load(template.read_text(encoding="utf-8"))
    config.update(num_processes=cfg.training.processes, num_machines=1, machine_rank=0)
    return config


def write_accelerate_config(cfg: RunConfig, run_dir: Path) -> Path:
    path = run_dir / ACCELERATE_CONFIG
    strategy = cfg.training.strategy
    header = (f"# Generated by LoRA Lab for this run: {STRATEGY_NAMES[strategy]}, {cfg.training.processes} "
              f"processes (template: configs/accelerate/{TEMPLATE_FOR[strategy]}).\n")
    path.write_text(header + yaml.safe_dump(accelerate_config(cfg), sort_keys=False), encoding="utf-8")
    return path


def launch_command(cfg: RunConfig, run_dir: Path, config_path: Path, python: str, resume: bool) -> list[str]:
    """The run manager's child for a multi-process run; writes the accelerate config it will use."""
    write_accelerate_config(cfg, run_dir)
    return ([python, "-m", "finetune.core.distributed", str(run_dir), str(config_path)]
            + (["--resume"] if resume else []))


def free_port() -> int:
    """A loopback port nobody listens on now, for the ranks' rendezvous: two runs (or tests) never share one."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_command(run_dir: Path, config_path: Path, python: str, port: int, resume: bool) -> list[str]:
    command = [python, "-m", "accelerate.commands.launch", "--config_file", str(run_dir / ACCELERATE_CONFIG),
               "--main_process_port", str(port), "-m", "finetune.train", str(config_path),
               "--output-dir", str(run_dir)]
    return command + (["--resume"] if resume else [])


def launch(run_dir: Path, config_path: Path, resume: bool = False, python: str = sys.executable) -> int:
    """Run the ranks through accelerate and wait; on failure, name the first rank that failed. Returns the
    launcher's exit code."""
    from finetune.core.run_status import LAUNCHER_PID_ENV

    for old in rank_records(run_dir):  # an earlier attempt's ranks say nothing about this one
        old.unlink()
    env = {**os.environ, LAUNCHER_PID_ENV: str(os.getpid())}
    # Stop signals the whole process group; this process outlives the ranks so the manager sees the run end only
    # once they have. A Python handler, not SIG_IGN, so the launched processes keep the default.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    port = free_port()
    print(f"{LAUNCH_NOTE} {port}", flush=True)  # in train.log: which port the run held, for anyone debugging it
    launcher = subprocess.Popen(accelerate_command(run_dir, config_path, python, port, resume), env=env)
    code = launcher.wait()
    end_leftover_ranks(run_dir)
    if code != 0:
        settle_failure(run_dir, code)
    return code


def settle_failure(run_dir: Path, code: int) -> None:
    """A failed launch that no Stop explains: status.json says failed, with the first failing rank's error."""
    from finetune.core.run_status import read_status, write_status
    from finetune.core.run_folder import STOP_FILE

    if (run_dir / STOP_FILE).exists():
        return  # asked to stop: the run manager records it as stopped
    error = first_rank_failure(read_ranks(run_dir), _own_log_tail()) or read_status(run_dir).get("error") or \
        f"the launcher of the {len(read_ranks(run_dir)) or 'several'} training processes ended with exit code {code}"
    write_status(run_dir, state="failed", error=error, finished_at=time.time())


def _own_log_tail(size: int = 200_000) -> str:
    """The end of the file this process writes its output to (the run manager points it at train.log), where
    the launcher printed its failure summary."""
    try:
        with open(os.readlink("/proc/self/fd/1"), "rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - size))
            return log.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


# --- each rank's record --------------------------------------------------------------------------------------------

def rank_of_process() -> tuple[int, int]:
    """(rank, world size) from what accelerate / torchrun set; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def record_rank(run_dir: Path, rank: int, **fields: Any) -> None:
    """Merge ``fields`` into ranks/rank-N.json (each rank writes only its own file)."""
    path = rank_record(run_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"rank": rank}
    record.update(fields)
    temporary = path.with_suffix(f".tmp{os.getpid()}")
    temporary.write_text(json.dumps(record), encoding="utf-8")
    os.replace(temporary, path)


def read_ranks(run_dir: Path) -> list[dict[str, Any]]:
    records = []
    for path in rank_records(run_dir):
        try:
            records.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            continue
    return sorted(records, key=lambda r: r.get("rank", 0))


def exit_codes(log_text: str) -> dict[int, int]:
    """pid -> exit code, from the launcher's failure summary in the log."""
    return {int(pid): int(code) for code, pid in EXIT_LINE.findall(log_text)}


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def first_rank_failure(records: list[dict[str, Any]], log_text: str) -> str | None:
    """The error of the rank that failed first, as "[rank N] ...". A rank that vanished by a signal other than
    the launcher's own SIGTERM (killed, the out-of-memory killer) caused the others' errors, which are only
    their collectives breaking; else the earliest error a rank recorded; else a rank that ended silently."""
    codes = exit_codes(log_text)
    silent = [r for r in records if "error" not in r and "finished_at" not in r]
    for record in silent:
        code = codes.get(record.get("pid", -1))
        if code is not None and code < 0 and -code != signal.SIGTERM:
            return (f"[rank {record['rank']}] the process ended by {_signal_name(code)} (pid {record['pid']}): "
                    "killed, or out of memory; the other processes were stopped with it")
    failed = sorted((r for r in records if "error" in r), key=lambda r: r.get("failed_at", 0))
    if failed:
        return f"[rank {failed[0]['rank']}] {failed[0]['error']}"
    if silent:
        record = silent[0]
        code = codes.get(record.get("pid", -1))
        how = f"exit code {code}" if code is not None else "no error of its own"
        return f"[rank {record['rank']}] the process ended with {how} (pid {record.get('pid')})"
    return None


def _stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat after the name (which may hold spaces): state first, start time at index 19."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return stat[stat.rfind(")") + 2:].split()


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which tells it apart from a later process that
    got the same pid; None where /proc cannot say."""
    fields = _stat_fields(pid)
    return fields[19] if len(fields) > 19 else None


def same_process(pid: int, started: str | None = None) -> bool:
    """Still running (not a zombie) and still the process that was recorded, not a later one with its pid."""
    fields = _stat_fields(pid)
    return len(fields) > 19 and fields[0] != "Z" and (started is None or fields[19] == started)


def end_leftover_ranks(run_dir: Path) -> list[int]:
    """SIGKILL any rank of this run still running after its launcher ended (a rank stuck in a collective that
    its peers left); returns their pids. A pid is only signalled while it is still the recorded process."""
    ended = []
    for record in read_ranks(run_dir):
        pid = record.get("pid")
        if isinstance(pid, int) and pid != os.getpid() and same_process(pid, record.get("pid_start")):
            try:
                os.kill(pid, signal.SIGKILL)
                ended.append(pid)
            except (ProcessLookupError, PermissionError):
                pass
    return ended


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    resume = "--resume" in args
    paths = [a for a in args if a != "--resume"]
    if len(paths) != 2:
        print("usage: python -m finetune.core.distributed RUN_FOLDER CONFIG.yaml [--resume]", file=sys.stderr)
        return 2
    run_dir, config_path = Path(paths[0]).resolve(), Path(paths[1]).resolve()
    try:
        load_config(config_path)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return launch(run_dir, config_path, resume=resume)


if __name__ == "__main__":
    sys.exit(main())
