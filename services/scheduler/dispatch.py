"""Publishing for the scheduler: work messages, `tasks.accepted` events, and the results
of tasks that end without running (a parent did not complete).

Admission, the delayed-task releaser and the dependency resolver all publish
through one :class:`Dispatcher`, so a task released later goes out exactly as one
admitted at once: its work message plus a `tasks.accepted` event (`pending`).
Every publish waits for its broker confirm, in batches.

The scheduler never sends a task's terminal reply: `tasks.accepted` hands the
producer's `reply_to` to the tracker, which answers it once, for the outcome it
records (see :mod:`leveret.tracker.replies`). Only refusals and `duplicate`
answers are replied at intake.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence, Set
from typing import Literal

from loguru import logger

from leveret.amqp import Outgoing, json_message, publish_all
from leveret.contracts import (
    AcceptedTask,
    RequirementsDeclared,
    TaskError,
    TaskMessage,
    TaskResult,
    TasksAccepted,
    utcnow,
)
from leveret.scheduler.store import Ending, Submission
from leveret.topology import (
    RK_TASKS_ACCEPTED,
    DeclaredTopology,
    band_of,
    limited_key,
    requirement_key,
    result_routing_key,
    work_key,
)

#: One `tasks.accepted` event carries at most this many tasks, and at most this many
#: bytes of JSON (half the tracker's cap on a batch event, well under a broker's
#: `max_message_size`): many `depends_on` ids make a task large.
EVENT_MAX_TASKS = 500
EVENT_MAX_BYTES = 8 * 1024 * 1024

Announced = Literal["pending", "delayed", "blocked"]


class Dispatcher:
    """Publishes on the declared topology, waiting for every confirm."""

    def __init__(self, declared: DeclaredTopology, *, limited: Set[str] = frozenset()) -> None:
        self.declared = declared
        self.limited = limited  # kinds with a cluster-wide limit (updated as workers announce)
        self._announced: set[str] = set()  # requirement sets this process has put on record

    async def send(
        self,
        dispatch: Sequence[Submission],
        held: Sequence[tuple[Submission, Announced]] = (),
    ) -> None:
        """Publish the work messages of `dispatch` and one `tasks.accepted` event per chunk
        announcing them `pending` and each of `held` with its own status."""
        if not dispatch and not held:
            return
        topo = self.declared.topology
        work = self.declared.exchange(topo.work_exchange)
        events = self.declared.exchange(topo.events_exchange)
        items: list[Outgoing] = []
        new_sets: dict[str, RequirementsDeclared] = {}
        for s in dispatch:
            t = s.message
            message = json_message(t, message_id=t.id, correlation_id=t.correlation_id or t.id)
            key = await self._route(t)
            if t.requires and key not in self._announced:
                new_sets[key] = RequirementsDeclared(pool=t.pool, requires=t.requires)
            items.append(Outgoing(work, key, message))
        stream = topo.requirements.name
        for record in new_sets.values():
            items.append(
                Outgoing(self.declared.channel.default_exchange, stream, json_message(record))
            )
        announced: list[tuple[Submission, Announced]] = [(s, "pending") for s in dispatch]
        announced += held
        for event in accepted_events([_accepted(s, status) for s, status in announced]):
            items.append(Outgoing(events, RK_TASKS_ACCEPTED, json_message(event)))
        await publish_all(items)
        self._announced.update(new_sets)
        for s, status in announced:
            logger.debug("task {} {} ({} on pool {})", s.id, status, s.message.kind, s.message.pool)

    async def _route(self, t: TaskMessage) -> str:
        """The routing key of a work message, its queue declared: the queue of its
        requirement set, else its kind's limited queue, else its pool's priority band."""
        if t.requires:
            await self.declared.declare_requirement(t.pool, t.requires)
            return requirement_key(t.pool, t.requires)
        if t.kind in self.limited:
            await self.declared.declare_limited(t.pool, t.kind)
            return limited_key(t.pool, t.kind)
        await self.declared.declare_pool(t.pool)
        return work_key(t.pool, band_of(t.priority))

    async def end(self, endings: Sequence[tuple[Submission, Ending]]) -> None:
        """Publish the result of each task that ends without running, on the results
        exchange: the tracker records it and sends the producer's one reply."""
        if not endings:
            return
        topo = self.declared.topology
        results = self.declared.exchange(topo.results_exchange)
        items: list[Outgoing] = []
        now = utcnow()
        for s, e in endings:
            t = s.message
            result = TaskResult(
                id=t.id,
                kind=t.kind,
                pool=t.pool,
                status=e.status,
                error=TaskError(type=e.error_type, message=e.message),
                submitted_at=t.submitted_at,
                finished_at=now,
            )
            corr = t.correlation_id or t.id
            key = result_routing_key(e.status.value, t.pool, t.kind)
            items.append(Outgoing(results, key, json_message(result, correlation_id=corr)))
        await publish_all(items)
        for s, e in endings:
            logger.bind(task_id=s.id).info("task {} {}: {}", s.id, e.status.value, e.message)


def accepted_events(
    tasks: Sequence[AcceptedTask],
    *,
    max_tasks: int = EVENT_MAX_TASKS,
    max_bytes: int = EVENT_MAX_BYTES,
) -> Iterator[TasksAccepted]:
    """`tasks` in order, in events of at most `max_tasks` tasks and `max_bytes` of JSON
    each (a task larger on its own goes alone)."""
    budget = max_bytes - len(TasksAccepted(tasks=[]).model_dump_json())
    chunk: list[AcceptedTask] = []
    used = 0
    for task in tasks:
        size = len(task.model_dump_json().encode()) + 1  # and its comma
        if chunk and (len(chunk) >= max_tasks or used + size > budget):
            yield TasksAccepted(tasks=chunk)
            chunk, used = [], 0
        chunk.append(task)
        used += size
    if chunk:
        yield TasksAccepted(tasks=chunk)


def _accepted(s: Submission, status: Announced) -> AcceptedTask:
    t = s.message
    return AcceptedTask(
        id=t.id,
        kind=t.kind,
        pool=t.pool,
        submitted_at=t.submitted_at,
        correlation_id=t.correlation_id,
        status=status,
        run_at=s.run_at,
        depends_on=list(s.depends_on),
        requires=list(t.requires),
        reply_to=t.reply_to,
    )
