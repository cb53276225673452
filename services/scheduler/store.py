"""The scheduler's own store: which task ids it has accepted, and the kinds it knows.

A submission is *claimed* (row written, committed) before its work message is
published, and marked *dispatched* once the broker confirmed it. A claimed row
left behind by a crash is dispatched again at the next start, so a task that got
a 2xx or whose intake message was redelivered is never lost; a dispatched row
makes a resubmission of the same id a duplicate.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import (
    Column,
    DateTime,
    MetaData,
    String,
    Table,
    Text,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from leveret.contracts import TaskMessage, utcnow
from leveret.db import create_engine, insert_for

CLAIMED = "claimed"
DISPATCHED = "dispatched"

metadata = MetaData()

submissions = Table(
    "submissions",
    metadata,
    Column("id", String(200), primary_key=True),
    Column("state", String(16), nullable=False, index=True),
    Column("envelope", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

kinds = Table(
    "kinds",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("first_seen", DateTime(timezone=True), nullable=False),
)

# SQLite caps bound parameters per statement; stay well below.
_IN_CHUNK = 500


@dataclass(frozen=True)
class Existing:
    """A submission already in the store."""

    id: str
    state: str
    envelope: TaskMessage


class SubmissionStore:
    """Claims, dispatch marks and known kinds, on SQLite or PostgreSQL."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    @classmethod
    async def open(cls, url: str) -> SubmissionStore:
        """Connect and create the tables if needed."""
        engine = create_engine(url)
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        return cls(engine)

    async def close(self) -> None:
        """Release the connection pool."""
        await self.engine.dispose()

    async def claim(self, tasks: Sequence[TaskMessage]) -> dict[str, Existing]:
        """Claim every task whose id is new; return the ones that already existed."""
        ids = [t.id for t in tasks]
        existing: dict[str, Existing] = {}
        async with self.engine.begin() as conn:
            for start in range(0, len(ids), _IN_CHUNK):
                part = ids[start : start + _IN_CHUNK]
                rows = await conn.execute(
                    select(submissions.c.id, submissions.c.state, submissions.c.envelope).where(
                        submissions.c.id.in_(part)
                    )
                )
                for row in rows:
                    existing[row.id] = Existing(
                        row.id, row.state, TaskMessage.model_validate_json(row.envelope)
                    )
            now = utcnow()
            fresh = [
                {"id": t.id, "state": CLAIMED, "envelope": t.model_dump_json(), "created_at": now}
                for t in tasks
                if t.id not in existing
            ]
            if fresh:
                stmt = insert_for(self.engine, submissions).on_conflict_do_nothing(
                    index_elements=["id"]
                )
                await conn.execute(stmt, fresh)
        return existing

    async def mark_dispatched(self, ids: Iterable[str]) -> None:
        """Record that these tasks' work messages were confirmed by the broker."""
        id_list = list(ids)
        if not id_list:
            return
        async with self.engine.begin() as conn:
            for start in range(0, len(id_list), _IN_CHUNK):
                await conn.execute(
                    update(submissions)
                    .where(submissions.c.id.in_(id_list[start : start + _IN_CHUNK]))
                    .values(state=DISPATCHED)
                )

    async def undispatched(self, limit: int = 10_000) -> list[TaskMessage]:
        """Tasks claimed but never confirmed as dispatched (left by a crash)."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(submissions.c.envelope)
                .where(submissions.c.state == CLAIMED)
                .order_by(submissions.c.created_at)
                .limit(limit)
            )
            return [TaskMessage.model_validate_json(r.envelope) for r in rows]

    async def known_kinds(self) -> set[str]:
        """Every kind a worker has ever announced."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(kinds.c.name))
            return {r.name for r in rows}

    async def add_kinds(self, names: Iterable[str], seen: datetime | None = None) -> None:
        """Remember kinds announced by a worker."""
        rows = [{"name": n, "first_seen": seen or utcnow()} for n in set(names)]
        if not rows:
            return
        async with self.engine.begin() as conn:
            stmt = insert_for(self.engine, kinds).on_conflict_do_nothing(index_elements=["name"])
            await conn.execute(stmt, rows)
