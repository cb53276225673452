"""The tracker answers `reply_to`: one terminal reply per task, for the outcome it records,
against a real broker, with the tracker service running in-process on SQLite and on
PostgreSQL, and end to end with real service processes. Each test declares its own
exclusive reply queue, as a producer would.

"Exactly one" is checked with a marker: a later task whose reply goes through the same
path. Replies leave the tracker in the order it records outcomes (a batch's replies are
confirmed before the next batch is applied), so once the marker's reply is in the queue,
a second reply to the first task would be there too.

Skipped when no broker answers, unless ``CI`` is set (then it fails).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractQueue, AbstractRobustConnection
from helpers import TrackerApi
from test_tracker_service import (
    Tracker,
    free_port,
    publish,
    publish_result,
    running,
    task_result,
)

from leveret.amqp import json_message, open_channel
from leveret.cli.procs import Cluster
from leveret.contracts import (
    REPLY_RESULT,
    AcceptedTask,
    StartedTask,
    TaskMessage,
    TaskResult,
    TaskReturned,
    TasksAccepted,
    TasksStarted,
    utcnow,
)
from leveret.settings import TrackerSettings
from leveret.topology import (
    RK_POISON,
    RK_TASK_RETURNED,
    RK_TASKS_ACCEPTED,
    RK_TASKS_STARTED,
    delete_namespace,
)
from leveret.tracker.state import ReplyState
from leveret.tracker.store import TrackerStore

pytestmark = pytest.mark.broker

#: A generous bound for a condition on a busy machine (not a timing claim).
DEADLINE_S = 30.0


@pytest.fixture
def settings(amqp_url: str, database_url: str) -> TrackerSettings:
    """A fresh namespace and an empty database (SQLite, then PostgreSQL)."""
    return TrackerSettings(
        amqp_url=amqp_url,
        namespace=f"t-{uuid.uuid4().hex[:8]}",
        database_url=database_url,
        host="127.0.0.1",
        port=free_port(),
        batch_wait_ms=5,
        heartbeat_timeout_s=5,
    )


@pytest.fixture
async def connection(
    amqp_url: str, request: pytest.FixtureRequest
) -> AsyncIterator[AbstractRobustConnection]:
    name = f"test-{request.node.name}"[:120]
    opened = await aio_pika.connect_robust(
        amqp_url, client_properties={"connection_name": name}, timeout=10
    )
    yield opened
    await opened.close()


@pytest.fixture
async def channel(
    connection: AbstractRobustConnection, settings: TrackerSettings
) -> AsyncIterator[AbstractChannel]:
    """A publishing channel; deletes the test's namespace at the end."""
    opened = await open_channel(connection)
    yield opened
    await delete_namespace(opened, settings.topology, [])
    await opened.close()


@pytest.fixture
async def tracker(settings: TrackerSettings, channel: AbstractChannel) -> AsyncIterator[Tracker]:
    async with running(settings) as http:
        yield Tracker(settings, http, channel)


@dataclass
class Replies:
    """The producer's side: an exclusive reply queue and every reply read from it."""

    queue: AbstractQueue
    seen: list[aio_pika.abc.AbstractIncomingMessage] = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.queue.name

    async def drain(self) -> None:
        while (message := await self.queue.get(no_ack=True, fail=False)) is not None:
            self.seen.append(message)

    def about(self, task_id: str) -> list[TaskResult]:
        bodies = [TaskResult.model_validate_json(m.body) for m in self.seen]
        return [b for b in bodies if b.id == task_id]

    async def wait_for(self, task_id: str) -> TaskResult:
        """The first reply about `task_id`, once it arrived."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE_S
        while not self.about(task_id):
            if loop.time() > deadline:
                pytest.fail(f"no reply about {task_id} within {DEADLINE_S} s")
            await asyncio.sleep(0.05)  # poll interval, not synchronisation
            await self.drain()
        return self.about(task_id)[0]


@pytest.fixture
async def replies(channel: AbstractChannel) -> Replies:
    return Replies(await channel.declare_queue(exclusive=True, auto_delete=True))


def accepted(task_id: str, reply_to: str | None, **fields: Any) -> TasksAccepted:
    item = AcceptedTask(
        id=task_id,
        kind="echo",
        pool="default",
        submitted_at=utcnow(),
        correlation_id=f"corr-{task_id}",
        reply_to=reply_to,
        **fields,
    )
    return TasksAccepted(tasks=[item])


async def announce(tracker: Tracker, event: TasksAccepted) -> None:
    await tracker.publish(tracker.topology.events_exchange, RK_TASKS_ACCEPTED, event)


async def one_reply_each(tracker: Tracker, replies: Replies, *task_ids: str) -> None:
    """After a marker task's reply arrived: exactly one reply about each of `task_ids`."""
    marker = f"marker-{uuid.uuid4().hex[:6]}"
    await announce(tracker, accepted(marker, replies.address))
    await tracker.publish_result(task_result(marker))
    await replies.wait_for(marker)
    for task_id in task_ids:
        assert len(replies.about(task_id)) == 1, [m.body for m in replies.seen]


