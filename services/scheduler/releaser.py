"""The delayed-task releaser: dispatches held tasks once their due time has come.

Delayed tasks live in the scheduler's store (state `delayed`, with `run_at`),
never in a worker's memory nor unacked in a queue, so they survive restarts of
anything. Each round atomically takes the due rows (``UPDATE … WHERE
state='delayed'``: two scheduler replicas sharing PostgreSQL never both take one),
dispatches them like any admitted task, and marks them dispatched. Between rounds
it sleeps until the next due time or :data:`POLL_S`, whichever is sooner (another
replica may have admitted an earlier task), and wakes at once when this process
admits a task due earlier.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime

from loguru import logger

from leveret.contracts import utcnow
from leveret.scheduler.dispatch import Dispatcher
from leveret.scheduler.store import DELAYED, SubmissionStore

#: The longest the releaser sleeps between two looks at the store.
POLL_S = 0.1
#: How long it waits after a failed round (store or broker trouble) before the next.
BACKOFF_S = 1.0


def sleep_for(next_due: datetime | None, now: datetime, poll_s: float = POLL_S) -> float:
    """Seconds to sleep before the next round: until `next_due`, at most `poll_s`."""
    if next_due is None:
        return poll_s
    return min(poll_s, max(0.0, (next_due - now).total_seconds()))


class Releaser:
    """Dispatches delayed tasks as they fall due."""

    def __init__(self, store: SubmissionStore, dispatcher: Dispatcher, *, batch_max: int) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.batch_max = batch_max
        self.released = 0
        self._wake = asyncio.Event()
        self._next_due: datetime | None = None

    def wake(self, run_at: datetime) -> None:
        """A task due at `run_at` was just held: look again sooner if that is earlier."""
        if self._next_due is None or run_at < self._next_due:
            self._wake.set()

    async def run(self) -> None:
        """Release due tasks forever (cancel to stop)."""
        while True:
            delay = POLL_S
            try:
                await self.release_due()
                self._next_due = await self.store.next_due()
                delay = sleep_for(self._next_due, utcnow())
            except Exception:  # loop boundary: the releaser must outlive store/broker trouble
                logger.exception("releasing delayed tasks failed; retrying in {} s", BACKOFF_S)
                delay = BACKOFF_S
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            self._wake.clear()

    async def release_due(self) -> int:
        """Dispatch every task due now, in batches; return how many."""
        total = 0
        while True:
            now = utcnow()
            due = await self.store.take_due(now, self.batch_max)
            if not due:
                return total
            try:
                await self.dispatcher.send(due)
            except BaseException:
                # Not confirmed: hold them again, the next round retries.
                await self.store.mark((s.id for s in due), DELAYED)
                raise
            await self.store.mark_dispatched(s.id for s in due)
            late = max(((now - s.run_at).total_seconds() for s in due if s.run_at), default=0.0)
            logger.info("released {} delayed task(s), latest {:.3f} s after due", len(due), late)
            total += len(due)
            self.released += len(due)
            if len(due) < self.batch_max:
                return total
