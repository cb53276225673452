"""Cancellation requests (``DELETE /tasks/{id}`` or a ``task.cancel`` on the submit
exchange): the scheduler checks it knows the task, ends it at once if it still holds
it, and broadcasts a `task.cancel`.

A held task (`delayed` or `blocked`) is ended here and now, without ever going
out: its `cancelled` result is published like a dependency failure (the row moves
to `failing`, then `ended`, so a crash in between publishes it again at the next
start), and the tasks waiting for it end with `dependency_cancelled` once the
tracker reports the outcome. It must not wait for its release: a parent may never
end, and a due time may lie beyond the cancellations stream's retention.

Every worker reads the broadcast command from the cancellations stream: a queued
task never runs (its delivery is settled `cancelled`), a running attempt is
stopped on its worker. A task that already finished is left as it is.
"""

from __future__ import annotations

from enum import StrEnum

from loguru import logger

from leveret.amqp import Outgoing, json_message, map_broker_errors, publish_all
from leveret.contracts import CancelTask, TaskStatus
from leveret.db import map_db_errors
from leveret.scheduler.dispatch import Dispatcher
from leveret.scheduler.store import ENDED, Ending, SubmissionStore
from leveret.topology import RK_TASK_CANCEL


class CancelAnswer(StrEnum):
    """What became of a cancellation request."""

    CANCELLING = "cancelling"  # broadcast; the task ends `cancelled` unless it finishes first
    UNKNOWN = "unknown"  # the scheduler never accepted this id
    FINISHED = "finished"  # it already ended; nothing to cancel


async def request_cancel(
    store: SubmissionStore, dispatcher: Dispatcher, command: CancelTask
) -> CancelAnswer:
    """Check the task, end it if it is held, and broadcast the command (confirmed).
    Raises :class:`UnavailableError` while the store or broker is in trouble."""
    with map_db_errors(), map_broker_errors():
        return await _request_cancel(store, dispatcher, command)


async def _request_cancel(
    store: SubmissionStore, dispatcher: Dispatcher, command: CancelTask
) -> CancelAnswer:
    known = (await store.lookup([command.id])).get(command.id)
    if known is None:
        return CancelAnswer.UNKNOWN
    if known.status is not None and known.status.terminal:
        return CancelAnswer.FINISHED
    await _end_if_held(store, dispatcher, command)
    # Always broadcast: a task released just now is already on its way to a worker.
    declared = dispatcher.declared
    events = declared.exchange(declared.topology.events_exchange)
    await publish_all([Outgoing(events, RK_TASK_CANCEL, json_message(command))])
    logger.bind(task_id=command.id).info("cancellation of {} requested", command.id)
    return CancelAnswer.CANCELLING


async def _end_if_held(store: SubmissionStore, dispatcher: Dispatcher, command: CancelTask) -> None:
    """End a delayed or blocked task without running it (its result published, confirmed)."""
    ending = Ending(command.id, TaskStatus.CANCELLED, "cancelled", command.reason)
    held = await store.end_held(ending)
    if held is None:
        return
    submission, state = held
    try:
        await dispatcher.end([(submission, ending)])
    except BaseException:
        await store.hold_again(command.id, state)  # the request fails; it may be sent again
        raise
    await store.mark([command.id], ENDED)
    logger.bind(task_id=command.id).info("held task {} ({}) cancelled", command.id, state)
