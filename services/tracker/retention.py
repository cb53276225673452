"""Retention: the tracker's background loop that keeps its store bounded.

Every :attr:`Retention.interval_s` it

- purges tasks that finished more than ``LEVERET_RETENTION`` ago (terminal, and
  owing their producer no reply), :data:`~leveret.tracker.purge.PURGE_BATCH` per
  transaction with a pause between batches as long as the batch took, so that the
  consumer's writes wait for one small batch at most and keep at least half the
  store's time;
- forgets the ids it purged once they are one more retention period old (until
  then ``GET /tasks/{id}`` answers 410 Gone, after that 404);
- drops the registrations of workers that stopped, or were fenced or gone, more
  than ``LEVERET_WORKER_RETENTION`` ago and were not heard from since.

A retention of 0 keeps tasks forever; worker registrations are always bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from loguru import logger

from leveret.contracts import utcnow
from leveret.tracker.purge import PURGE_BATCH
from leveret.tracker.store import TrackerStore

#: Longest time between two sweeps.
SWEEP_EVERY_S = 60.0
#: Shortest pause between two purge batches (the pause is at least as long as the
#: batch took): the consumer's writes go first.
PURGE_PAUSE_S = 0.01


def format_duration(seconds: float) -> str:
    """``7d``, ``36h``, ``90m`` or ``45s``: the largest unit that divides it, else seconds."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


@dataclass(frozen=True)
class Sweep:
    """What one sweep removed."""

    tasks: int = 0
    forgotten: int = 0
    workers: int = 0


class Retention:
    """Purges old finished tasks, purged ids and dead worker registrations."""

    def __init__(
        self,
        store: TrackerStore,
        *,
        retention_s: float,
        worker_retention_s: float,
        clock: Callable[[], datetime] = utcnow,
        batch: int = PURGE_BATCH,
        pause_s: float = PURGE_PAUSE_S,
        on_workers_dropped: Callable[[list[str]], None] | None = None,
    ) -> None:
        """`retention_s` 0 keeps tasks forever; `on_workers_dropped` hears the ids of
        dropped worker registrations."""
        self.on_workers_dropped = on_workers_dropped
        self.store = store
        self.retention_s = retention_s
        self.worker_retention_s = worker_retention_s
        self.clock = clock
        self.batch = batch
        self.pause_s = pause_s
        self.purged = 0

    @property
    def interval_s(self) -> float:
        """Time between two sweeps: a quarter of the shorter retention, at most a minute."""
        shortest = min(r for r in (self.retention_s, self.worker_retention_s) if r > 0)
        return min(SWEEP_EVERY_S, shortest / 4)

    async def run(self, stop: asyncio.Event) -> None:
        """Sweep every :attr:`interval_s` until `stop` is set."""
        while not stop.is_set():
            try:
                await self.sweep(stop)
            except Exception:  # loop boundary: try again next time
                logger.exception("retention sweep failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)

    async def sweep(self, stop: asyncio.Event | None = None) -> Sweep:
        """One pass; stops between batches once `stop` is set."""
        now = self.clock()
        purged = forgotten = 0
        if self.retention_s > 0:
            cutoff = now - timedelta(seconds=self.retention_s)
            started = time.monotonic()
            purged = await self._batches(
                lambda: self.store.purge_finished(cutoff, now, self.batch), stop
            )
            if purged:
                self.purged += purged
                elapsed = time.monotonic() - started
                logger.info(
                    "retention: purged {} tasks finished before {} ({:.0f} tasks/s)",
                    purged,
                    cutoff.isoformat(timespec="seconds"),
                    purged / elapsed if elapsed > 0 else 0.0,
                )
            forgotten = await self._batches(
                lambda: self.store.forget_purged(cutoff, self.batch), stop
            )
        worker_cutoff = now - timedelta(seconds=self.worker_retention_s)
        dropped = await self.store.drop_workers(worker_cutoff, self.batch)
        if dropped and self.on_workers_dropped is not None:
            self.on_workers_dropped(dropped)
        if dropped:
            logger.info(
                "retention: dropped {} worker registrations silent since before {}: {}",
                len(dropped),
                worker_cutoff.isoformat(timespec="seconds"),
                ", ".join(dropped[:10]) + (" …" if len(dropped) > 10 else ""),
            )
        return Sweep(purged, forgotten, len(dropped))

    async def _batches(
        self, step: Callable[[], Awaitable[int]], stop: asyncio.Event | None = None
    ) -> int:
        """Run `step` until it removes less than a full batch; the total removed."""
        total = 0
        while stop is None or not stop.is_set():
            began = time.monotonic()
            done = await step()
            total += done
            if done < self.batch:
                break
            # Yield the store to writers for as long as the batch held it (at least
            # pause_s): a purge takes at most half the write capacity while it runs.
            await asyncio.sleep(max(self.pause_s, time.monotonic() - began))
        return total
