"""The worker: consume one pool's work queue with prefetch = concurrency, run each
task's handler, publish its result, and only then ack.

Ack timing: a delivery is acked only after its result is confirmed on the results
exchange. If the worker dies first, the broker requeues the delivery and another
worker runs it again (at-least-once); the tracker records only the first result.
Blocking (sync) handlers run in a thread pool so heartbeats keep flowing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from loguru import logger
from pydantic import JsonValue, ValidationError

from leveret import __version__
from leveret.amqp import (
    BROKER_EXCEPTIONS,
    connect,
    delivery_count,
    json_message,
    open_channel,
    send_reply,
)
from leveret.contracts import (
    StartedTask,
    TaskError,
    TaskMessage,
    TaskResult,
    TasksStarted,
    TaskStatus,
    WorkerHeartbeat,
    WorkerInfo,
    WorkerStarted,
    WorkerStopped,
    utcnow,
)
from leveret.errors import PublishError, TaskFailed
from leveret.handlers import Handler, Registry, TaskContext
from leveret.settings import WorkerSettings
from leveret.topology import (
    RK_SCHEDULER_STARTED,
    RK_TASKS_STARTED,
    RK_WORKER_HEARTBEAT,
    RK_WORKER_STARTED,
    RK_WORKER_STOPPED,
    DeclaredTopology,
    result_routing_key,
)
from leveret.worker.isolation import HandlerCrashed, ProcessPool

Outcome = tuple[TaskStatus, JsonValue, TaskError | None]


class Worker:
    """One worker process: its connection, channels, in-flight tasks and counters."""

    def __init__(self, settings: WorkerSettings, registry: Registry) -> None:
        self.settings = settings
        self.registry = registry
        self.id = settings.worker_id
        self.info = WorkerInfo(
            id=self.id,
            host=socket.gethostname(),
            pid=os.getpid(),
            pool=settings.pool,
            concurrency=settings.concurrency,
            kinds=registry.kinds(),
            version=__version__,
        )
        self.completed = 0
        self.failed = 0
        self._in_flight: dict[str, asyncio.Task[Any]] = {}
        self._unreported: dict[str, StartedTask] = {}
        self._executor = ThreadPoolExecutor(settings.concurrency, thread_name_prefix="handler")
        self._processes = ProcessPool(settings.concurrency)
        self._sendable: dict[str, bool] = {}
        self._declared: DeclaredTopology | None = None
        self._events_channel: AbstractChannel | None = None

    # --- life cycle ------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, *, ready: asyncio.Event | None = None) -> None:
        """Work until `stop` is set, then stop gracefully (see :meth:`_drain`)."""
        s = self.settings
        connection = await connect(s.amqp_url, self.id)
        try:
            publish_channel = await open_channel(connection)
            self._declared = await s.topology.declare(publish_channel)
            await self._declared.declare_pool(s.pool)
            self._events_channel = await connection.channel(publisher_confirms=False)
            work_channel = await open_channel(connection, prefetch=s.concurrency)
            queue = await work_channel.get_queue(s.topology.work(s.pool).name)
            control = await self._listen_for_schedulers(connection)
            await self._announce()
            async with asyncio.TaskGroup() as group:
                beats = group.create_task(self._heartbeats(), name="heartbeats")
                flusher = group.create_task(self._report_started(), name="started")
                tag = await queue.consume(self.on_message)
                logger.info(
                    "worker {} ready: pool {}, concurrency {}, kinds {}",
                    self.id,
                    s.pool,
                    s.concurrency,
                    ",".join(self.info.kinds),
                )
                if ready is not None:
                    ready.set()
                await stop.wait()
                await self._drain(queue, tag)
                beats.cancel()
                flusher.cancel()
            await self._publish_event(RK_WORKER_STOPPED, WorkerStopped(worker=self.id))
            await control.close()
        finally:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._processes.close()
            await connection.close()
        logger.info(
            "worker {} stopped: {} completed, {} failed", self.id, self.completed, self.failed
        )

    async def _drain(self, queue: AbstractQueue, tag: str) -> None:
        """Stop taking work; let in-flight tasks finish within the grace period."""
        await queue.cancel(tag)
        pending = list(self._in_flight.values())
        logger.info("worker stopping: {} tasks in flight", len(pending))
        if pending:
            _, late = await asyncio.wait(pending, timeout=self.settings.grace_period_s)
            for t in late:
                t.cancel()  # on_message returns the delivery to the queue
            if late:
                await asyncio.wait(late)
                logger.warning("returned {} unfinished tasks to the queue", len(late))

    async def _listen_for_schedulers(self, connection: Any) -> AbstractChannel:
        """Announce again whenever a scheduler starts, so it learns this worker's kinds."""
        channel: AbstractChannel = await connection.channel(publisher_confirms=False)
        exchange = await channel.get_exchange(self.settings.topology.events_exchange)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, RK_SCHEDULER_STARTED)

        async def on_event(message: AbstractIncomingMessage) -> None:
            await self._announce()

        await queue.consume(on_event, no_ack=True)
        return channel

    async def _announce(self) -> None:
        await self._publish_event(RK_WORKER_STARTED, WorkerStarted(worker=self.info))

    async def _heartbeats(self) -> None:
        while True:
            beat = WorkerHeartbeat(
                worker=self.info,
                in_flight=list(self._in_flight),
                completed=self.completed,
                failed=self.failed,
            )
            await self._publish_event(RK_WORKER_HEARTBEAT, beat)
            await asyncio.sleep(self.settings.heartbeat_interval_s)

    async def _report_started(self) -> None:
        """Publish `running` for tasks still in flight, in one event per interval.

        Tasks that finish before the next flush are never reported as started on
        their own: their result carries `started_at`, which saves a message per task.
        """
        interval = self.settings.started_flush_ms / 1000
        while True:
            await asyncio.sleep(interval)
            if not self._unreported:
                continue
            batch, self._unreported = list(self._unreported.values()), {}
            await self._publish_event(RK_TASKS_STARTED, TasksStarted(worker=self.id, tasks=batch))

    async def _publish_event(self, routing_key: str, event: Any) -> None:
        assert self._declared is not None and self._events_channel is not None
        try:
            exchange = await self._events_channel.get_exchange(
                self.settings.topology.events_exchange, ensure=False
            )
            await exchange.publish(json_message(event, persistent=False), routing_key)
        except BROKER_EXCEPTIONS as exc:
            logger.warning("event {} not sent: {}", routing_key, exc)

    # --- one delivery ----------------------------------------------------------------------

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        """Run one task and acknowledge it once its result is confirmed."""
        try:
            task = TaskMessage.model_validate_json(message.body)
        except ValidationError as exc:
            await self._refuse(message, exc)
            return
        attempt = delivery_count(message) + 1
        current = asyncio.current_task()
        assert current is not None
        self._in_flight[task.id] = current
        started_at = utcnow()
        self._unreported[task.id] = StartedTask(id=task.id, attempt=attempt, started_at=started_at)
        try:
            with logger.contextualize(task_id=task.id, attempt=attempt, worker=self.id):
                logger.debug("task {} started ({})", task.id, task.kind)
                status, value, error = await self._execute(task, attempt)
                result = self._result(task, attempt, started_at, status, value, error)
                await self._deliver(task, result, message)
        except asyncio.CancelledError:
            await _return_to_queue(message)
            raise
        except PublishError as exc:
            logger.warning("{}; returning task {} to the queue", exc, task.id)
            await _return_to_queue(message)
        finally:
            self._in_flight.pop(task.id, None)
            self._unreported.pop(task.id, None)

    async def _execute(self, task: TaskMessage, attempt: int) -> Outcome:
        handler = self.registry.get(task.kind)
        if handler is None:
            return _failure("unknown_kind", f"no handler for kind {task.kind!r} on {self.id}")
        ctx = TaskContext(
            task_id=task.id,
            kind=task.kind,
            pool=task.pool,
            attempt=attempt,
            worker_id=self.id,
            submitted_at=task.submitted_at,
            timeout_s=task.timeout_s,
        )
        try:
            async with asyncio.timeout(task.timeout_s) as scope:
                if handler.blocking:
                    value = await self._run_blocking(handler, ctx, task.payload)
                else:
                    value = handler.func(ctx, task.payload)
                if inspect.isawaitable(value):
                    value = await value
        except TimeoutError as exc:
            if scope.expired():
                return _failure("timeout", f"attempt exceeded timeout_s={task.timeout_s}")
            return _failure(type(exc).__name__, str(exc) or "timed out")
        except TaskFailed as exc:
            return _failure(exc.type, str(exc))
        except HandlerCrashed as exc:
            return _failure("handler_crashed", str(exc))
        except Exception as exc:  # a handler's own bug: fail the task, keep the worker
            logger.opt(exception=exc).debug("handler raised")
            return _failure(type(exc).__name__, str(exc) or repr(exc))
        return TaskStatus.COMPLETED, value, None

    async def _run_blocking(self, handler: Handler, ctx: TaskContext, payload: Any) -> Any:
        """A sync handler: in a killable child process, or a thread if it cannot be sent."""
        sendable = self._sendable.get(handler.kind)
        if sendable is None:
            sendable = self._sendable[handler.kind] = ProcessPool.picklable(handler.func)
            if not sendable:
                logger.warning("handler {} cannot run in a child process: threads", handler.kind)
        if sendable:
            return await self._processes.call(handler.func, ctx, payload)
        loop = asyncio.get_running_loop()
        call = functools.partial(handler.func, ctx, payload)
        return await loop.run_in_executor(self._executor, call)

    def _result(
        self,
        task: TaskMessage,
        attempt: int,
        started_at: datetime,
        status: TaskStatus,
        value: Any,
        error: TaskError | None,
    ) -> TaskResult:
        fields: dict[str, Any] = {
            "id": task.id,
            "kind": task.kind,
            "pool": task.pool,
            "attempt": attempt,
            "worker": self.id,
            "submitted_at": task.submitted_at,
            "started_at": started_at,
        }
        try:
            return TaskResult(status=status, result=value, error=error, **fields)
        except ValidationError:
            error = TaskError(
                type="result_not_json", message=f"handler returned {type(value).__name__}"
            )
            return TaskResult(status=TaskStatus.FAILED, error=error, **fields)

    async def _deliver(
        self, task: TaskMessage, result: TaskResult, message: AbstractIncomingMessage
    ) -> None:
        assert self._declared is not None
        topo = self.settings.topology
        corr = task.correlation_id or task.id
        body = json_message(result, correlation_id=corr)
        exchange = self._declared.exchange(topo.results_exchange)
        try:
            await exchange.publish(
                body, result_routing_key(result.status, task.pool, task.kind), mandatory=True
            )
        except BROKER_EXCEPTIONS as exc:
            # Not confirmed: leave the delivery unacked; the broker redelivers it.
            raise PublishError(f"result of {task.id} not confirmed: {exc}") from exc
        if task.reply_to:
            reply = json_message(result, persistent=False, correlation_id=corr)
            await send_reply(self._declared.channel, task.reply_to, reply)
        await message.ack()
        if result.status == TaskStatus.COMPLETED:
            self.completed += 1
            logger.debug("task {} completed", task.id)
        else:
            self.failed += 1
            error = result.error
            logger.info(
                "task {} failed: {}: {}", task.id, error and error.type, error and error.message
            )

    async def _refuse(self, message: AbstractIncomingMessage, exc: ValidationError) -> None:
        """A work message that is not a task: dead-letter it with the reason, never ack it."""
        logger.error("undecodable work message {} dead-lettered: {}", message.message_id, exc)
        await message.reject(requeue=False)


def _failure(kind: str, message: str) -> Outcome:
    return TaskStatus.FAILED, None, TaskError(type=kind, message=message[:2000])


async def _return_to_queue(message: AbstractIncomingMessage) -> None:
    # If the channel is gone the broker has requeued it already.
    with contextlib.suppress(*BROKER_EXCEPTIONS):
        await message.reject(requeue=True)
