"""Where a learner stands in the course: each step's result, kept on disk per visitor so a page reload or an app
restart finds it again.

One JSON file per visitor under ``<runs root>/course/``: the local user's (an app without sign-in) or, with
sign-in, one per username (named by a hash of it, so no name reaches a path). A visitor who has not signed in on a
shared app cannot start anything, so nothing of theirs is kept. Writes go through a temporary file and a rename:
a crash leaves the old file or the new one, never half of one.

Basic module: it imports only access.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from finetune.core.access import Visitor

COURSE_DIR = "course"
_lock = threading.Lock()  # two handlers of one visitor (a poll and a click) write one file in turn


def visitor_key(visitor: Visitor) -> str | None:
    """The file name part for ``visitor``: 'local' without sign-in, a hash of the username with it, None for a
    visitor who has not signed in (nothing is kept for them)."""
    if not visitor.sign_in:
        return "local"
    if visitor.name is None:
        return None
    return "user-" + hashlib.sha256(visitor.name.lower().encode("utf-8")).hexdigest()[:24]


class CourseProgress:
    """One visitor's course record: {step key: {"result": {...}, "done": bool, "at": time}}."""

    def __init__(self, runs_root: str | Path, visitor: Visitor):
        key = visitor_key(visitor)
        self.folder = Path(runs_root) / COURSE_DIR
        self.path = self.folder / f"{key}.json" if key else None

    @property
    def kept(self) -> bool:
        return self.path is not None

    def load(self) -> dict[str, dict[str, Any]]:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # a damaged file starts the course afresh rather than failing the page
            return {}
        return data if isinstance(data, dict) else {}

    def result(self, step: str) -> dict[str, Any]:
        return dict(self.load().get(step, {}).get("result") or {})

    def record(self, step: str, done: bool = True, **result: Any) -> dict[str, Any]:
        """Merge ``result`` into the step's stored result; returns the step's new entry."""
        if self.path is None:
            return {"result": result, "done": done}
        with _lock:
            data = self.load()
            entry = data.get(step) or {}
            entry = {"result": {**(entry.get("result") or {}), **result}, "done": done or bool(entry.get("done")),
                     "at": time.time()}
            data[step] = entry
            self._write(data)
        return entry

    def done(self) -> list[str]:
        return [step for step, entry in self.load().items() if entry.get("done")]

    def _write(self, data: dict[str, Any]) -> None:
        assert self.path is not None
        self.folder.mkdir(parents=True, exist_ok=True)
        staging = self.path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        staging.write_text(json.dumps(data, indent=1, ensure_ascii=False), encoding="utf-8")
        os.replace(staging, self.path)
