"""The scheduler store's tables and row states (see :mod:`leveret.scheduler.store`)."""

from __future__ import annotations

from sqlalchemy import Column, DateTime, Index, MetaData, String, Table, Text

from leveret.db import UtcDateTime

CLAIMED = "claimed"
DISPATCHED = "dispatched"
DELAYED = "delayed"
BLOCKED = "blocked"
RELEASING = "releasing"
FAILING = "failing"
ENDED = "ended"
#: States a row never leaves: its work went out, or its ending was published.
SETTLED = (DISPATCHED, ENDED)

metadata = MetaData()

submissions = Table(
    "submissions",
    metadata,
    Column("id", String(200), primary_key=True),
    Column("state", String(16), nullable=False, index=True),
    Column("envelope", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("run_at", UtcDateTime),
    Column("depends_on", Text),  # JSON list of parent ids
    Column("outcome", String(16)),  # the first terminal status heard of
    Column("error_type", String(200)),
    Column("error_message", Text),  # why a task ended without running (dependency)
    Column("ended_at", UtcDateTime),  # when `outcome` was recorded; retention counts from it
    # An AMQP submission without an id: a digest of its delivery, kept until its ack is
    # recorded, so a redelivery after a crash finds the task its first delivery made.
    Column("intake_key", String(64)),
    # The submitting API token's id (a digest, never the token): who may cancel it.
    Column("owner", String(64)),
)
# The releaser's query: delayed rows by due time.
Index("ix_submissions_state_run_at", submissions.c.state, submissions.c.run_at)
# A redelivery's lookup; partial: rows with an id (nearly all) cost no index entry.
Index(
    "ix_submissions_intake_key",
    submissions.c.intake_key,
    postgresql_where=submissions.c.intake_key.is_not(None),
    sqlite_where=submissions.c.intake_key.is_not(None),
)
# Retention's scan, oldest ending first (the id breaks ties: a batch of outcomes shares
# one time); partial: rows not ended cost no index entry.
Index(
    "ix_submissions_ended_at_id",
    submissions.c.ended_at,
    submissions.c.id,
    postgresql_where=submissions.c.ended_at.is_not(None),
    sqlite_where=submissions.c.ended_at.is_not(None),
)

edges = Table(
    "edges",
    metadata,
    Column("parent", String(200), primary_key=True),
    Column("child", String(200), primary_key=True),
    Index("ix_edges_child", "child"),
)

kinds = Table(
    "kinds",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("first_seen", DateTime(timezone=True), nullable=False),
)

# Pools workers announced, and requirement sets tasks were admitted with (by routing
# key): each has queues of its own, so both are bounded, and remembered across restarts.
pools = Table(
    "pools",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("first_seen", DateTime(timezone=True), nullable=False),
)

requirement_sets = Table(
    "requirement_sets",
    metadata,
    Column("key", String(200), primary_key=True),
    Column("first_seen", DateTime(timezone=True), nullable=False),
)
