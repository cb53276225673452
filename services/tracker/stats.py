"""Statistics over the tracker's tasks: counts by status, throughput, latency percentiles.

Counts and overall throughput include the tasks retention purged (kept per status in
`purged_counts`), so totals do not drop when old tasks are deleted."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from leveret.contracts import TaskStatus
from leveret.tracker.purge import purged_totals
from leveret.tracker.tables import tasks
from leveret.tracker.workers import WorkerView

#: Terminal tasks sampled (newest first) for latency percentiles.
LATENCY_SAMPLE = 10_000
THROUGHPUT_WINDOW_S = 60.0

_FINISHED_WORK = (TaskStatus.COMPLETED.value, TaskStatus.FAILED.value)
_RAN = (TaskStatus.COMPLETED.value, TaskStatus.FAILED.value, TaskStatus.CANCELLED.value)


@dataclass(frozen=True)
class Stats:
    """Counts, throughput, latency and per-worker totals."""

    counts: dict[TaskStatus, int]
    throughput_60s: float
    throughput_overall: float
    latency_s: dict[str, float | None]
    latency_sample: int
    workers: list[WorkerView] = field(default_factory=list)
    purged: int = 0  # of `counts`, how many retention deleted

    @property
    def total(self) -> int:
        """Every task the tracker knows."""
        return sum(self.counts.values())


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (0 < p ≤ 100) of ascending values; None when empty."""
    if not sorted_values:
        return None
    index = max(0, math.ceil(p / 100 * len(sorted_values)) - 1)
    return sorted_values[index]


async def task_figures(conn: AsyncConnection, now: datetime) -> Stats:
    """Counts, throughput and latency at `now` (without the per-worker totals)."""
    grouped = await conn.execute(select(tasks.c.status, func.count()).group_by(tasks.c.status))
    counts = {s: 0 for s in TaskStatus}
    for status, n in grouped:
        counts[TaskStatus(status)] = n
    purged, purged_since = await purged_totals(conn)
    for status, n in purged.items():
        counts[status] += n
    recent = await conn.scalar(
        select(func.count()).where(
            tasks.c.status.in_(_FINISHED_WORK),
            tasks.c.finished_at >= now - timedelta(seconds=THROUGHPUT_WINDOW_S),
        )
    )
    latencies = await _latency_sample(conn)
    return Stats(
        counts=counts,
        throughput_60s=(recent or 0) / THROUGHPUT_WINDOW_S,
        throughput_overall=await _overall_throughput(conn, counts, purged_since),
        latency_s={f"p{p}": percentile(latencies, p) for p in (50, 95, 99)},
        latency_sample=len(latencies),
        purged=sum(purged.values()),
    )


async def _overall_throughput(
    conn: AsyncConnection, counts: dict[TaskStatus, int], purged_since: datetime | None
) -> float:
    """Completed+failed per second from the first recorded task (purged ones included) to
    the last finish."""
    done = counts[TaskStatus.COMPLETED] + counts[TaskStatus.FAILED]
    if not done:
        return 0.0
    first = (
        await conn.execute(
            select(tasks.c.submitted_at, tasks.c.started_at, tasks.c.finished_at)
            .order_by(tasks.c.seq)
            .limit(1)
        )
    ).first()
    last = await conn.scalar(
        select(func.max(tasks.c.finished_at)).where(tasks.c.status.in_(_FINISHED_WORK))
    )
    start = next((t for t in first or () if t is not None), None)
    if purged_since is not None:
        start = purged_since if start is None else min(start, purged_since)
    if start is None or last is None:
        return 0.0
    span = (last - start).total_seconds()
    return done / span if span > 0 else 0.0


async def _latency_sample(conn: AsyncConnection) -> list[float]:
    """Submitted→finished seconds of the newest terminal tasks that ran, ascending."""
    rows = await conn.execute(
        select(tasks.c.submitted_at, tasks.c.finished_at)
        .where(tasks.c.status.in_(_RAN), tasks.c.submitted_at.is_not(None))
        .order_by(tasks.c.seq.desc())
        .limit(LATENCY_SAMPLE)
    )
    return sorted(
        max(0.0, (r.finished_at - r.submitted_at).total_seconds())
        for r in rows
        if r.finished_at is not None
    )
