"""What a worker tells others besides results: events, `running` notices, progress.

All of it is fire-and-forget on a channel without confirms: losing one report is
harmless (the next heartbeat, notice or result supersedes it), and nothing here
may slow a task down. Notices and progress are coalesced per interval.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aio_pika.abc import AbstractChannel
from loguru import logger
from pydantic import BaseModel

from leveret.amqp import BROKER_EXCEPTIONS, json_message, send_reply
from leveret.contracts import REPLY_PROGRESS, StartedTask, TaskMessage, TaskProgress, TasksStarted
from leveret.handlers import ProgressReporter
from leveret.topology import RK_TASK_PROGRESS, RK_TASKS_STARTED, Topology


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
        try:
            exchange = await self._events.get_exchange(self.topology.events_exchange, ensure=False)
            await exchange.publish(json_message(event, persistent=False), routing_key)
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
                event = TaskProgress(
                    id=task.id, attempt=attempt, worker=worker, fraction=fraction, message=message
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
                await self.publish(RK_TASKS_STARTED, TasksStarted(worker=worker(), tasks=batch))
            if self._progress:
                reports, self._progress = list(self._progress.values()), {}
                for task, event in reports:
                    await self._relay_progress(task, event)

    async def _relay_progress(self, task: TaskMessage, event: TaskProgress) -> None:
        await self.publish(RK_TASK_PROGRESS, event)
        if task.reply_to and self._replies is not None:
            reply = json_message(
                event,
                persistent=False,
                correlation_id=task.correlation_id or task.id,
                type_=REPLY_PROGRESS,
            )
            await send_reply(self._replies, task.reply_to, reply)
