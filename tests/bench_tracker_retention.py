"""Tracker retention benchmark (run by hand, not part of the suite):

    .venv/bin/python tests/bench_tracker_retention.py --tasks 200000 --dir /tmp/trkbench

Writes finished tasks through the store's normal write path (`TrackerStore.apply`, a
batch of 1000 messages per transaction: accepted, started and result per task) on
SQLite, their finish times spread evenly over 10 simulated days, and measures:

- off: database size and write latency with retention off;
- catch-up: on that database, retention set to 1 day purges the 9 older days while a
  writer keeps applying batches: purge rate and the writer's latency meanwhile;
- on: a fresh database written with retention (1 day), a sweep after every 1% of the
  tasks: its size (one day of tasks kept, the ids of the day before remembered).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from loguru import logger
from sqlalchemy import text

from leveret.contracts import (
    AcceptedTask,
    StartedTask,
    TaskResult,
    TasksAccepted,
    TasksStarted,
)
from leveret.settings import sqlite_url
from leveret.tracker.retention import Retention
from leveret.tracker.state import TrackerMessage
from leveret.tracker.store import TrackerStore

T0 = datetime(2026, 1, 1, tzinfo=UTC)
SPAN_S = 10 * 86400.0
RETENTION_S = 86400.0
PER_BATCH = 333  # tasks per transaction: 999 messages


def messages(first: int, count: int, total: int) -> list[TrackerMessage]:
    """accepted + started + result of tasks first..first+count, finishing on the timeline."""
    ids = [f"task-{i:09d}" for i in range(first, first + count)]
    at = [T0 + timedelta(seconds=SPAN_S * i / total) for i in range(first, first + count)]
    out: list[TrackerMessage] = [
        TasksAccepted(
            tasks=[
                AcceptedTask(id=i, kind="echo", pool="default", submitted_at=a)
                for i, a in zip(ids, at, strict=True)
            ]
        ),
        TasksStarted(
            worker="w1",
            tasks=[
                StartedTask(id=i, attempt=1, started_at=a) for i, a in zip(ids, at, strict=True)
            ],
        ),
    ]
    out += [
        TaskResult(
            id=i,
            kind="echo",
            status="completed",
            result={"n": n},
            attempt=1,
            worker="w1",
            submitted_at=a,
            started_at=a,
            finished_at=a + timedelta(milliseconds=5),
        )
        for n, (i, a) in enumerate(zip(ids, at, strict=True))
    ]
    return out


async def write(store: TrackerStore, first: int, count: int, total: int, lat: list[float]) -> None:
    for start in range(first, first + count, PER_BATCH):
        batch = messages(start, min(PER_BATCH, first + count - start), total)
        began = time.perf_counter()
        await store.apply(batch)
        lat.append(time.perf_counter() - began)


def size_mb(path: Path) -> float:
    files = [path, path.with_name(path.name + "-wal")]
    return sum(f.stat().st_size for f in files if f.exists()) / 1e6


async def checkpoint(store: TrackerStore) -> tuple[int, int]:
    async with store.engine.connect() as conn:
        await conn.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
        pages = await conn.scalar(text("PRAGMA page_count"))
        free = await conn.scalar(text("PRAGMA freelist_count"))
    return int(pages or 0), int(free or 0)


def describe(name: str, lat: list[float]) -> str:
    lat = sorted(lat)
    p99 = lat[int(0.99 * (len(lat) - 1))]
    return (
        f"{name}: {len(lat)} batches, write latency p50 {statistics.median(lat) * 1e3:.0f} ms, "
        f"p99 {p99 * 1e3:.0f} ms, max {lat[-1] * 1e3:.0f} ms"
    )


def fresh(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for f in root.glob("*.db*"):
        f.unlink()


async def run(total: int, root: Path) -> None:
    # off
    off_path = root / "off.db"
    store = await TrackerStore.open(sqlite_url(off_path))
    lat: list[float] = []
    began = time.perf_counter()
    await write(store, 0, total, total, lat)
    elapsed = time.perf_counter() - began
    pages = await checkpoint(store)
    print(f"[off] {total} tasks in {elapsed:.0f} s ({total / elapsed:.0f} tasks/s); "
          f"db {size_mb(off_path):.1f} MB (pages {pages[0]}, free {pages[1]})")  # fmt: skip
    print("[off] " + describe("writes", lat))

    # catch-up purge of 9 days while writing more
    end = T0 + timedelta(seconds=SPAN_S)
    retention = Retention(
        store, retention_s=RETENTION_S, worker_retention_s=3600, clock=lambda: end
    )
    extra: list[float] = []
    extra_n = total // 10
    writer = asyncio.create_task(write(store, total, extra_n, total, extra))
    began = time.perf_counter()
    swept = await retention.sweep()
    purge_s = time.perf_counter() - began
    await writer
    pages = await checkpoint(store)
    print(f"[catch-up] purged {swept.tasks} tasks ({2 * swept.tasks} rows with attempts) in "
          f"{purge_s:.1f} s: {swept.tasks / purge_s:.0f} tasks/s, {2 * swept.tasks / purge_s:.0f} "
          f"rows/s; db {size_mb(off_path):.1f} MB (pages {pages[0]}, free {pages[1]})")  # fmt: skip
    print("[catch-up] " + describe(f"concurrent writes ({extra_n} tasks)", extra))
    await store.close()

    # on from the start: a sweep after every 1% of the tasks (0.1 simulated day), as the
    # loop would sweep between batches in real time
    on_path = root / "on.db"
    store = await TrackerStore.open(sqlite_url(on_path))
    position = [T0]
    clock: Callable[[], datetime] = lambda: position[0]  # noqa: E731
    retention = Retention(store, retention_s=RETENTION_S, worker_retention_s=3600, clock=clock)
    lat = []
    began = time.perf_counter()
    step = max(PER_BATCH, total // 100)
    for start in range(0, total, step):
        count = min(step, total - start)
        await write(store, start, count, total, lat)
        position[0] = T0 + timedelta(seconds=SPAN_S * (start + count) / total)
        await retention.sweep()
    elapsed = time.perf_counter() - began
    pages = await checkpoint(store)
    stats = await store.stats(position[0])
    async with store.engine.connect() as conn:
        live = await conn.scalar(text("SELECT count(*) FROM tasks"))
        ids = await conn.scalar(text("SELECT count(*) FROM purged_tasks"))
    print(f"[on] {total} tasks in {elapsed:.0f} s with sweeps; purged {retention.purged}, "
          f"{live} kept, {ids} purged ids remembered; db {size_mb(on_path):.1f} MB (pages "
          f"{pages[0]}, free {pages[1]}); /stats total {stats.total}")  # fmt: skip
    print("[on] " + describe("writes", lat))
    await store.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=200_000)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/leveret-bench-retention"))
    args = parser.parse_args()
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    fresh(args.dir)
    asyncio.run(run(args.tasks, args.dir))


if __name__ == "__main__":
    main()
