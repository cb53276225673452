"""One delivery of a worker, from receipt to settlement: decode, wait for a slot, run
the attempt, publish its outcome (confirmed), ack.

The hot path is kept as short as a bare consumer's: the body is decoded once, straight
from bytes into a :class:`TaskMessage`; the attempt runs in the delivery's own asyncio
task; the outcome is one confirmed publish and one ack. The `task.started` notice is
recorded here but sent by :class:`~leveret.worker.reports.Reports` once per interval,
for the attempts still running then.

Settling is shielded from cancellation: once an outcome is being published, a drain or
a lost session that cancels the delivery waits for the publish and the ack before the
cancellation goes on. Otherwise a result the broker confirmed could lose its ack, and
the broker would hand the task to another worker for an avoidable second run.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from aio_pika.abc import AbstractExchange, AbstractIncomingMessage
from loguru import logger
from pydantic import ValidationError

from leveret.amqp import (
    BROKER_EXCEPTIONS,
    UNCONFIRMED,
    Outgoing,
    connection_user,
    delivery_count,
    json_message,
    publish_all,
    return_to_queue,
)
from leveret.contracts import (
    StartedTask,
    TaskMessage,
    TaskRetrying,
    TaskReturned,
    TaskStatus,
    utcnow,
)
from leveret.handlers import Registry, TaskContext
from leveret.settings import WorkerSettings
from leveret.topology import (
    RK_TASK_RETRYING,
    RK_TASK_RETURNED,
    Band,
    DeclaredTopology,
    band_of,
    result_routing_key,
)
from leveret.worker.cancels import CancelledIds
from leveret.worker.execution import Executor, Outcome, result_message, retry_delay_s, task_error
from leveret.worker.gate import BandGate
from leveret.worker.inflight import Held, InFlight, Phase
from leveret.worker.limits import StartPacer
from leveret.worker.reports import Reports

#: How long a result publish may wait for its confirm before the delivery is returned.
CONFIRM_TIMEOUT_S = 30.0


class Deliveries:
    """Receives, runs and settles the deliveries of one worker, across its sessions.

    Each session attaches the topology it declared on its publishing channel
    (:meth:`attach`) and sets `handing_back` when a graceful stop begins (deliveries
    are then given back by a confirmed copy, rather than a requeue that would spend the
    quorum queue's delivery count).
    """

    def __init__(
        self,
        settings: WorkerSettings,
        registry: Registry,
        reports: Reports,
        worker_id: Callable[[], str],
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.in_flight = InFlight()
        self.cancelled = CancelledIds()  # from the cancellations stream
        self.declared: DeclaredTopology | None = None
        self.handing_back = False
        self._results: AbstractExchange | None = None  # the session's results exchange
        self._sender: str | None = None  # the session's user, stamped as `user_id`
        self.completed = 0
        self.failed = 0
        self.retried = 0
        self._worker_id = worker_id
        self._reports = reports
        self._executor = Executor(registry, settings.concurrency)
        self._gate = BandGate(settings.concurrency)
        self._rng = random.Random()

    def attach(self, declared: DeclaredTopology) -> None:
        """Publish through a new session's topology; look up once per session what every
        result needs (its exchange, and the user the broker checks `user_id` against)."""
        self.declared = declared
        self.handing_back = False
        self._results = declared.exchange(self.settings.topology.results_exchange)
        self._sender = connection_user(self._results)

    def close(self) -> None:
        """Stop the handler threads and child processes."""
        self._executor.close()

    def cancel(self, task_id: str, reason: str, at: datetime) -> None:
        """A `task.cancel`: remember it, and stop the attempt if one runs now."""
        self.cancelled.add(task_id, reason, at)
        self.in_flight.cancel_attempt(task_id, reason)

    # --- receipt -----------------------------------------------------------------------

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
        job = asyncio.current_task()
        assert job is not None
        held = self.in_flight.hold(job, task.id)
        try:
            try:
                if pacer is not None:
                    await pacer.wait()
                await self._gate.enter(band_of(task.priority) if band is None else band)
            except asyncio.CancelledError:
                await self._give_back(task, message, queue, None)
                raise
            try:
                await self._run(held, task, message, queue)
            finally:
                self._gate.leave()
        finally:
            self.in_flight.release(held)

    # --- run ---------------------------------------------------------------------------

    async def _run(
        self, held: Held, task: TaskMessage, message: AbstractIncomingMessage, queue: str
    ) -> None:
        attempt = task.attempt_offset + delivery_count(message) + 1
        started_at = utcnow()
        worker = self._worker_id()
        with logger.contextualize(task_id=task.id, attempt=attempt, worker=worker):
            try:
                outcome = await self._attempt(held, task, attempt, started_at, worker)
            except asyncio.CancelledError:
                await self._give_back(task, message, queue, (attempt, started_at))
                raise
            finally:
                self._reports.finished(task.id)
            settling = asyncio.ensure_future(
                self._settle(task, attempt, started_at, outcome, message, worker)
            )
            try:
                await asyncio.shield(settling)
            except asyncio.CancelledError:
                # The outcome may be confirmed already: let its ack go out first, so the
                # broker does not hand a finished task to another worker.
                await asyncio.wait([settling])
                raise

    async def _attempt(
        self, held: Held, task: TaskMessage, attempt: int, started_at: datetime, worker: str
    ) -> Outcome:
        """Run the attempt in this delivery's task. A `task.cancel` stops it through the
        in-flight registry, which marks the delivery (`cancel_reason`) before cancelling
        its job: the attempt then ends `cancelled`, and its delivery is settled, not
        returned. Any other cancellation (a drain, a lost session) propagates."""
        reason = self.cancelled.get(task.id)
        if reason is not None:
            return Outcome(TaskStatus.CANCELLED, None, task_error("cancelled", reason))
        handler = self.registry.get(task.kind)
        ctx = TaskContext(
            task_id=task.id,
            kind=task.kind,
            pool=task.pool,
            attempt=attempt,
            worker_id=worker,
            submitted_at=task.submitted_at,
            timeout_s=task.timeout_s or (handler.timeout_s if handler else None),
            reporter=self._reports.reporter(
                task, attempt, worker, lambda: held.phase is Phase.RUNNING
            ),
        )
        self._reports.started(
            StartedTask.model_construct(id=task.id, attempt=attempt, started_at=started_at)
        )
        held.phase = Phase.RUNNING
        try:
            return await self._executor.run(task, ctx)
        except asyncio.CancelledError:
            job = held.job
            if held.cancel_reason is None or job.uncancel() > 0:
                raise  # the worker is stopping or lost its connection: not a cancellation
            logger.info("task {} cancelled while running: {}", task.id, held.cancel_reason)
            return Outcome(TaskStatus.CANCELLED, None, task_error("cancelled", held.cancel_reason))
        finally:
            held.phase = Phase.SETTLING

    # --- settle ------------------------------------------------------------------------

    async def _settle(
        self,
        task: TaskMessage,
        attempt: int,
        started_at: datetime,
        outcome: Outcome,
        message: AbstractIncomingMessage,
        worker: str,
    ) -> None:
        """Publish the outcome (confirmed), then ack; if the publish is not confirmed,
        return the delivery to its queue. Runs shielded from the delivery's cancellation."""
        try:
            handler = self.registry.get(task.kind)
            retry = retry_delay_s(task, handler, attempt, outcome, self._rng)
            if retry is not None and outcome.error is not None:
                # Back to the same work queue it came from (band or limited-kind queue).
                key = message.routing_key or task.pool
                await self._retry_later(task, attempt, started_at, outcome, retry, key, worker)
                await message.ack()
                self.retried += 1
                logger.info(
                    "task {} attempt {} failed ({}); retrying in {:.2f} s",
                    task.id,
                    attempt,
                    outcome.error.type,
                    retry[1],
                )
                return
            status = await self._deliver(task, attempt, started_at, outcome, worker)
            await message.ack()
        except UNCONFIRMED as exc:
            logger.warning("outcome of task {} not confirmed ({}); returning it", task.id, exc)
            await return_to_queue(message)
            return
        if status == TaskStatus.COMPLETED:
            self.completed += 1
        else:
            self.failed += 1

    async def _deliver(
        self, task: TaskMessage, attempt: int, started_at: datetime, outcome: Outcome, worker: str
    ) -> TaskStatus | str:
        """Publish the result (confirmed), within `max_result_bytes`; its status. The
        producer's `reply_to` gets its one terminal reply from the tracker, for the
        outcome it records: a task that ran twice (a crash window, a frozen worker that
        woke) must not answer twice."""
        assert self._results is not None
        fields: dict[str, Any] = {
            "id": task.id,
            "kind": task.kind,
            "pool": task.pool,
            "attempt": attempt,
            "worker": worker,
            "submitted_at": task.submitted_at,
            "started_at": started_at,
        }
        result, body = result_message(fields, outcome, self.settings.max_result_bytes)
        if result.status != TaskStatus.COMPLETED:
            err = result.error
            logger.info(
                "task {} {}: {}: {}", task.id, result.status, err and err.type, err and err.message
            )
        message = json_message(body, correlation_id=task.correlation_id or task.id)
        message.user_id = self._sender  # what stamp_sender sets, looked up once per session
        key = result_routing_key(result.status, task.pool, task.kind)
        await self._results.publish(message, key, mandatory=True, timeout=CONFIRM_TIMEOUT_S)
        return result.status

    async def _retry_later(
        self,
        task: TaskMessage,
        attempt: int,
        started_at: datetime,
        outcome: Outcome,
        backoff: tuple[int, float],
        routing_key: str,
        worker: str,
    ) -> None:
        """Park the task in the broker for the drawn delay; announce `retrying`."""
        step, delay = backoff
        assert self.declared is not None and outcome.error is not None
        topo = self.settings.topology
        again = task.model_copy(update={"attempt_offset": attempt})
        parked = json_message(again, message_id=task.id, correlation_id=task.correlation_id)
        parked.expiration = timedelta(seconds=delay)
        event = TaskRetrying(
            id=task.id,
            attempt=attempt,
            worker=worker,
            error=outcome.error,
            started_at=started_at,
            retry_in_s=delay,
            retry_at=utcnow() + timedelta(seconds=delay),
        )
        await publish_all(
            [
                Outgoing(await self.declared.declare_retry(step), routing_key, parked),
                Outgoing(
                    self.declared.exchange(topo.events_exchange),
                    RK_TASK_RETRYING,
                    json_message(event),
                ),
            ]
        )

    # --- hand-back ---------------------------------------------------------------------

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
        if not self.handing_back or self.declared is None:
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
            worker = self._worker_id()
            grace = self.settings.grace_period_s
            event = TaskReturned(
                id=task.id,
                attempt=attempt,
                worker=worker,
                reason=f"returned by a graceful stop of {worker} (grace period {grace:g} s)",
                started_at=started_at,
            )
            topo = self.settings.topology
            items.append(
                Outgoing(
                    self.declared.exchange(topo.events_exchange),
                    RK_TASK_RETURNED,
                    json_message(event),
                )
            )
        copy = json_message(again, message_id=task.id, correlation_id=task.correlation_id)
        items.insert(0, Outgoing(self.declared.channel.default_exchange, queue, copy))
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
