"""What a worker tells others besides results: events, `running` notices, progress.

All of it is fire-and-forget on a channel without confirms: losing one report is
harmless (the next heartbeat, notice or result supersedes it), and nothing here
may slow a task down. Notices and progress are coalesced per interval.

Every event is held to ``MAX_EVENT_BYTES``: `task.started` notices go out in chunks,
a heartbeat lists as many in-flight ids as fit, a progress message is cut (marked)
at 1000 characters, and anything still too big is logged and not sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aio_pika.abc import AbstractChannel
from loguru import logger
from pydantic import BaseModel

from leveret.amqp import BROKER_EXCEPTIONS, json_message, send_reply, stamp_sender
from leveret.batching import chunks
from leveret.contracts import (
    MAX_EVENT_BYTES,
    REPLY_PROGRESS,
    StartedTask,
    TaskMessage,
    TaskProgress,
    TasksStarted,
    WorkerHeartbeat,
)
from leveret.handlers import MAX_PROGRESS_MESSAGE_CHARS, ProgressReporter, clip
from leveret.topology import RK_TASK_PROGRESS, RK_TASKS_STARTED, Topology

#: Attempts in one `task.started` event: at most ~270 bytes each (a 200-character id),
#: so a full event stays far below MAX_EVENT_BYTES.
STARTED_PER_EVENT = 100


def encoded(event: BaseModel) -> bytes | None:
    """The event's JSON body, or None (logged) if it is over MAX_EVENT_BYTES."""
    body = event.model_dump_json().encode()
    if len(body) > MAX_EVENT_BYTES:
        logger.error(
            "{} not sent: {} bytes, over the limit of {}",
            getattr(event, "type", type(event).__name__),
            len(body),
            MAX_EVENT_BYTES,
        )
        return None
    return body


def bounded_heartbeat(beat: WorkerHeartbeat) -> WorkerHeartbeat:
    """The heartbeat with as many of its in-flight ids as fit in MAX_EVENT_BYTES
    (all of them unless the worker runs hundreds of tasks with long ids)."""
    size = len(beat.model_dump_json())
    if size <= MAX_EVENT_BYTES:
        return beat
    room = MAX_EVENT_BYTES - len(beat.model_copy(update={"in_flight": []}).model_dump_json())
    kept: list[str] = []
    for task_id in beat.in_flight:
        room -= len(task_id) + 3  # quotes and a comma
        if room < 0:
            break
        kept.append(task_id)
    return beat.model_copy(update={"in_flight": kept})


class Reports:
    """Publishes events for one worker; `attach` it to each new session's channels."""

    def __init__(self, topology: Topology, interval_s: float) -> None:
        self.topology = topology
        self.interval_s = interval_s
        self._events: AbstractChannel | None = None
        self._replies: AbstractChannel | None = None
        self._unreported: dict[str, StartedTask] = {}
        self._progress: dict[str, tuple[TaskMessage, TaskProgress]] = {}

    def attach(self, events: AbstractChannel, replies: AbstractChannel) -> None:
        """Use this session's channels (events without confirms; replies any)."""
        self._events, self._replies = events, replies

    async def publish(self, routing_key: str, event: BaseModel) -> None:
        """Publish an event on the events exchange; a failure is logged, not raised."""
        if self._events is None:
            return
        body = encoded(event)
        if body is None:
            return
        try:
            exchange = await self._events.get_exchange(self.topology.events_exchange, ensure=False)
            message = stamp_sender(exchange, json_message(body, persistent=False))
            await exchange.publish(message, routing_key)
        except BROKER_EXCEPTIONS as exc:
            logger.warning("event {} not sent: {}", routing_key, exc)

    def started(self, item: StartedTask) -> None:
        """An attempt began: announce it at the next flush if it is still running then."""
        self._unreported[item.id] = item

    def finished(self, task_id: str) -> None:
        """An attempt ended: its result carries `started_at`; drop what is pending."""
        self._unreported.pop(task_id, None)
        self._progress.pop(task_id, None)

    def reporter(
        self, task: TaskMessage, attempt: int, worker: str, running: Callable[[], bool]
    ) -> ProgressReporter:
        """The `ctx.progress` of one attempt; reports after it ended are dropped."""

        def report(fraction: float | None, message: str | None) -> None:
            if running():
                text = clip(message, MAX_PROGRESS_MESSAGE_CHARS) if message else message
                event = TaskProgress(
                    id=task.id, attempt=attempt, worker=worker, fraction=fraction, message=text
                )
                self._progress[task.id] = (task, event)

        return report

    async def run(self, worker: Callable[[], str]) -> None:
        """Every interval: one `task.started` for attempts still running, and the
        latest progress of each attempt that reported some."""
        while True:
            await asyncio.sleep(self.interval_s)
            if self._unreported:
                batch, self._unreported = list(self._unreported.values()), {}
                for part in chunks(batch, STARTED_PER_EVENT):
                    notice = TasksStarted(worker=worker(), tasks=list(part))
                    await self.publish(RK_TASKS_STARTED, notice)
            if self._progress:
                reports, self._progress = list(self._progress.values()), {}
                for task, event in reports:
                    await self._relay_progress(task, event)

    async def _relay_progress(self, task: TaskMessage, event: TaskProgress) -> None:
        await self.publish(RK_TASK_PROGRESS, event)
        body = encoded(event)
        if task.reply_to and self._replies is not None and body is not None:
            reply = json_message(
                body,
                persistent=False,
                correlation_id=task.correlation_id or task.id,
                type_=REPLY_PROGRESS,
            )
            await send_reply(self._replies, task.reply_to, reply)
