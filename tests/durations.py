"""Seconds each test file took in a full run, kept in tests/durations.json: conftest.py hands the heaviest files to the
test workers first, so that the run does not end with one worker alone on a long file while the other idles.

Refresh after a full run that wrote a JUnit report:
    make test PYTEST_ARGS=--junitxml=/tmp/junit.xml && .venv/bin/python tests/durations.py /tmp/junit.xml
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ElementTree
from collections import Counter
from pathlib import Path

DURATIONS = Path(__file__).with_name("durations.json")


def file_of(classname: str) -> str:
    """'tests.browser.test_x.SomeClass' -> 'tests/browser/test_x.py' (a test's class, if any, is dropped)."""
    parts = classname.split(".")
    depth = next(i for i, part in enumerate(parts) if part.startswith("test_")) + 1
    return "/".join(parts[:depth]) + ".py"


def seconds_per_file(junit_xml: Path) -> dict[str, float]:
    seconds: Counter[str] = Counter()
    for case in ElementTree.parse(junit_xml).getroot().iter("testcase"):
        seconds[file_of(case.get("classname", ""))] += float(case.get("time", 0))
    return {name: round(total, 1) for name, total in sorted(seconds.items())}


def load() -> dict[str, float]:
    return json.loads(DURATIONS.read_text()) if DURATIONS.is_file() else {}


if __name__ == "__main__":
    DURATIONS.write_text(json.dumps(seconds_per_file(Path(sys.argv[1])), indent=1) + "\n")
    print(f"wrote {DURATIONS}")
