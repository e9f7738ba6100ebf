"""Scoring answers with a trained reward model, shared by the app's tabs (Evaluate, RLHF)."""

from __future__ import annotations

import threading
from pathlib import Path

from finetune.core.hardware import HardwareProfile
from finetune.stages.reward import RewardScorer

__all__ = ["RewardScorer", "ScorerCache"]


class ScorerCache:
    """One reward model in memory at a time, shared by the app's tabs (the CPU has no room for several next to
    the chat model, and loading one per click cost seconds)."""

    def __init__(self, profile: HardwareProfile | None = None) -> None:
        self._lock = threading.Lock()
        self._profile = profile
        self._folder: Path | None = None
        self._scorer: RewardScorer | None = None
        self.loads = 0  # how many reward models were loaded from disk (tests check reuse)

    def get(self, folder: str | Path) -> RewardScorer:
        folder = Path(folder)
        with self._lock:
            if self._folder != folder or self._scorer is None:
                self._scorer, self._folder = None, None  # drop the old one before loading the next
                self._scorer, self._folder = RewardScorer(folder, self._profile), folder
                self.loads += 1
            return self._scorer
