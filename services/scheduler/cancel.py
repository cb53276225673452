"""Cancellation requests (``DELETE /tasks/{id}`` or a ``task.cancel`` on the submit
exchange): the scheduler checks it knows the task and broadcasts a `task.cancel`.

Every worker reads that command from the cancellations stream: a queued task
never runs (its delivery is settled `cancelled`), a running attempt is stopped on
its worker. A task that already finished is left as it is.
"""

from __future__ import annotations

from enum import StrEnum

from loguru import logger

from leveret.amqp import Outgoing, json_message, publish_all
from leveret.contracts import CancelTask
from leveret.scheduler.store import SubmissionStore
from leveret.topology import RK_TASK_CANCEL, DeclaredTopology


class CancelAnswer(StrEnum):
    """What became of a cancellation request."""

    CANCELLING = "cancelling"  # broadcast; the task ends `cancelled` unless it finishes first
    UNKNOWN = "unknown"  # the scheduler never accepted this id
    FINISHED = "finished"  # it already ended; nothing to cancel


async def request_cancel(
    store: SubmissionStore, declared: DeclaredTopology, command: CancelTask
) -> CancelAnswer:
    """Check the task and broadcast the command (confirmed) if it can still be cancelled."""
    known = (await store.lookup([command.id])).get(command.id)
    if known is None:
        return CancelAnswer.UNKNOWN
    if known.status is not None and known.status.terminal:
        return CancelAnswer.FINISHED
    events = declared.exchange(declared.topology.events_exchange)
    await publish_all([Outgoing(events, RK_TASK_CANCEL, json_message(command))])
    logger.bind(task_id=command.id).info("cancellation of {} requested", command.id)
    return CancelAnswer.CANCELLING
