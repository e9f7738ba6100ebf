"""What opening a page of the app costs the browser and the server: every tab's page-load handler as an event of
its own (as before) vs all of them as one event (components/page_loads.py).

    python bench/page_load.py [--loads 4] [--rounds 2]

Each round serves the whole app on loopback twice, once with one load event per handler (rebuilt here: each
``on_page_load`` registered as its own ``page.load``) and once as it is, opens it in headless Chromium (Debian's,
through Playwright) and loads the page ``--loads`` times; each load is measured from the request until the page
has settled (a fixed wait after "Start here" shows, the same for both). Prints the CPU seconds of Chromium's
processes and of the serving process per page load, and the ratio now/before.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import gradio as gr  # noqa: E402

import app  # noqa: E402
from bench.idle_page import app_in_chromium, children_cpu, own_cpu  # noqa: E402
from components.page_loads import REGISTRY  # noqa: E402

SETTLE_MS = 6_000  # every load handler has answered well within this on a busy 2-core machine


def one_event_per_handler(page: gr.Blocks) -> None:
    """The page loads as they were: each handler an event of its own."""
    for load in page.__dict__.pop(REGISTRY, []):
        inputs = dict(zip(load.names, load.inputs)) if load.names is not None else load.inputs
        event = page.load(load.fn, None if load.names is not None else inputs, load.outputs,
                          inputs_kwargs=inputs if load.names is not None else None, api_visibility="private")
        for args, kwargs in load.follow_ups:
            event.then(*args, **kwargs)


@contextlib.contextmanager
def separate_loads(enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    saved, app.answer_page_loads = app.answer_page_loads, one_event_per_handler
    try:
        yield
    finally:
        app.answer_page_loads = saved


def load_cpu(page: Any, url: str) -> tuple[float, float]:
    browser, server = children_cpu(os.getpid()), own_cpu()
    page.goto(url)
    page.get_by_role("tab", name="Start here").wait_for()
    page.wait_for_timeout(SETTLE_MS)
    return children_cpu(os.getpid()) - browser, own_cpu() - server


def measure(before: bool, loads: int) -> tuple[float, float]:
    with separate_loads(before), app_in_chromium() as (page, url):
        load_cpu(page, url)  # the first load warms the browser's cache of the app's scripts
        costs = [load_cpu(page, url) for _ in range(loads)]
    return sum(c[0] for c in costs) / loads, sum(c[1] for c in costs) / loads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(f"CPU seconds per page load (mean of {args.loads}, each measured until {SETTLE_MS / 1000:.0f} s after the "
          "first tab shows)")
    print("round  Chromium: before  now  ratio  |  app server: before  now  ratio")
    for round_number in range(1, args.rounds + 1):
        (browser_before, server_before), (browser_now, server_now) = measure(True, args.loads), \
            measure(False, args.loads)
        print(f"{round_number:5d}  {browser_before:16.2f}  {browser_now:4.2f}  {browser_now / browser_before:5.2f}  |  "
              f"{server_before:18.2f}  {server_now:4.2f}  {server_now / server_before:5.2f}")


if __name__ == "__main__":
    main()
