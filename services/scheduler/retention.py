"""Retention: the scheduler's store forgets tasks that ended long ago.

A background loop purges, every :func:`purge_every` seconds, the rows of tasks
that ended more than ``LEVERET_RETENTION`` ago and that nothing needs any more
(:meth:`~leveret.scheduler.store.SubmissionStore.purge` says which), walking them
oldest first in batches of :data:`~leveret.scheduler.store.PURGE_BATCH` rows, one
short transaction each.
After each batch it leaves the store to writers for as long as the batch took, so
a purge never takes more than half the store's time and a submission waits at
most one batch. A purged id is unknown to the scheduler: submitted again, it is a
new task; named in ``depends_on``, an unknown parent (``unknown_dependency``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import datetime, timedelta

from loguru import logger

from leveret.contracts import utcnow
from leveret.scheduler.store import (
    INTAKE_KEY_MAX_AGE,
    PURGE_BATCH,
    PurgeCursor,
    SubmissionStore,
)

#: The longest pause between two purges (a short retention purges more often).
PURGE_EVERY_S = 60.0
#: The shortest pause between two batches of one purge.
MIN_PAUSE_S = 0.005


def purge_every(retention_s: float) -> float:
    """Seconds between purges: a tenth of the retention, between 0.1 s and a minute."""
    return min(PURGE_EVERY_S, max(0.1, retention_s / 10))


class Purger:
    """Purges ended tasks older than the retention period, in small batches."""

    def __init__(
        self,
        store: SubmissionStore,
        retention_s: float,
        *,
        batch: int = PURGE_BATCH,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.store = store
        self.retention = timedelta(seconds=retention_s)
        self.every_s = purge_every(retention_s)
        self.batch = batch
        self.clock = clock
        self.purged = 0

    async def purge(self) -> int:
        """Purge every row due now, batch by batch; return how many."""
        now = self.clock()
        cutoff = now - self.retention
        keys_before = min(cutoff, now - INTAKE_KEY_MAX_AGE)  # an intake key is stale by then
        started = time.monotonic()
        total = 0
        after: PurgeCursor | None = None
        while True:
            batch_started = time.monotonic()
            done, after = await self.store.purge(cutoff, self.batch, after, keys_before=keys_before)
            total += done
            self.purged += done
            if after is None:
                break
            # Let writers in: pause as long as the batch held the store.
            await asyncio.sleep(max(MIN_PAUSE_S, time.monotonic() - batch_started))
        if total:
            logger.info(
                "purged {} task(s) ended before {} in {:.2f} s",
                total,
                cutoff.isoformat(timespec="seconds"),
                time.monotonic() - started,
            )
        return total

    async def run(self) -> None:
        """Purge forever, every :attr:`every_s` (cancel to stop); outlive store trouble."""
        while True:
            try:
                await self.purge()
            except Exception:  # loop boundary: the next round tries again
                logger.exception("purging ended tasks failed; retrying in {} s", self.every_s)
            await asyncio.sleep(self.every_s)
