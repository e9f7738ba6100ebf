"""What the app costs while nobody uses it: gradio's own queue intervals vs LoRA Lab's (components.shared.calm_queue),
side by side on this machine.

    python bench/idle_app.py [--seconds 30] [--rounds 3]

Each round serves the whole app on loopback twice, once with gradio's intervals (on Linux it looks for new events
every 1 ms and for progress every 10 ms) and once calmed, lets it settle, then reads this process's CPU seconds over
``--seconds`` of idling (no page open, no request). Prints both per round and the ratio calmed/gradio.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app import build_app, close_app  # noqa: E402
from components.shared import calm_queue  # noqa: E402

SETTLE_SECONDS = 5  # the first seconds after launch include the page's own start-up work


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def served(runs: Path, calm: bool) -> Iterator[None]:
    demo = build_app(str(runs))
    queued = demo.queue(default_concurrency_limit=4)
    if calm:
        calm_queue(queued)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    queued.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, _frontend=False)
    try:
        yield
    finally:
        close_app(demo)


def idle_cpu(calm: bool, seconds: float) -> float:
    with tempfile.TemporaryDirectory() as runs, served(Path(runs), calm):
        time.sleep(SETTLE_SECONDS)
        before = cpu_seconds()
        time.sleep(seconds)  # the measurement itself: idling is what is measured
        return cpu_seconds() - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"CPU seconds of an idle app over {args.seconds:.0f} s (no page open)")
    print("round  gradio's intervals  calmed  ratio")
    for round_number in range(1, args.rounds + 1):
        default, calmed = idle_cpu(False, args.seconds), idle_cpu(True, args.seconds)
        print(f"{round_number:5d}  {default:18.2f}  {calmed:6.2f}  {calmed / max(default, 1e-9):5.2f}")


if __name__ == "__main__":
    main()
