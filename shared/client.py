"""A small Python client: submit tasks over AMQP and await their results.

::

    async with Client("amqp://guest:guest@127.0.0.1:5672/") as client:
        task_id = await client.submit("echo", "hello")          # confirmed by the broker
        result = await client.run("sleep", 0.1, timeout_s=30)    # submit and wait

Results come back through RabbitMQ's direct reply-to (no queue is declared for
them). A submission is durable once :meth:`Client.submit` returns: the broker
confirmed it on the submit exchange's durable intake queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable, Sequence
from types import TracebackType

from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)
from pydantic import JsonValue, ValidationError

from leveret.amqp import Outgoing, connect, json_message, open_channel, publish_all
from leveret.contracts import REPLY_PROGRESS, SubmitTask, TaskProgress, TaskResult, new_task_id
from leveret.errors import LeveretError
from leveret.settings import DEFAULT_AMQP_URL
from leveret.tls import AmqpTls
from leveret.topology import DEFAULT_NAMESPACE, Topology

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"

#: Called with each progress report of a task submitted with ``wait=True``.
ProgressCallback = Callable[[TaskProgress], None]


class Client:
    """Submits tasks to `<namespace>.submit` and collects replies by correlation id."""

    def __init__(
        self,
        amqp_url: str = DEFAULT_AMQP_URL,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        tls: AmqpTls | None = None,
    ) -> None:
        self.amqp_url = amqp_url
        self.tls = tls  # CA and client certificate for an amqps:// URL
        self.topology = Topology(namespace)
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._waiting: dict[str, asyncio.Future[TaskResult]] = {}
        self._progress: dict[str, ProgressCallback] = {}

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect, and start listening for replies on direct reply-to."""
        name = f"leveret-client-{socket.gethostname()}-{os.getpid()}"
        self._connection = await connect(self.amqp_url, name, connect_timeout_s=10, tls=self.tls)
        self._channel = await open_channel(self._connection)
        self._exchange = await self._channel.get_exchange(self.topology.submit_exchange)
        replies = await self._channel.get_queue(DIRECT_REPLY_TO, ensure=False)
        await replies.consume(self._on_reply, no_ack=True)

    async def close(self) -> None:
        """Close the connection; pending waits are cancelled."""
        for future in self._waiting.values():
            future.cancel()
        if self._connection is not None:
            await self._connection.close()

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        key = message.correlation_id or ""
        if message.type == REPLY_PROGRESS:
            callback = self._progress.get(key)
            if callback is not None:
                with contextlib.suppress(ValidationError):
                    callback(TaskProgress.model_validate_json(message.body))
            return
        future = self._waiting.get(key)
        if future is None or future.done():
            return
        try:
            future.set_result(TaskResult.model_validate_json(message.body))
        except ValidationError as exc:
            future.set_exception(LeveretError(f"malformed reply: {exc}"))
        self._progress.pop(key, None)

    def _outgoing(self, task: SubmitTask, wait: bool) -> tuple[str, Outgoing]:
        assert self._exchange is not None, "call connect() first"
        task_id = task.id or new_task_id()
        task = task.model_copy(update={"id": task_id})
        message = json_message(
            task.model_dump_json(exclude_none=True).encode(),
            message_id=task_id,
            correlation_id=task_id,
            reply_to=DIRECT_REPLY_TO if wait else None,
        )
        return task_id, Outgoing(self._exchange, task.pool or "default", message)

    async def submit_many(
        self,
        tasks: Sequence[SubmitTask],
        *,
        wait: bool = False,
        on_progress: ProgressCallback | None = None,
    ) -> list[str]:
        """Submit tasks; return their ids once the broker confirmed every one.

        With `wait`, :meth:`result` can await each outcome, and `on_progress` (if
        given) is called with every progress report the tasks send.
        """
        pairs = [self._outgoing(t, wait) for t in tasks]
        if wait:
            loop = asyncio.get_running_loop()
            for task_id, _ in pairs:
                self._waiting.setdefault(task_id, loop.create_future())
                if on_progress is not None:
                    self._progress[task_id] = on_progress
        await publish_all([o for _, o in pairs])
        return [task_id for task_id, _ in pairs]

    async def submit(
        self,
        kind: str,
        payload: JsonValue = None,
        *,
        id: str | None = None,
        pool: str | None = None,
        timeout_s: float | None = None,
        wait: bool = False,
        on_progress: ProgressCallback | None = None,
    ) -> str:
        """Submit one task; with `wait`, :meth:`result` can then await its outcome."""
        task = SubmitTask(kind=kind, payload=payload, id=id, pool=pool, timeout_s=timeout_s)
        [task_id] = await self.submit_many([task], wait=wait, on_progress=on_progress)
        return task_id

    async def result(self, task_id: str, timeout_s: float | None = None) -> TaskResult:
        """The outcome of a task this client submitted with ``wait=True``."""
        future = self._waiting.get(task_id)
        if future is None:
            raise LeveretError(f"task {task_id} was not submitted with wait=True by this client")
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout_s)
        finally:
            if future.done():
                self._waiting.pop(task_id, None)

    async def run(
        self,
        kind: str,
        payload: JsonValue = None,
        *,
        timeout_s: float | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> TaskResult:
        """Submit a task and wait for its result."""
        task_id = await self.submit(kind, payload, wait=True, on_progress=on_progress)
        return await self.result(task_id, timeout_s)
