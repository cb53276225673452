"""One session of a worker: one AMQP connection, from connect to drain or loss.

A session declares the topology on its publishing channel, announces the worker,
consumes the pool's band queues (one channel each, with its own prefetch), the
queues of limited kinds and of the requirement sets the worker can serve, follows
the cancellations stream, heartbeats, and ends in one of three ways
(:class:`SessionEnd`): a graceful stop drains it (running attempts get the grace
period, the rest is handed back), a lost connection abandons it (the broker has
requeued its deliveries already), and a loss that may have been a fence makes the
next session register under a new id. What runs meanwhile is in the worker's one
in-flight registry (:mod:`leveret.worker.inflight`), which this module reads.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from enum import Enum
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from loguru import logger
from pydantic import ValidationError

from leveret.amqp import open_channel
from leveret.contracts import (
    FENCED_MARKER,
    CancelTask,
    RequirementsDeclared,
    WorkerHeartbeat,
    WorkerInfo,
    WorkerStarted,
    WorkerStopped,
    decode_event,
)
from leveret.roles import RefusedSenders, sender_of
from leveret.settings import WorkerSettings
from leveret.topology import (
    RK_SCHEDULER_STARTED,
    RK_WORKER_HEARTBEAT,
    RK_WORKER_STARTED,
    RK_WORKER_STOPPED,
    Band,
    DeclaredTopology,
    requirement_key,
)
from leveret.worker.delivery import Deliveries
from leveret.worker.limits import StartPacer
from leveret.worker.reports import Reports, bounded_heartbeat

#: A consumer to cancel on a drain: the queue and its consumer tag.
Consumer = tuple[Any, str]


class SessionEnd(Enum):
    """Why a session ended."""

    STOPPED = "stopped"  # graceful stop requested
    LOST = "lost"  # the connection dropped (broker restart, network)
    FENCED = "fenced"  # the tracker declared this registration dead, or may have


def provably_not_fenced(reasons: list[str]) -> bool:
    """True when every reason the connection gave for closing is a close frame from the
    broker (``CONNECTION_FORCED``, e.g. a broker restart) that is not a fence: only then
    may the worker keep its registration id. A reset, a missed AMQP heartbeat or a
    failed write proves nothing: the tracker may have fenced the id meanwhile."""
    return bool(reasons) and all(
        "CONNECTION_FORCED" in r and FENCED_MARKER not in r for r in reasons
    )


class Session:
    """The work of one connection, for the worker described by `info`."""

    def __init__(
        self,
        settings: WorkerSettings,
        info: WorkerInfo,
        deliveries: Deliveries,
        reports: Reports,
        pacers: dict[str, StartPacer],
        forged: RefusedSenders,
    ) -> None:
        self.settings = settings
        self.info = info
        self.deliveries = deliveries
        self.reports = reports
        self.pacers = pacers
        self.forged = forged  # cancels from users not in the scheduler role
        self.draining = False  # set when a graceful stop begins: take no new queues
        self._declared: DeclaredTopology | None = None

    @property
    def id(self) -> str:
        """The registration id of this session (also the AMQP connection name)."""
        return self.info.id

    async def run(
        self,
        connection: AbstractRobustConnection,
        stop: Callable[[], Awaitable[Any]],
        lost: asyncio.Event,
        reasons: list[str],
        ready: asyncio.Event | None,
    ) -> SessionEnd:
        """Work on `connection` until `stop` returns or the connection is `lost`."""
        s = self.settings
        publish_channel = await open_channel(connection)
        self._declared = await s.topology.declare(publish_channel)
        events = await connection.channel(publisher_confirms=False)
        self.reports.attach(events, publish_channel)
        await self._listen_for_schedulers(connection)
        await self._listen_for_cancellations(connection)
        await self.announce()
        async with asyncio.TaskGroup() as group:
            beats = group.create_task(self._heartbeats(), name="heartbeats")
            flusher = group.create_task(self.reports.run(lambda: self.id), name="reports")
            self.deliveries.attach(self._declared)
            consumers = await self._consume(connection)
            await self._follow_requirements(connection, consumers)
            logger.info(
                "worker {} ready: pool {}, concurrency {}, kinds {}, capabilities {}",
                self.id,
                s.pool,
                s.concurrency,
                ",".join(self.info.kinds),
                ",".join(self.info.capabilities) or "-",
            )
            if ready is not None:
                ready.set()
            await first(stop(), lost.wait())
            if lost.is_set():
                end = self._abandon(reasons)
            else:
                end = SessionEnd.STOPPED
                await self._drain(consumers)
            beats.cancel()
            flusher.cancel()
        if end is SessionEnd.STOPPED:
            await self.reports.publish(RK_WORKER_STOPPED, WorkerStopped(worker=self.id))
        return end

    # --- consumers -------------------------------------------------------------------------

    async def _consume(self, connection: AbstractRobustConnection) -> list[Consumer]:
        """Consume the pool's three band queues and the queues of limited kinds."""
        assert self._declared is not None
        s = self.settings
        on_message = self.deliveries.on_message
        consumers = []
        bands = await self._declared.declare_pool(s.pool)
        for band, queue in bands.items():
            # One channel per band: its own prefetch, so high work is never stuck
            # behind a full window of low work.
            channel = await open_channel(connection, prefetch=s.concurrency)
            band_queue = await channel.get_queue(queue.name)
            on_band = functools.partial(on_message, queue.name, band, None)
            consumers.append((band_queue, await band_queue.consume(on_band)))
        for kind, limit in self.info.limits.items():
            queue = await self._declared.declare_limited(s.pool, kind)
            # The broker lets one worker at a time consume this queue; its prefetch is
            # the cluster-wide cap on attempts of the kind running at once.
            channel = await open_channel(connection, prefetch=limit.max_running or s.concurrency)
            limited = await channel.get_queue(queue.name)
            on_limited = functools.partial(
                on_message, queue.name, Band.NORMAL, self.pacers.get(kind)
            )
            consumers.append((limited, await limited.consume(on_limited)))
        return consumers

    async def _follow_requirements(
        self, connection: AbstractRobustConnection, consumers: list[Consumer]
    ) -> None:
        """Consume the queue of every requirement set of this pool whose tags this worker
        all has: those on record (the stream, read from its start) and each new one as
        the scheduler declares it. A task nobody can run waits there, unconsumed."""
        s = self.settings
        mine = set(s.capabilities)
        if not mine:
            return  # a worker without capabilities serves no requirement set
        records = await connection.channel(publisher_confirms=False)
        await records.set_qos(prefetch_count=100)  # streams need a prefetch
        stream = await records.get_queue(s.topology.requirements.name)
        work = await open_channel(connection, prefetch=s.concurrency)
        joined: set[str] = set()

        async def on_record(message: AbstractIncomingMessage) -> None:
            try:
                record = RequirementsDeclared.model_validate_json(message.body)
            except ValidationError as exc:
                logger.warning("ignoring a malformed requirements record: {}", exc)
            else:
                key = requirement_key(record.pool, record.requires)
                wanted = record.pool == s.pool and mine.issuperset(record.requires)
                if wanted and key not in joined and not self.draining:
                    await self._join_set(record, joined, key, work, consumers)
            await message.ack()

        await stream.consume(on_record, arguments={"x-stream-offset": "first"})

    async def _join_set(
        self,
        record: RequirementsDeclared,
        joined: set[str],
        key: str,
        work: AbstractChannel,
        consumers: list[Consumer],
    ) -> None:
        """Consume one requirement set's queue, unless this worker already consumes
        `max_requirement_sets` (each queue is a consumer with its own prefetch)."""
        cap = self.settings.max_requirement_sets
        if len(joined) >= cap:
            logger.debug("requirement set {} ignored: {} consumed already", key, cap)
            return
        joined.add(key)
        assert self._declared is not None
        declared = await self._declared.declare_requirement(self.settings.pool, record.requires)
        queue = await work.get_queue(declared.name)
        on_set = functools.partial(self.deliveries.on_message, queue.name, None, None)
        consumers.append((queue, await queue.consume(on_set)))
        tags = ",".join(record.requires)
        logger.info("worker {} consumes {} (requires {})", self.id, queue.name, tags)
        if len(joined) == cap:
            logger.warning(
                "worker {} consumes {} requirement sets, its limit "
                "(LEVERET_MAX_REQUIREMENT_SETS): it takes no more",
                self.id,
                cap,
            )

    # --- endings ---------------------------------------------------------------------------

    def _abandon(self, reasons: list[str]) -> SessionEnd:
        """The connection is gone: its deliveries were requeued, so stop their attempts.
        Unless the loss provably was not a fence, the next session takes a new id."""
        reason = "; ".join(reasons) or "connection lost"
        in_flight = self.deliveries.in_flight
        logger.warning(
            "worker {} lost its connection ({}); abandoning {} in-flight tasks",
            self.id,
            reason,
            len(in_flight.running_ids()),
        )
        self.deliveries.handing_back = False  # the broker has them back already
        in_flight.cancel_all()
        return SessionEnd.LOST if provably_not_fenced(reasons) else SessionEnd.FENCED

    async def _drain(self, consumers: list[Consumer]) -> None:
        """Stop taking work; let running tasks finish within the grace period and give
        back at once what waits for a slot."""
        self.draining = self.deliveries.handing_back = True
        for queue, tag in consumers:
            await queue.cancel(tag)
        in_flight = self.deliveries.in_flight
        waiting = in_flight.waiting()
        for job in waiting:
            job.cancel()
        if waiting:
            await asyncio.wait(waiting)
        pending = in_flight.jobs()
        logger.info("worker stopping: {} tasks in flight", len(pending))
        if pending:
            _, late = await asyncio.wait(pending, timeout=self.settings.grace_period_s)
            for job in late:
                job.cancel()  # the delivery hands itself back to its queue, unless it settles
            if late:
                await asyncio.wait(late)
                logger.warning("returned {} unfinished tasks to the queue", len(late))

    # --- announcements and listeners -------------------------------------------------------

    async def announce(self) -> None:
        """Tell schedulers and the tracker who this worker is (kinds, limits, capabilities)."""
        await self.reports.publish(RK_WORKER_STARTED, WorkerStarted(worker=self.info))

    async def _listen_for_schedulers(self, connection: AbstractRobustConnection) -> None:
        """Announce again whenever a scheduler starts, so it learns this worker's kinds."""
        channel = await connection.channel(publisher_confirms=False)
        exchange = await channel.get_exchange(self.settings.topology.events_exchange)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, RK_SCHEDULER_STARTED)

        async def on_event(message: AbstractIncomingMessage) -> None:
            await self.announce()

        await queue.consume(on_event, no_ack=True)

    async def _heartbeats(self) -> None:
        deliveries = self.deliveries
        while True:
            beat = WorkerHeartbeat(
                worker=self.info,
                in_flight=deliveries.in_flight.running_ids(),
                completed=deliveries.completed,
                failed=deliveries.failed,
            )
            await self.reports.publish(RK_WORKER_HEARTBEAT, bounded_heartbeat(beat))
            await asyncio.sleep(self.settings.heartbeat_interval_s)

    async def _listen_for_cancellations(self, connection: AbstractRobustConnection) -> None:
        """Read every `task.cancel` of the retention window (a stream), then follow it."""
        channel = await connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=500)  # streams need a prefetch
        stream = await channel.get_queue(self.settings.topology.cancellations.name)

        async def on_cancel(message: AbstractIncomingMessage) -> None:
            try:
                command = decode_event(message.body)
            except ValidationError as exc:
                logger.warning("ignoring a malformed cancellation: {}", exc)
            else:
                if isinstance(command, CancelTask):
                    self._cancel_if_allowed(command, message)
            await message.ack()

        await stream.consume(on_cancel, arguments={"x-stream-offset": "first"})

    def _cancel_if_allowed(self, command: CancelTask, message: AbstractIncomingMessage) -> None:
        """Act on a cancel only from a scheduler; another one stays in the stream (a
        day), where an operator can read it."""
        if self.settings.roles.may_send(command.type, sender_of(message)):
            self.deliveries.cancel(command.id, command.reason, command.at)
        else:
            self.forged.refused(command.type, sender_of(message), message.message_id)


async def first(*aws: Any) -> None:
    """Wait until the first of several awaitables finishes; cancel the others."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