async def test_a_task_that_ran_twice_gets_one_reply_with_the_first_result(
    tracker: Tracker, replies: Replies
) -> None:
    task_id = f"twice-{uuid.uuid4().hex[:6]}"
    await announce(tracker, accepted(task_id, replies.address))
    await tracker.publish_result(task_result(task_id, result="first", worker="w1"))
    await tracker.publish_result(task_result(task_id, result="second", attempt=2, worker="w2"))

    reply = await replies.wait_for(task_id)
    assert (reply.status, reply.result, reply.worker, reply.attempt) == (
        "completed",
        "first",
        "w1",
        1,
    )
    message = next(m for m in replies.seen if TaskResult.model_validate_json(m.body).id == task_id)
    assert (message.correlation_id, message.type, message.message_id) == (
        f"corr-{task_id}",
        REPLY_RESULT,
        f"{task_id}:result",
    )
    assert message.delivery_mode == aio_pika.DeliveryMode.NOT_PERSISTENT
    await one_reply_each(tracker, replies, task_id)
    recorded = await tracker.task_with(task_id, "completed")
    assert (recorded["result"], recorded["worker"]) == ("first", "w1")


async def test_a_result_before_its_accepted_event_is_replied_once_the_address_arrives(
    tracker: Tracker, replies: Replies
) -> None:
    task_id = f"early-{uuid.uuid4().hex[:6]}"
    await tracker.publish_result(task_result(task_id, result={"n": 1}, worker="w1"))
    await tracker.task_with(task_id, "completed")
    await replies.drain()
    assert replies.about(task_id) == []  # no address yet: nobody to answer

    await announce(tracker, accepted(task_id, replies.address))
    reply = await replies.wait_for(task_id)
    assert (reply.status, reply.result) == ("completed", {"n": 1})
    await announce(tracker, accepted(task_id, replies.address))  # redelivered: no new reply
    await one_reply_each(tracker, replies, task_id)


async def test_a_poison_dead_letter_gets_one_reply_and_a_late_result_none(
    tracker: Tracker, replies: Replies
) -> None:
    topo = tracker.topology
    task_id = f"poison-{uuid.uuid4().hex[:6]}"
    await announce(tracker, accepted(task_id, replies.address))
    work = TaskMessage(
        id=task_id,
        kind="echo",
        submitted_at=utcnow(),
        correlation_id=f"corr-{task_id}",
        reply_to=replies.address,
    )
    x_death = [{"count": 1, "reason": "delivery_limit", "queue": f"{topo.namespace}.work.default"}]
    dead = await tracker.channel.get_exchange(topo.dead_exchange)
    await dead.publish(
        json_message(work, message_id=task_id, headers={"x-death": x_death}), RK_POISON
    )

    reply = await replies.wait_for(task_id)
    assert (reply.status, reply.error and reply.error.type) == ("failed", "poison")
    assert replies.seen[0].correlation_id == f"corr-{task_id}"
    # A worker that finished it after all: recorded in the history, never replied.
    await tracker.publish_result(task_result(task_id, result="late", attempt=6, worker="w9"))
    await one_reply_each(tracker, replies, task_id)
    recorded = await tracker.task_with(task_id, "failed")
    assert recorded["error"]["type"] == "poison"


async def test_a_returned_attempt_shows_returned_and_the_task_pending_again(
    tracker: Tracker, replies: Replies
) -> None:
    topo = tracker.topology
    task_id = f"back-{uuid.uuid4().hex[:6]}"
    await announce(tracker, accepted(task_id, replies.address))
    begun = utcnow()
    first = TasksStarted(worker="w1", tasks=[StartedTask(id=task_id, attempt=1, started_at=begun)])
    await tracker.publish(topo.events_exchange, RK_TASKS_STARTED, first)
    await tracker.task_with(task_id, "running")
    handed_back = TaskReturned(
        id=task_id, attempt=1, worker="w1", reason="stopping: grace period over", started_at=begun
    )
    await tracker.publish(topo.events_exchange, RK_TASK_RETURNED, handed_back)

    pending = await tracker.task_with(task_id, "pending")
    assert pending["worker"] is None
    [attempt] = pending["attempts"]
    assert (attempt["attempt"], attempt["worker"], attempt["outcome"]) == (1, "w1", "returned")
    assert attempt["finished_at"] is not None

    second = TasksStarted(
        worker="w2", tasks=[StartedTask(id=task_id, attempt=2, started_at=utcnow())]
    )
    await tracker.publish(topo.events_exchange, RK_TASKS_STARTED, second)
    await tracker.publish_result(task_result(task_id, attempt=2, worker="w2", result="done"))
    done = await tracker.task_with(task_id, "completed")
    assert [a["outcome"] for a in done["attempts"]] == ["returned", "completed"]
    reply = await replies.wait_for(task_id)
    assert (reply.result, reply.worker) == ("done", "w2")
    await one_reply_each(tracker, replies, task_id)


