"""What retention deletes, as statements on one connection. The store runs each in a
write transaction of its own (one batch at a time, so writers wait at most one batch);
:mod:`leveret.tracker.retention` runs the loop.

A task is purged only when it is terminal, finished before the cutoff, and owes its
producer no reply. Its attempts go with it; its status is added to `purged_counts`
and its id kept in `purged_tasks`, both in the same transaction as the delete.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, delete, func, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from leveret.contracts import TERMINAL_STATUSES, TaskStatus
from leveret.db import insert_for
from leveret.tracker.state import ReplyState
from leveret.tracker.tables import (
    attempts,
    purged_counts,
    purged_tasks,
    tasks,
    worker_counters,
    workers,
)
from leveret.tracker.workers import Death

#: Rows deleted per transaction (also well under SQLite's bound-parameter cap).
PURGE_BATCH = 500

_TERMINAL = sorted(s.value for s in TERMINAL_STATUSES)
_WRITTEN_OFF = (Death.FENCED.value, Death.GONE.value)


@dataclass(frozen=True, slots=True)
class PurgedTask:
    """A task that retention deleted: what the API says about its id."""

    id: str
    status: TaskStatus
    finished_at: datetime | None
    purged_at: datetime


async def purge_tasks(conn: AsyncConnection, cutoff: datetime, now: datetime, limit: int) -> int:
    """Delete up to `limit` purgeable tasks that finished before `cutoff`, oldest first,
    with their attempts; count them and remember their ids. Returns how many."""
    c = tasks.c
    query = (
        select(c.id, c.status, c.finished_at, c.submitted_at, c.started_at)
        .where(
            c.finished_at < cutoff,
            # Through a function, so that no planner walks the status index: SQLite's
            # would, and sort every finished task for each batch (seconds at 1M tasks);
            # the finish-time index gives the rows in order.
            func.coalesce(c.status, "").in_(_TERMINAL),
            or_(c.reply.is_(None), c.reply != ReplyState.OWED.value),
        )
        .order_by(c.finished_at)
        .limit(limit)
    )
    rows = (await conn.execute(query)).all()
    if not rows:
        return 0
    ids = [r.id for r in rows]
    await conn.execute(delete(attempts).where(attempts.c.task_id.in_(ids)))
    await conn.execute(delete(tasks).where(tasks.c.id.in_(ids)))
    await _count(conn, rows)
    stmt = insert_for(conn.engine, purged_tasks)
    await conn.execute(
        stmt.on_conflict_do_update(
            index_elements=["id"],
            set_={k: stmt.excluded[k] for k in ("status", "finished_at", "purged_at")},
        ),
        [
            {"id": r.id, "status": r.status, "finished_at": r.finished_at, "purged_at": now}
            for r in rows
        ],
    )
    return len(rows)


async def _count(conn: AsyncConnection, rows: Sequence[Any]) -> None:
    """Add the purged tasks to `purged_counts`, per status."""
    counts: dict[str, int] = defaultdict(int)
    first: dict[str, datetime] = {}
    for r in rows:
        counts[r.status] += 1
        moment = r.submitted_at or r.started_at or r.finished_at
        if moment is not None and (r.status not in first or moment < first[r.status]):
            first[r.status] = moment
    stmt = insert_for(conn.engine, purged_counts)
    pc = purged_counts.c
    await conn.execute(
        stmt.on_conflict_do_update(
            index_elements=["status"],
            set_={
                "purged": pc.purged + stmt.excluded.purged,
                "first_at": func.coalesce(pc.first_at, stmt.excluded.first_at),
            },
        ),
        [{"status": s, "purged": n, "first_at": first.get(s)} for s, n in sorted(counts.items())],
    )


async def forget_purged(conn: AsyncConnection, cutoff: datetime, limit: int) -> int:
    """Forget up to `limit` purged ids purged before `cutoff`; returns how many."""
    old = select(purged_tasks.c.id).where(purged_tasks.c.purged_at < cutoff).limit(limit)
    done = await conn.execute(delete(purged_tasks).where(purged_tasks.c.id.in_(old)))
    return done.rowcount


async def drop_workers(conn: AsyncConnection, cutoff: datetime, limit: int) -> list[str]:
    """Drop up to `limit` registrations (and their counters) of workers that stopped, or
    were fenced or gone, before `cutoff` and were not heard from since. An `unfenced`
    worker stays: the watchdog still has to close its connection."""
    c = workers.c
    written_off = and_(c.death.in_(_WRITTEN_OFF), c.dead_at < cutoff, c.last_seen < cutoff)
    stopped = and_(c.stopped_at.is_not(None), c.stopped_at >= c.last_seen, c.stopped_at < cutoff)
    query = select(c.id).where(or_(written_off, stopped)).order_by(c.id).limit(limit)
    ids = list((await conn.scalars(query)).all())
    if ids:
        await conn.execute(delete(workers).where(c.id.in_(ids)))
        await conn.execute(delete(worker_counters).where(worker_counters.c.worker.in_(ids)))
    return ids


async def find_purged(conn: AsyncConnection, task_id: str) -> PurgedTask | None:
    """The record of a purged id, if it is still remembered."""
    row = (await conn.execute(select(purged_tasks).where(purged_tasks.c.id == task_id))).first()
    if row is None:
        return None
    return PurgedTask(row.id, TaskStatus(row.status), row.finished_at, row.purged_at)


async def purged_totals(conn: AsyncConnection) -> tuple[dict[TaskStatus, int], datetime | None]:
    """Purged tasks per status, and the earliest time of any of them."""
    rows = (await conn.execute(select(purged_counts))).all()
    firsts = [r.first_at for r in rows if r.first_at is not None]
    return {TaskStatus(r.status): r.purged for r in rows}, min(firsts, default=None)
