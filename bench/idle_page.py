"""What an open page of the app costs the browser while nobody acts: every timer ticking (as before) vs LoRA Lab's
timers (a tab's timers tick only while it is open; the course's only while one of its runs is underway).

    python bench/idle_page.py [--seconds 60] [--rounds 2]

Each round serves the whole app on loopback twice, once with the old timers (rebuilt here: tick_only_on_the_open_tab
not applied, the course's timer always on) and once as it is, opens it in headless Chromium (Debian's, through
Playwright), opens the Train, RLHF, Evaluate and Compare tabs in turn and comes back to "Start here", as a learner
looking around would, lets it settle, then reads the CPU seconds of Chromium's processes and of the serving
process over ``--seconds`` of idling. Prints both per round and the ratio now/before.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import gradio as gr  # noqa: E402

import app  # noqa: E402
from components import course_tab  # noqa: E402
from helpers import ARGS, CHROMIUM, served_app  # noqa: E402

TABS_VISITED = ("Train", "RLHF", "Evaluate", "Compare", "Start here")
SETTLE_SECONDS = 5
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def children_cpu(root: int) -> float:
    """CPU seconds of every live process below ``root`` (Chromium's and Playwright's), from /proc."""
    children: dict[int, list[tuple[int, float]]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        children.setdefault(int(fields[1]), []).append((int(entry), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS))
    total, stack = 0.0, [root]
    while stack:
        for pid, cpu in children.get(stack.pop(), []):
            total += cpu
            stack.append(pid)
    return total


@contextlib.contextmanager
def old_timers(enabled: bool) -> Iterator[None]:
    """The timers as they were: none turned off on leaving a tab, the course's always on."""
    if not enabled:
        yield
        return
    saved = app.tick_only_on_the_open_tab, course_tab.course_timer
    app.tick_only_on_the_open_tab = lambda tabs: None
    course_tab.course_timer = lambda manager, request=None: gr.Timer(active=True)
    try:
        yield
    finally:
        app.tick_only_on_the_open_tab, course_tab.course_timer = saved


def idle_cpu(page: Any, seconds: float) -> tuple[float, float]:
    for name in TABS_VISITED:
        page.get_by_role("tab", name=name).click()
        page.wait_for_timeout(2_500)  # each tab renders and its timer ticks once
    page.wait_for_timeout(SETTLE_SECONDS * 1000)
    browser, server = children_cpu(os.getpid()), own_cpu()
    page.wait_for_timeout(seconds * 1000)  # the measurement itself: idling is what is measured
    return children_cpu(os.getpid()) - browser, own_cpu() - server


@contextlib.contextmanager
def app_in_chromium() -> Iterator[tuple[Any, str]]:
    """(a page of headless Chromium, the URL of the whole app served on loopback over an empty runs folder)."""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as runs, served_app(Path(runs)) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield browser.new_page(viewport={"width": 1400, "height": 1000}), url
        finally:
            browser.close()


def measure(before: bool, seconds: float) -> tuple[float, float]:
    with old_timers(before), app_in_chromium() as (page, url):
        page.goto(url)
        page.get_by_role("tab", name="Train").wait_for()
        return idle_cpu(page, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(f"CPU seconds over {args.seconds:.0f} s of an open, idle page (after visiting {', '.join(TABS_VISITED)})")
    print("round  Chromium: before  now  ratio  |  app server: before  now")
    for round_number in range(1, args.rounds + 1):
        (browser_before, server_before), (browser_now, server_now) = measure(True, args.seconds), \
            measure(False, args.seconds)
        print(f"{round_number:5d}  {browser_before:16.1f}  {browser_now:4.1f}  {browser_now / browser_before:5.2f}  |  "
              f"{server_before:18.1f}  {server_now:4.1f}")


if __name__ == "__main__":
    main()