async def test_a_reply_owed_when_the_tracker_died_is_sent_on_redelivery(
    settings: TrackerSettings,
    connection: AbstractRobustConnection,
    channel: AbstractChannel,
    replies: Replies,
) -> None:
    """The crash window between the commit and the send: the outcome and the owed mark
    are in the database, the reply was never published, the deliveries were never
    acked. They come back redelivered to the next tracker, which sends the reply, once,
    and marks it sent."""
    assert settings.database_url is not None
    topology = settings.topology
    await topology.declare(channel)
    task_id = f"owed-{uuid.uuid4().hex[:6]}"
    announced = accepted(task_id, replies.address)
    result = task_result(task_id, result="kept")
    await publish(channel, topology.events_exchange, RK_TASKS_ACCEPTED, announced)
    await publish_result(channel, topology, result)
    # The dead tracker: it took both deliveries and never acked them ...
    taker = await connection.channel()
    queue = await taker.get_queue(topology.tracker.name)
    taken = [await queue.get(no_ack=False, timeout=DEADLINE_S) for _ in range(2)]
    assert all(not m.redelivered for m in taken)
    await taker.close()  # back to the queue, redelivered
    # ... after committing them, reply owed.
    store = await TrackerStore.open(settings.database_url)
    try:
        applied = await store.apply([announced, result])
        assert [r.reply for r in applied.replies] == [ReplyState.OWED]
        async with running(settings) as http:
            tracker = Tracker(settings, http, channel)
            reply = await replies.wait_for(task_id)
            assert (reply.status, reply.result) == ("completed", "kept")

            async def marked() -> bool:
                record = await store.get_task(task_id)
                return record is not None and record.reply is ReplyState.SENT

            loop = asyncio.get_running_loop()
            deadline = loop.time() + DEADLINE_S
            while not await marked():
                assert loop.time() < deadline, "the reply was never marked sent"
                await asyncio.sleep(0.05)  # poll interval, not synchronisation
            await one_reply_each(tracker, replies, task_id)
        await replies.drain()
        assert len(replies.about(task_id)) == 1
    finally:
        await store.close()


async def test_a_task_the_scheduler_ends_is_replied_by_the_tracker(
    cluster: Cluster, amqp_url: str
) -> None:
    """Real processes: a child whose parent failed never runs; the scheduler publishes its
    end, and the producer's reply comes from the tracker (it carries the tracker's
    ``message_id``), once, after the tracker recorded the outcome."""
    cluster.start_tracker()
    cluster.start_scheduler()
    cluster.start_worker("w1", "--concurrency", "2")
    parent, child = (f"{n}-{uuid.uuid4().hex[:6]}" for n in ("parent", "child"))
    connection = await aio_pika.connect_robust(
        amqp_url, client_properties={"connection_name": f"test-producer-{child}"}
    )
    api = TrackerApi(cluster.tracker_url)
    try:
        channel = await open_channel(connection)
        replies = Replies(await channel.declare_queue(exclusive=True, auto_delete=True))
        submit = await channel.get_exchange(f"{cluster.namespace}.submit")
        bodies = [
            ({"id": parent, "kind": "fail", "payload": "no", "max_retries": 0}, None),
            ({"id": child, "kind": "echo", "payload": 1, "depends_on": [parent]}, "corr-child"),
        ]
        for body, corr in bodies:
            message = json_message(
                json.dumps(body).encode(),
                correlation_id=corr,
                reply_to=replies.address if corr else None,
            )
            await submit.publish(message, "default")

        reply = await replies.wait_for(child)
        assert (reply.status, reply.error and reply.error.type) == ("failed", "dependency_failed")
        [message] = [m for m in replies.seen if m.message_id == f"{child}:result"]
        assert (message.correlation_id, message.type) == ("corr-child", REPLY_RESULT)
        recorded = await api.reach(child, "failed")
        assert recorded["attempts"] == []  # it never ran
        await asyncio.to_thread(cluster.stop_all, 15)  # what the tracker held is sent
        await replies.drain()
        assert len(replies.about(child)) == 1
    finally:
        await api.close()
        await connection.close()
