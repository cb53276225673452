"""The worker: consume one pool's work queue with prefetch = concurrency, run each
task's handler, publish its outcome, and only then ack.

Ack timing: a delivery is acked only after its result (or, for a failure with
retries left, the retry message and its `task.retrying` event) is confirmed by
the broker. If the worker dies first, the broker requeues the delivery and
another worker runs it again (at-least-once); the tracker records one result.

Sessions: the worker works in *sessions*, one AMQP connection each, named after
its registration id. When a session's connection is lost its deliveries are
void (the broker requeued them), so in-flight attempts are cancelled and a new
session starts, under a new registration id ``<id>~<n>``: the tracker may have
fenced the old one (closed its connection because it stopped heartbeating, and
written its attempts off) even when the close frame saying so never arrived (a
partition, or a connection reset that discards it). Only a loss the worker can
prove was not a fence keeps the id: a close frame from the broker
(``CONNECTION_FORCED``, e.g. a broker restart) without the ``leveret-fenced`` marker.

Graceful hand-back: on a graceful stop, a delivery that waits for a slot, or whose
attempt outlives the grace period, is given back by publishing a copy (confirmed)
straight to the queue it came from and acking the original, not by a requeue: a
quorum queue counts a requeue as a delivery, so four rolling restarts during one
long task would otherwise dead-letter it as poison. A returned attempt is
announced as ``task.returned`` and spends no retry (``TaskMessage.returned``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import socket
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from loguru import logger
from pydantic import ValidationError

from leveret import __version__
from leveret.amqp import (
    BROKER_EXCEPTIONS,
    UNCONFIRMED,
    Outgoing,
    connect,
    delivery_count,
    json_message,
    map_broker_errors,
    open_channel,
    publish_all,
    return_to_queue,
)
from leveret.contracts import (
    FENCED_MARKER,
    MAX_EVENT_BYTES,
    CancelTask,
    RequirementsDeclared,
    StartedTask,
    TaskMessage,
    TaskResult,
    TaskRetrying,
    TaskReturned,
    TaskStatus,
    WorkerHeartbeat,
    WorkerInfo,
    WorkerStarted,
    WorkerStopped,
    decode_event,
    utcnow,
)
from leveret.errors import ConfigError, UnavailableError
from leveret.handlers import Registry, TaskContext
from leveret.roles import RefusedSenders, sender_of
from leveret.settings import WorkerSettings
from leveret.topology import (
    RK_SCHEDULER_STARTED,
    RK_TASK_RETRYING,
    RK_TASK_RETURNED,
    RK_WORKER_HEARTBEAT,
    RK_WORKER_STARTED,
    RK_WORKER_STOPPED,
    Band,
    DeclaredTopology,
    band_of,
    requirement_key,
    result_routing_key,
)
from leveret.worker.cancels import CancelledIds
from leveret.worker.execution import (
    Executor,
    Outcome,
    result_message,
    retry_delay_s,
    task_error,
)
from leveret.worker.gate import BandGate
from leveret.worker.limits import StartPacer, kind_limits
from leveret.worker.reports import Reports, bounded_heartbeat


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


class Worker:
    """One worker process: sessions, in-flight tasks and counters."""

    def __init__(self, settings: WorkerSettings, registry: Registry) -> None:
        self.settings = settings
        self.registry = registry
        self.base_id = settings.worker_id
        self.generation = 1
        self.info = WorkerInfo(
            id=self.base_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            pool=settings.pool,
            concurrency=settings.concurrency,
            kinds=registry.kinds(),
            capabilities=settings.capabilities,
            limits=kind_limits(registry, settings),
            version=__version__,
        )
        _check_announcement(self.info)
        self.completed = 0
        self.failed = 0
        self.retried = 0
        self._executor = Executor(registry, settings.concurrency)
        self._in_flight: dict[str, asyncio.Task[Any]] = {}
        self._reports = Reports(settings.topology, settings.started_flush_ms / 1000)
        self._pacers = {
            kind: StartPacer(limit.max_starts_per_s)
            for kind, limit in self.info.limits.items()
            if limit.max_starts_per_s
        }
        self._gate = BandGate(settings.concurrency)
        self._attempts: dict[str, asyncio.Task[Outcome]] = {}
        self._cancelled = CancelledIds()  # from the cancellations stream
        self._forged = RefusedSenders()  # cancels from users not in the scheduler role
        self._holding: set[asyncio.Task[Any]] = set()  # deliveries waiting or running
        self._draining = False  # set when a graceful stop begins: take no new queues
        self._handing_back = False  # a graceful stop gives deliveries back (not a lost session)
        self._declared: DeclaredTopology | None = None
        self._rng = random.Random()

    @property
    def id(self) -> str:
        """The current registration id (also the AMQP connection name)."""
        return self.info.id

    def attempt_of(self, job: asyncio.Task[Any] | None) -> str | None:
        """The id of the task whose attempt `job` is (an asyncio task), else None."""
        if job is None:
            return None
        return next((task_id for task_id, j in self._attempts.items() if j is job), None)

    # --- life cycle ------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, *, ready: asyncio.Event | None = None) -> None:
        """Work in sessions until `stop` is set."""
        try:
            failures = 0
            while not stop.is_set():
                try:
                    with map_broker_errors():
                        end = await self._session(stop, ready)
                except UnavailableError as exc:
                    # The session could not start or went wrong on the broker's side (e.g.
                    # a restarted broker whose queues are not all back yet): back off.
                    failures += 1
                    backoff = min(0.2 * 2**failures, 5.0)
                    logger.warning(
                        "worker {} session failed ({}); retrying in {:.1f} s", self.id, exc, backoff
                    )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), backoff)
                    continue
                failures = 0
                if end is SessionEnd.STOPPED:
                    break
                if end is SessionEnd.FENCED:
                    self.generation += 1
                    new_id = f"{self.base_id}~{self.generation}"
                    logger.warning(
                        "worker {} may have been declared dead by the tracker; "
                        "re-registering as {}",
                        self.id,
                        new_id,
                    )
                    self.info = self.info.model_copy(update={"id": new_id})
        finally:
            self._executor.close()
        logger.info(
            "worker {} stopped: {} completed, {} failed, {} retried",
            self.id,
            self.completed,
            self.failed,
            self.retried,
        )

    async def _session(self, stop: asyncio.Event, ready: asyncio.Event | None) -> SessionEnd:
        s = self.settings
        connecting = asyncio.ensure_future(
            connect(s.amqp_url, self.id, robust=False, connect_timeout_s=3600, tls=s.amqp_tls)
        )
        await _first(connecting, stop.wait())
        if not connecting.done() or connecting.cancelled():
            return SessionEnd.STOPPED  # asked to stop while the broker was unreachable
        connection = connecting.result()
        lost = asyncio.Event()
        reasons: list[str] = []

        def on_close(_sender: object, exc: BaseException | None) -> None:
            reasons.append(str(exc))
            lost.set()

        connection.close_callbacks.add(on_close)
        try:
            publish_channel = await open_channel(connection)
            self._declared = await s.topology.declare(publish_channel)
            events = await connection.channel(publisher_confirms=False)
            self._reports.attach(events, publish_channel)
            await self._listen_for_schedulers(connection)
            await self._listen_for_cancellations(connection)
            await self._announce()
            async with asyncio.TaskGroup() as group:
                beats = group.create_task(self._heartbeats(), name="heartbeats")
                flusher = group.create_task(self._reports.run(lambda: self.id), name="reports")
                self._draining = self._handing_back = False
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
                await _first(stop.wait(), lost.wait())
                if lost.is_set():
                    end = self._abandon(reasons)
                else:
                    end = SessionEnd.STOPPED
                    await self._drain(consumers)
                beats.cancel()
                flusher.cancel()
            if end is SessionEnd.STOPPED:
                await self._reports.publish(RK_WORKER_STOPPED, WorkerStopped(worker=self.id))
            return end
        finally:
            connection.close_callbacks.discard(on_close)
            with contextlib.suppress(*BROKER_EXCEPTIONS):
                await connection.close()

    async def _consume(self, connection: AbstractRobustConnection) -> list[tuple[Any, str]]:
        """Consume the pool's three band queues and the queues of limited kinds."""
        assert self._declared is not None
        s = self.settings
        consumers = []
        bands = await self._declared.declare_pool(s.pool)
        for band, queue in bands.items():
            # One channel per band: its own prefetch, so high work is never stuck
            # behind a full window of low work.
            channel = await open_channel(connection, prefetch=s.concurrency)
            band_queue = await channel.get_queue(queue.name)
            on_band = functools.partial(self.on_message, queue.name, band, None)
            tag = await band_queue.consume(on_band)
            consumers.append((band_queue, tag))
        for kind, limit in self.info.limits.items():
            queue = await self._declared.declare_limited(s.pool, kind)
            # The broker lets one worker at a time consume this queue; its prefetch is
            # the cluster-wide cap on attempts of the kind running at once.
            channel = await open_channel(connection, prefetch=limit.max_running or s.concurrency)
            limited = await channel.get_queue(queue.name)
            on_message = functools.partial(
                self.on_message, queue.name, Band.NORMAL, self._pacers.get(kind)
            )
            consumers.append((limited, await limited.consume(on_message)))
        return consumers

    async def _follow_requirements(
        self, connection: AbstractRobustConnection, consumers: list[tuple[Any, str]]
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
                if wanted and key not in joined and not self._draining:
                    await self._join_set(record, joined, key, work, consumers)
            await message.ack()

        await stream.consume(on_record, arguments={"x-stream-offset": "first"})

    async def _join_set(
        self,
        record: RequirementsDeclared,
        joined: set[str],
        key: str,
        work: AbstractChannel,
        consumers: list[tuple[Any, str]],
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
        on_set = functools.partial(self.on_message, queue.name, None, None)
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

    def _abandon(self, reasons: list[str]) -> SessionEnd:
        """The connection is gone: its deliveries were requeued, so stop their attempts.
        Unless the loss provably was not a fence, the next session takes a new id."""
        reason = "; ".join(reasons) or "connection lost"
        logger.warning(
            "worker {} lost its connection ({}); abandoning {} in-flight tasks",
            self.id,
            reason,
            len(self._in_flight),
        )
        self._handing_back = False  # the broker has them back already
        for task in self._holding:
            task.cancel()
        return SessionEnd.LOST if provably_not_fenced(reasons) else SessionEnd.FENCED

    async def _drain(self, consumers: list[tuple[Any, str]]) -> None:
        """Stop taking work; let running tasks finish within the grace period and give
        back at once what waits for a slot."""
        self._draining = self._handing_back = True
        for queue, tag in consumers:
            await queue.cancel(tag)
        running = set(self._in_flight.values())
        waiting = [t for t in self._holding if t not in running]
        for t in waiting:
            t.cancel()
        if waiting:
            await asyncio.wait(waiting)
        pending = list(running)
        logger.info("worker stopping: {} tasks in flight", len(pending))
        if pending:
            _, late = await asyncio.wait(pending, timeout=self.settings.grace_period_s)
            for t in late:
                t.cancel()  # on_message hands the delivery back to its queue
            if late:
                await asyncio.wait(late)
                logger.warning("returned {} unfinished tasks to the queue", len(late))

    async def _listen_for_schedulers(self, connection: AbstractRobustConnection) -> None:
        """Announce again whenever a scheduler starts, so it learns this worker's kinds."""
        channel = await connection.channel(publisher_confirms=False)
        exchange = await channel.get_exchange(self.settings.topology.events_exchange)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, RK_SCHEDULER_STARTED)

        async def on_event(message: AbstractIncomingMessage) -> None:
            await self._announce()

        await queue.consume(on_event, no_ack=True)

    async def _announce(self) -> None:
        await self._reports.publish(RK_WORKER_STARTED, WorkerStarted(worker=self.info))

    async def _heartbeats(self) -> None:
        while True:
            beat = WorkerHeartbeat(
                worker=self.info,
                in_flight=list(self._in_flight),
                completed=self.completed,
                failed=self.failed,
            )
            await self._reports.publish(RK_WORKER_HEARTBEAT, bounded_heartbeat(beat))
            await asyncio.sleep(self.settings.heartbeat_interval_s)

    # --- one delivery ----------------------------------------------------------------------

    async def on_message(
        self,
        queue: str,
        band: Band | None,
        pacer: StartPacer | None,
        message: AbstractIncomingMessage,
    ) -> None:
        """Wait for a slot (by band weight; and for the kind's start rate if limited),
        run one attempt, and settle the delivery once its outcome is confirmed. A
        delivery from a queue without a band (a requirement set's) takes its task's.
        `queue` is the queue it came from (where a graceful stop hands it back)."""
        try:
            task = TaskMessage.model_validate_json(message.body)
        except ValidationError as exc:
            logger.error("undecodable work message {} dead-lettered: {}", message.message_id, exc)
            await message.reject(requeue=False)
            return
        if band is None:
            band = band_of(task.priority)
        current = asyncio.current_task()
        assert current is not None
        self._holding.add(current)
        try:
            try:
                if pacer is not None:
                    await pacer.wait()
                await self._gate.enter(band)
            except asyncio.CancelledError:
                await self._give_back(task, message, queue, None)
                raise
            try:
                await self._run(task, message, queue)
            finally:
                self._gate.leave()
        finally:
            self._holding.discard(current)

    async def _run(self, task: TaskMessage, message: AbstractIncomingMessage, queue: str) -> None:
        attempt = task.attempt_offset + delivery_count(message) + 1
        current = asyncio.current_task()
        assert current is not None
        self._in_flight[task.id] = current
        started_at = utcnow()
        self._reports.started(StartedTask(id=task.id, attempt=attempt, started_at=started_at))
        try:
            with logger.contextualize(task_id=task.id, attempt=attempt, worker=self.id):
                outcome = await self._attempt_unless_cancelled(task, attempt)
                await self._settle(task, attempt, started_at, outcome, message)
        except asyncio.CancelledError:
            await self._give_back(task, message, queue, (attempt, started_at))
            raise
        except UNCONFIRMED as exc:
            logger.warning("outcome of task {} not confirmed ({}); returning it", task.id, exc)
            await return_to_queue(message)
        finally:
            self._in_flight.pop(task.id, None)
            self._reports.finished(task.id)

    async def _give_back(
        self,
        task: TaskMessage,
        message: AbstractIncomingMessage,
        queue: str,
        ran: tuple[int, datetime] | None,
    ) -> None:
        """Return a delivery whose attempt was stopped (or never began, `ran` None).

        On a graceful stop a copy goes (confirmed) straight to `queue` and the original
        is acked, so the quorum queue's delivery count, the poison budget, is not spent;
        an attempt that began is announced `task.returned`. After a lost connection the
        broker has requeued it already; otherwise (or if the copy is not confirmed) it is
        requeued the plain way."""
        if not self._handing_back or self._declared is None:
            await return_to_queue(message)
            return
        earlier = task.attempt_offset + delivery_count(message)
        items: list[Outgoing] = []
        if ran is None:
            again = task.model_copy(update={"attempt_offset": earlier})
        else:
            attempt, started_at = ran
            again = task.model_copy(
                update={"attempt_offset": attempt, "returned": task.returned + 1}
            )
            grace = self.settings.grace_period_s
            event = TaskReturned(
                id=task.id,
                attempt=attempt,
                worker=self.id,
                reason=f"returned by a graceful stop of {self.id} (grace period {grace:g} s)",
                started_at=started_at,
            )
            topo = self.settings.topology
            items.append(
                Outgoing(
                    self._declared.exchange(topo.events_exchange),
                    RK_TASK_RETURNED,
                    json_message(event),
                )
            )
        copy = json_message(again, message_id=task.id, correlation_id=task.correlation_id)
        items.insert(0, Outgoing(self._declared.channel.default_exchange, queue, copy))
        try:
            await publish_all(items)
        except UNCONFIRMED as exc:
            logger.warning("task {} not handed back ({}); requeued instead", task.id, exc)
            await return_to_queue(message)
            return
        try:
            await message.ack()
        except BROKER_EXCEPTIONS as exc:  # the copy is queued: at worst the task runs twice
            logger.warning("task {} handed back, but its ack was not sent: {}", task.id, exc)
        logger.info("task {} handed back to {}", task.id, queue)

    async def _attempt_unless_cancelled(self, task: TaskMessage, attempt: int) -> Outcome:
        """Run the attempt as its own task, so a `task.cancel` can stop just the attempt
        (its delivery is then settled as `cancelled`, not returned to the queue)."""
        reason = self._cancelled.get(task.id)
        if reason is not None:
            return Outcome(TaskStatus.CANCELLED, None, task_error("cancelled", reason))
        job = asyncio.create_task(self._attempt(task, attempt), name=f"attempt:{task.id}")
        self._attempts[task.id] = job
        try:
            return await job
        except asyncio.CancelledError:
            current = asyncio.current_task()
            reason = self._cancelled.get(task.id)
            if reason is None or (current is not None and current.cancelling()):
                raise  # the worker is stopping or lost its connection: not a cancellation
            logger.info("task {} cancelled while running: {}", task.id, reason)
            return Outcome(TaskStatus.CANCELLED, None, task_error("cancelled", reason))
        finally:
            self._attempts.pop(task.id, None)

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
            self._cancel(command)
        else:
            self._forged.refused(command.type, sender_of(message), message.message_id)

    def _cancel(self, command: CancelTask) -> None:
        self._cancelled.add(command.id, command.reason, command.at)
        job = self._attempts.get(command.id)
        if job is not None:
            job.cancel()

    async def _attempt(self, task: TaskMessage, attempt: int) -> Outcome:
        handler = self.registry.get(task.kind)
        ctx = TaskContext(
            task_id=task.id,
            kind=task.kind,
            pool=task.pool,
            attempt=attempt,
            worker_id=self.id,
            submitted_at=task.submitted_at,
            timeout_s=task.timeout_s or (handler.timeout_s if handler else None),
            reporter=self._reports.reporter(
                task, attempt, self.id, lambda: task.id in self._in_flight
            ),
        )
        logger.debug("task {} attempt {} started ({})", task.id, attempt, task.kind)
        return await self._executor.run(task, ctx)

    async def _settle(
        self,
        task: TaskMessage,
        attempt: int,
        started_at: Any,
        outcome: Outcome,
        message: AbstractIncomingMessage,
    ) -> None:
        handler = self.registry.get(task.kind)
        retry = retry_delay_s(task, handler, attempt, outcome, self._rng)
        if retry is not None and outcome.error is not None:
            step, delay = retry
            # Back to the same work queue it came from (band or limited-kind queue).
            key = message.routing_key or task.pool
            await self._retry_later(task, attempt, started_at, outcome, (step, delay), key)
            await message.ack()
            self.retried += 1
            logger.info(
                "task {} attempt {} failed ({}); retrying in {:.2f} s",
                task.id,
                attempt,
                outcome.error.type,
                delay,
            )
            return
        result, body = self._result(task, attempt, started_at, outcome)
        await self._deliver(task, result, body)
        await message.ack()
        if result.status == TaskStatus.COMPLETED:
            self.completed += 1
            logger.debug("task {} completed", task.id)
        else:
            self.failed += 1
            err = result.error
            logger.info(
                "task {} {}: {}: {}", task.id, result.status, err and err.type, err and err.message
            )

    async def _retry_later(
        self,
        task: TaskMessage,
        attempt: int,
        started_at: Any,
        outcome: Outcome,
        backoff: tuple[int, float],
        routing_key: str,
    ) -> None:
        """Park the task in the broker for the drawn delay; announce `retrying`."""
        step, delay = backoff
        assert self._declared is not None and outcome.error is not None
        topo = self.settings.topology
        again = task.model_copy(update={"attempt_offset": attempt})
        parked = json_message(again, message_id=task.id, correlation_id=task.correlation_id)
        parked.expiration = timedelta(seconds=delay)
        event = TaskRetrying(
            id=task.id,
            attempt=attempt,
            worker=self.id,
            error=outcome.error,
            started_at=started_at,
            retry_in_s=delay,
            retry_at=utcnow() + timedelta(seconds=delay),
        )
        await publish_all(
            [
                Outgoing(await self._declared.declare_retry(step), routing_key, parked),
                Outgoing(
                    self._declared.exchange(topo.events_exchange),
                    RK_TASK_RETRYING,
                    json_message(event),
                ),
            ]
        )

    def _result(
        self, task: TaskMessage, attempt: int, started_at: Any, outcome: Outcome
    ) -> tuple[TaskResult, bytes]:
        """The attempt's result and its message body, within `max_result_bytes`."""
        fields: dict[str, Any] = {
            "id": task.id,
            "kind": task.kind,
            "pool": task.pool,
            "attempt": attempt,
            "worker": self.id,
            "submitted_at": task.submitted_at,
            "started_at": started_at,
        }
        return result_message(fields, outcome, self.settings.max_result_bytes)

    async def _deliver(self, task: TaskMessage, result: TaskResult, body: bytes) -> None:
        """Publish the result (confirmed). The producer's `reply_to` gets its one terminal
        reply from the tracker, for the outcome it records: a task that ran twice (a
        crash window, a frozen worker that woke) must not answer twice."""
        assert self._declared is not None
        topo = self.settings.topology
        corr = task.correlation_id or task.id
        exchange = self._declared.exchange(topo.results_exchange)
        await publish_all(
            [
                Outgoing(
                    exchange,
                    result_routing_key(result.status, task.pool, task.kind),
                    json_message(body, correlation_id=corr),
                )
            ]
        )


def _check_announcement(info: WorkerInfo) -> None:
    """Refuse to start a worker whose announcement (kinds, capabilities, limits) would
    leave a heartbeat too little room under MAX_EVENT_BYTES."""
    size = len(WorkerStarted(worker=info).model_dump_json())
    if size > MAX_EVENT_BYTES // 2:
        raise ConfigError(
            f"this worker's announcement would be {size} bytes (its kinds, capabilities "
            f"and limits); it must stay under {MAX_EVENT_BYTES // 2}"
        )


async def _first(*aws: Any) -> None:
    """Wait until the first of several awaitables finishes; cancel the others."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
