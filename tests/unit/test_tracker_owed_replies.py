"""The tracker's one reply per task, in its pure parts: when a reply becomes owed (in the
same step as the outcome), and what the reply says. No I/O."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from leveret.contracts import (
    REPLY_RESULT,
    AcceptedTask,
    TaskError,
    TaskResult,
    TasksAccepted,
    TaskStatus,
)
from leveret.tracker.ledger import Ledger
from leveret.tracker.replies import reply_of
from leveret.tracker.state import ReplyState, TaskRecord, apply_accepted, apply_result, owe_reply

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
NOW = T0 + timedelta(seconds=10)
REPLY_TO = "amq.rabbitmq.reply-to.abc"


def accepted(task_id: str = "t1", reply_to: str | None = REPLY_TO) -> TasksAccepted:
    item = AcceptedTask(
        id=task_id,
        kind="echo",
        pool="default",
        submitted_at=T0,
        correlation_id="corr-1",
        reply_to=reply_to,
    )
    return TasksAccepted(tasks=[item])


def result(status: str = "completed", worker: str | None = "w1", **fields: object) -> TaskResult:
    base: dict[str, object] = {
        "id": "t1",
        "kind": "echo",
        "status": status,
        "result": "from " + str(worker) if status == "completed" else None,
        "error": {"type": "boom", "message": "no"} if status == "failed" else None,
        "attempt": 1,
        "worker": worker,
        "started_at": T0 + timedelta(seconds=1),
        "finished_at": T0 + timedelta(seconds=2),
    }
    return TaskResult.model_validate({**base, **fields})


def ledger(*records: TaskRecord) -> Ledger:
    return Ledger({r.id: r for r in records}, {}, heartbeat_timeout_s=5, now=NOW)


def test_accepted_hands_over_the_reply_address_and_a_later_one_only_fills_it_in() -> None:
    pending = apply_accepted(None, accepted().tasks[0])
    assert (pending.reply_to, pending.reply) == (REPLY_TO, None)
    bare = apply_accepted(None, accepted(reply_to=None).tasks[0])
    assert apply_accepted(bare, accepted().tasks[0]).reply_to == REPLY_TO
    other = accepted(reply_to="elsewhere").tasks[0]
    assert apply_accepted(pending, other) is pending


@pytest.mark.parametrize(
    ("status", "owed"),
    [
        (TaskStatus.COMPLETED, True),
        (TaskStatus.FAILED, True),
        (TaskStatus.CANCELLED, True),
        (TaskStatus.REJECTED, False),  # the scheduler answers refusals itself
        (TaskStatus.RUNNING, False),
        (TaskStatus.PENDING, False),
    ],
)
def test_a_reply_is_owed_once_a_task_with_a_reply_address_ended(
    status: TaskStatus, owed: bool
) -> None:
    record = TaskRecord(id="t1", status=status, reply_to=REPLY_TO)
    marked = owe_reply(record, NOW)
    assert (marked.reply, marked.reply_at) == ((ReplyState.OWED, NOW) if owed else (None, None))
    assert owe_reply(replace(record, reply_to=None), NOW).reply is None
    sent = replace(record, reply=ReplyState.SENT)
    assert owe_reply(sent, NOW) is sent


def test_two_results_owe_one_reply_with_the_first_outcome() -> None:
    books = ledger()
    books.apply(accepted())
    assert books.owed_replies() == []
    books.apply(result(worker="w1"))
    books.apply(result("failed", worker="w2", attempt=2))  # the task ran twice
    [owed] = books.owed_replies()
    assert (owed.status, owed.result, owed.worker, owed.reply) == (
        TaskStatus.COMPLETED,
        "from w1",
        "w1",
        ReplyState.OWED,
    )
    # Committed as owed: the next batch's late results owe nothing new.
    again = ledger(owed)
    again.apply(result(worker="w3", attempt=3))
    assert again.owed_replies() == []
    assert [loaded.reply for loaded, _ in again.changed_tasks()] == [ReplyState.OWED]


def test_a_result_before_its_accepted_event_owes_the_reply_once_the_address_arrives() -> None:
    first = ledger()
    first.apply(result())
    assert first.owed_replies() == []
    [(_, done)] = first.changed_tasks()
    later = ledger(done)
    later.apply(accepted())
    [owed] = later.owed_replies()
    assert (owed.status, owed.reply_to, owed.correlation_id) == (
        TaskStatus.COMPLETED,
        REPLY_TO,
        "corr-1",
    )


def test_no_reply_for_duplicates_rejections_or_a_reply_already_sent() -> None:
    books = ledger()
    books.apply(accepted())
    books.apply(result("duplicate"))
    assert books.owed_replies() == []
    refused = ledger()
    refused.apply(result("rejected", worker=None))
    refused.apply(accepted())  # a known id's accepted event never ends the refusal
    assert refused.owed_replies() == []
    done = apply_result(apply_accepted(None, accepted().tasks[0]), result())
    assert done is not None
    replied = ledger(replace(done, reply=ReplyState.SENT, reply_at=NOW))
    replied.apply(result(worker="w2", attempt=2))
    replied.apply(accepted())
    assert replied.owed_replies() == []


def test_the_reply_carries_the_recorded_outcome() -> None:
    done = apply_result(apply_accepted(None, accepted().tasks[0]), result("failed"))
    assert done is not None
    message = reply_of(done)
    assert (message.correlation_id, message.message_id, message.type) == (
        "corr-1",
        "t1:result",
        REPLY_RESULT,
    )
    assert message.delivery_mode is not None and message.delivery_mode.value == 1
    body = TaskResult.model_validate_json(message.body)
    assert (body.id, body.status, body.error, body.attempt, body.worker) == (
        "t1",
        "failed",
        TaskError(type="boom", message="no"),
        1,
        "w1",
    )
    assert (body.submitted_at, body.started_at, body.finished_at) == (
        T0,
        T0 + timedelta(seconds=1),
        T0 + timedelta(seconds=2),
    )
    no_corr = replace(done, correlation_id=None)
    assert reply_of(no_corr).correlation_id == "t1"
