"""Scheduler retention benchmark (run by hand, not part of the suite):

    .venv/bin/python tests/bench_scheduler_retention.py --tasks 1000000 --dir /tmp/schbench

Writes submissions through the scheduler store's normal path (`claim`, then
`mark_dispatched`, then `record_outcomes` for their ends: three transactions per batch
of 256, as admission and the outcomes consumer do) on SQLite, and measures:

- off: database size and write latency with retention off, as fast as the store goes;
- catch-up: on that database, a purge of every ended row while a writer submits a
  steady 1000 tasks/s: purge rate, and the writer's latency meanwhile;
- on: a fresh database written at a steady 3000 tasks/s with the purger running
  (retention 10 s, so all but the last ~30 000 rows go): size, purge rate, latency;
- with `--compare N`, only: N tasks at 3000 tasks/s with retention off, then on, to
  compare write latency with and without a purge running.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable
from datetime import datetime
from pathlib import Path

from loguru import logger
from sqlalchemy import func, select

from leveret.contracts import TaskMessage, utcnow
from leveret.scheduler.retention import Purger
from leveret.scheduler.store import CLAIMED, PurgeCursor, Submission, SubmissionStore
from leveret.scheduler.tables import submissions
from leveret.settings import sqlite_url

BATCH = 256


def size_mb(path: Path) -> float:
    """The database file and its WAL, in MB."""
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*")) / 1e6


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


class Writer:
    """Submits batches through the store's normal path, timing each transaction."""

    def __init__(self, store: SubmissionStore, prefix: str) -> None:
        self.store, self.prefix, self.n = store, prefix, 0
        self.latencies: list[tuple[float, float]] = []  # (start, seconds)

    async def _timed(self, step: Awaitable[object]) -> None:
        started = time.monotonic()
        await step
        self.latencies.append((started, time.monotonic() - started))

    async def batch(self) -> None:
        ids = [f"{self.prefix}-{self.n + i:08d}" for i in range(BATCH)]
        self.n += BATCH
        now = utcnow()
        subs = [
            (Submission(TaskMessage(id=i, kind="echo", payload="hello", submitted_at=now)), CLAIMED)
            for i in ids
        ]
        await self._timed(self.store.claim(subs))
        await self._timed(self.store.mark_dispatched(ids))
        await self._timed(self.store.record_outcomes([(i, "completed", None) for i in ids]))

    async def write(self, n: int, rate: float = 0.0) -> float:
        """Submit `n` tasks, as fast as the store takes them or paced at `rate`/s."""
        started = paced = time.monotonic()
        while self.n < n:
            await self.batch()
            if rate:
                paced += BATCH / rate
                await asyncio.sleep(max(0.0, paced - time.monotonic()))
        return time.monotonic() - started


class TimedStore:
    """The store's purge, recording when each batch ran, for how long, and what it deleted."""

    def __init__(self, store: SubmissionStore) -> None:
        self.store = store
        self.spans: list[tuple[float, float, int]] = []

    async def purge(
        self, cutoff: datetime, limit: int, after: PurgeCursor | None = None
    ) -> tuple[int, PurgeCursor | None]:
        started = time.monotonic()
        deleted, after = await self.store.purge(cutoff, limit, after)
        self.spans.append((started, time.monotonic() - started, deleted))
        return deleted, after


def timed_purger(store: SubmissionStore, retention_s: float) -> tuple[Purger, TimedStore]:
    timed = TimedStore(store)
    purger = Purger(store, retention_s)
    purger.store = timed  # type: ignore[assignment]
    return purger, timed


def describe(label: str, writer: Writer, elapsed: float, timed: TimedStore | None = None) -> None:
    lat = [d for _, d in writer.latencies]
    print(
        f"{label}: {writer.n} submissions in {elapsed:.0f} s ({writer.n / elapsed:.0f}/s); "
        f"write tx p50 {pct(lat, 0.5) * 1e3:.1f} p99 {pct(lat, 0.99) * 1e3:.1f} "
        f"p99.9 {pct(lat, 0.999) * 1e3:.0f} max {max(lat) * 1e3:.0f} ms, "
        f"{sum(x > 0.1 for x in lat)} over 100 ms"
    )
    if timed is None:
        return
    spans = [(s, d) for s, d, n in timed.spans if n]
    rows = sum(n for *_, n in timed.spans)
    busy = sum(d for _, d in spans)
    overlapping = [
        d for s, d in writer.latencies if any(b < s + d and s < b + bd for b, bd in spans)
    ]
    batches = [d for _, d in spans]
    print(
        f"  purged {rows} rows in {len(spans)} batches, {busy:.1f} s inside them "
        f"({rows / busy if busy else 0:.0f} rows/s); batch p50 {pct(batches, 0.5) * 1e3:.0f} "
        f"p99 {pct(batches, 0.99) * 1e3:.0f} max {max(batches, default=0) * 1e3:.0f} ms"
    )
    print(
        f"  writes overlapping a purge batch: {len(overlapping)}, p99 "
        f"{pct(overlapping, 0.99) * 1e3:.0f} max {max(overlapping, default=0) * 1e3:.0f} ms"
    )


async def off_and_catch_up(root: Path, n: int) -> None:
    path = root / "off.db"
    store = await SubmissionStore.open(sqlite_url(path))
    writer = Writer(store, "off")
    describe("retention off", writer, await writer.write(n))
    print(f"  file: {size_mb(path):.1f} MB")
    purger, timed = timed_purger(store, 0.001)
    during = Writer(store, "catchup")
    started = paced = time.monotonic()
    purge = asyncio.create_task(purger.purge())
    while not purge.done():
        await during.batch()
        paced += BATCH / 1000
        await asyncio.sleep(max(0.0, paced - time.monotonic()))
    wall = time.monotonic() - started
    print(f"catch-up purge: {purge.result()} rows in {wall:.1f} s ({purge.result() / wall:.0f}/s)")
    describe("  writes meanwhile", during, wall, timed)
    print(f"  file after: {size_mb(path):.1f} MB (freed pages are reused, not returned)")
    await store.close()


async def on(root: Path, name: str, n: int, retention_s: float | None, rate: float) -> None:
    path = root / name
    store = await SubmissionStore.open(sqlite_url(path))
    writer = Writer(store, "on")
    timed = None
    runner = None
    if retention_s:
        purger, timed = timed_purger(store, retention_s)
        runner = asyncio.create_task(purger.run())
    elapsed = await writer.write(n, rate)
    if runner is not None:
        runner.cancel()
    label = f"retention {f'{retention_s:g} s' if retention_s else 'off'}, writes at {rate:g}/s"
    describe(label, writer, elapsed, timed)
    async with store.engine.connect() as conn:
        left = await conn.scalar(select(func.count()).select_from(submissions))
    print(f"  rows left: {left}; file: {size_mb(path):.1f} MB")
    await store.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200_000)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--compare", type=int, default=0)
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    if args.compare:
        await on(args.dir, "compare-off.db", args.compare, None, 3000)
        await on(args.dir, "compare-on.db", args.compare, 10.0, 3000)
        return
    await off_and_catch_up(args.dir, args.tasks)
    await on(args.dir, "on.db", args.tasks, 10.0, 3000)


if __name__ == "__main__":
    asyncio.run(main())
