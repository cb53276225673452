"""The cancelled task ids a worker remembers, bounded in number and in age.

Every worker reads the cancellations stream, which keeps a day of `task.cancel`
commands (``CANCELLATIONS_MAX_AGE``, and at most ``CANCELLATIONS_MAX_BYTES``), so a
worker never needs to remember a command for longer than a worker that starts now
would find it there. Remembering forever would only grow: a cancelled id is kept
for a day, and at most :data:`MAX_REMEMBERED_CANCELS` of them, the oldest forgotten
first.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime

#: How long a cancel is remembered: the stream's retention (1 day).
CANCEL_MEMORY_S = 24 * 3600.0
#: Cancels remembered at most: about 16 MB with 32-character ids and short reasons,
#: 70 MB at the longest (200-character ids, 500-character reasons).
MAX_REMEMBERED_CANCELS = 50_000


class CancelledIds:
    """Task id -> the reason it was cancelled, for the last day's newest cancels."""

    def __init__(
        self,
        max_ids: int = MAX_REMEMBERED_CANCELS,
        max_age_s: float = CANCEL_MEMORY_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_ids = max_ids
        self.max_age_s = max_age_s
        self._clock = clock
        self._reasons: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._reasons)

    def add(self, task_id: str, reason: str, at: datetime) -> None:
        """Remember a cancel sent at `at` (never later than now: a clock ahead of ours
        must not keep it longer)."""
        now = self._clock()
        self._reasons.pop(task_id, None)
        self._reasons[task_id] = (reason, min(at.timestamp(), now))
        self._forget_old(now)

    def get(self, task_id: str) -> str | None:
        """The reason `task_id` was cancelled, or None if no remembered cancel names it."""
        entry = self._reasons.get(task_id)
        if entry is None or self._clock() - entry[1] > self.max_age_s:
            return None
        return entry[0]

    def _forget_old(self, now: float) -> None:
        """Drop the oldest entries past the count, then those past the age. Entries are
        in arrival order, which is the stream's order, so the oldest come first."""
        while len(self._reasons) > self.max_ids:
            self._reasons.popitem(last=False)
        while self._reasons:
            _, at = next(iter(self._reasons.values()))
            if now - at <= self.max_age_s:
                return
            self._reasons.popitem(last=False)
