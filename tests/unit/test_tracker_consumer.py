"""The tracker consumer's ack discipline, with fake deliveries and a fake store (no broker)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from aio_pika.abc import AbstractIncomingMessage
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from leveret.contracts import TaskResult, TaskStatus
from leveret.db import is_transient
from leveret.topology import Topology
from leveret.tracker.consumer import Consumer, Undecodable, decode
from leveret.tracker.replies import ReplySender
from leveret.tracker.state import ReplyState, TaskRecord, TrackerMessage
from leveret.tracker.store import Applied, TrackerStore

TOPOLOGY = Topology("t-unit")


@dataclass
class FakeChannel:
    """What an aio-pika delivery's channel says about itself."""

    name: str = "channel-1"
    is_closed: bool = False


CHANNEL_1 = FakeChannel()


@dataclass
class FakeDelivery:
    """Just enough of an aio-pika incoming message; records how it was settled."""

    body: bytes
    delivery_tag: int
    exchange: str = TOPOLOGY.results_exchange
    routing_key: str = "completed.default.echo"
    message_id: str | None = None
    redelivered: bool = False
    channel: FakeChannel = field(default_factory=lambda: CHANNEL_1)
    settled: list[tuple[str, bool]] = field(default_factory=list)

    async def ack(self, multiple: bool = False) -> None:
        self.settled.append(("ack", multiple))

    async def reject(self, requeue: bool = False) -> None:
        self.settled.append(("reject", requeue))


class FakeStore:
    """Fails the first `transient_failures` applies; refuses any batch holding `poison`."""

    def __init__(self, transient_failures: int = 0, poison: str | None = None) -> None:
        self.transient_failures = transient_failures
        self.poison = poison
        self.committed: list[list[str]] = []
        self.resend: list[list[str]] = []  # the `resend` ids of each apply
        self.calls = 0

    async def apply(
        self,
        messages: Sequence[TrackerMessage],
        *,
        resend: Collection[str] = (),
        sent: Collection[str] = (),
    ) -> Applied:
        self.calls += 1
        self.resend.append(sorted(resend))
        if self.calls <= self.transient_failures:
            raise OperationalError("INSERT", {}, Exception("database is locked"))
        ids = [m.id for m in messages if isinstance(m, TaskResult)]
        if self.poison in ids:
            raise IntegrityError("INSERT", {}, Exception("value too long"))
        self.committed.append(ids)
        return Applied(len(ids), 0)


def result_body(task_id: str) -> bytes:
    return TaskResult(id=task_id, kind="echo", status="completed").model_dump_json().encode()


def make_consumer(store: FakeStore) -> Consumer:
    return Consumer(
        cast(TrackerStore, store), TOPOLOGY, prefetch=100, batch_max=100, batch_wait_ms=1
    )


async def feed(consumer: Consumer, deliveries: list[FakeDelivery]) -> None:
    for d in deliveries:
        await consumer._on_message(cast(AbstractIncomingMessage, d))
    await consumer.stop()  # no queue attached: only marks the end of input
    await asyncio.wait_for(consumer.run(), 10)


def test_decode_by_exchange() -> None:
    assert isinstance(decode(TOPOLOGY, TOPOLOGY.results_exchange, result_body("a")), TaskResult)
    with pytest.raises(Undecodable, match="unexpected exchange"):
        decode(TOPOLOGY, "elsewhere", result_body("a"))
    with pytest.raises(Undecodable, match="error"):
        decode(TOPOLOGY, TOPOLOGY.events_exchange, b'{"type": "nope"}')
    with pytest.raises(Undecodable):
        decode(TOPOLOGY, TOPOLOGY.results_exchange, b"not json")


class PgError(Exception):
    """What a PostgreSQL driver raises: carries the SQLSTATE."""

    def __init__(self, sqlstate: str) -> None:
        super().__init__(sqlstate)
        self.sqlstate = sqlstate


def test_transient_errors() -> None:
    assert is_transient(OperationalError("x", {}, Exception("locked")))
    assert is_transient(ConnectionRefusedError())
    assert not is_transient(IntegrityError("x", {}, Exception("dup")))
    assert not is_transient(ValueError())
    # PostgreSQL refusing new sessions (not accepting connections, database renamed away):
    # raised while connecting, with no statement.
    assert is_transient(DBAPIError(None, None, PgError("55000")))
    assert is_transient(DBAPIError(None, None, PgError("3D000")))
    for sqlstate in ("57P01", "08006", "53300", "40001", "40P01"):
        assert is_transient(DBAPIError("UPDATE tasks", {}, PgError(sqlstate))), sqlstate
    assert not is_transient(DBAPIError("INSERT INTO tasks", {}, PgError("23505")))
    assert not is_transient(DBAPIError("INSERT INTO tasks", {}, PgError("22001")))


async def test_batch_is_acked_once_after_commit_and_bad_input_rejected() -> None:
    store = FakeStore()
    good = [FakeDelivery(result_body(f"t{i}"), i) for i in (1, 2, 4)]
    bad = FakeDelivery(b"{oops", 3)
    last_bad = FakeDelivery(b"", 5, exchange=TOPOLOGY.events_exchange)
    await feed(make_consumer(store), [good[0], good[1], bad, good[2], last_bad])
    assert store.committed == [["t1", "t2", "t4"]]
    assert bad.settled == [("reject", False)] and last_bad.settled == [("reject", False)]
    # One multiple-ack on the last applied delivery (never on a rejected one).
    assert [d.settled for d in good] == [[], [], [("ack", True)]]


async def test_transient_store_failure_retries_the_same_batch_without_acking() -> None:
    store = FakeStore(transient_failures=2)
    deliveries = [FakeDelivery(result_body(f"t{i}"), i) for i in (1, 2)]
    consumer = make_consumer(store)
    await feed(consumer, deliveries)
    assert store.calls == 3 and store.committed == [["t1", "t2"]]
    assert deliveries[1].settled == [("ack", True)] and deliveries[0].settled == []
    assert consumer.refused == 0


async def test_a_message_the_store_refuses_is_isolated_and_dead_lettered() -> None:
    store = FakeStore(poison="bad")
    deliveries = [FakeDelivery(result_body(i), n) for n, i in enumerate(["a", "bad", "c"], 1)]
    consumer = make_consumer(store)
    await feed(consumer, deliveries)
    assert store.committed == [["a"], ["c"]]
    assert [d.settled for d in deliveries] == [[], [("reject", False)], [("ack", True)]]
    assert consumer.refused == 1


async def test_one_ack_per_channel_when_a_batch_spans_a_reconnect() -> None:
    store = FakeStore()
    old = FakeDelivery(result_body("a"), 7, channel=FakeChannel("old"))
    new_channel = FakeChannel("new")
    new = [FakeDelivery(result_body(i), n, channel=new_channel) for n, i in ((1, "b"), (2, "c"))]
    await feed(make_consumer(store), [old, *new])
    assert old.settled == [("ack", True)]
    assert [d.settled for d in new] == [[], [("ack", True)]]


async def test_deliveries_of_a_dead_channel_are_left_to_the_broker() -> None:
    store = FakeStore()
    old = FakeDelivery(result_body("a"), 7, channel=FakeChannel("old", is_closed=True))
    new = FakeDelivery(result_body("b"), 1, channel=FakeChannel("new"))
    await feed(make_consumer(store), [old, new])
    assert store.committed == [["a", "b"]]  # recorded once; the redelivery changes nothing
    assert old.settled == []  # its tag means nothing now: the broker redelivers it
    assert new.settled == [("ack", True)]


async def test_batches_are_cut_at_batch_max() -> None:
    store = FakeStore()
    consumer = Consumer(
        cast(TrackerStore, store), TOPOLOGY, prefetch=100, batch_max=2, batch_wait_ms=50
    )
    await feed(consumer, [FakeDelivery(result_body(f"t{i}"), i) for i in range(1, 6)])
    assert store.committed == [["t1", "t2"], ["t3", "t4"], ["t5"]]


class Clock:
    """The consumer's clock, moved by hand (a second per tick)."""

    def __init__(self) -> None:
        self.now = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def tick(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


class BlockingStore(FakeStore):
    """Holds every apply until `release` is set; `applying` is set while one waits."""

    def __init__(self) -> None:
        super().__init__()
        self.applying = asyncio.Event()
        self.release = asyncio.Event()

    async def apply(
        self,
        messages: Sequence[TrackerMessage],
        *,
        resend: Collection[str] = (),
        sent: Collection[str] = (),
    ) -> Applied:
        self.applying.set()
        await self.release.wait()
        return await super().apply(messages, resend=resend, sent=sent)


async def test_caught_up_advances_only_while_idle_on_an_open_channel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    monkeypatch.setattr("leveret.tracker.consumer.utcnow", clock)
    store = BlockingStore()
    consumer = make_consumer(store)
    born = consumer.caught_up_at()
    assert consumer.listening_since() == born
    runner = asyncio.create_task(consumer.run())
    channel = FakeChannel()
    try:
        await until(lambda: consumer._inbox.waiting, "the consumer waiting on its empty buffer")
        clock.tick()
        assert consumer.caught_up_at() == born  # idle, but not consuming: nothing was heard
        consumer._channel, consumer._tag = cast(Any, channel), "tag"
        listening = clock.tick()
        assert consumer.caught_up_at() == listening  # idle on an open channel: caught up now
        channel.is_closed = True
        clock.tick()
        assert consumer.caught_up_at() == listening  # cut off from the broker: silence is no news
        channel.is_closed = False

        took = clock.tick()
        await consumer._on_message(cast(AbstractIncomingMessage, FakeDelivery(result_body("a"), 1)))
        await asyncio.wait_for(store.applying.wait(), 5)
        clock.tick()
        assert consumer.caught_up_at() == took  # busy with a batch: caught up when it took it
        store.release.set()
        await until(lambda: consumer._inbox.waiting, "the consumer idle again after the batch")
        again = clock.tick()
        assert consumer.caught_up_at() == again  # idle and listening again
        assert store.committed == [["a"]]
    finally:
        store.release.set()
        consumer._tag = None
        await consumer.stop()
        await asyncio.wait_for(runner, 5)


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    """Wait (polling the event loop) until `condition` holds."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)  # poll interval, not synchronisation


class RecordingReplies:
    """Stands in for the reply sender: records what it was asked to publish, and when
    (relative to the acks of `watched`), and what it marked sent."""

    def __init__(self, watched: list[FakeDelivery], *, broken: bool = False) -> None:
        self.watched = watched
        self.broken = broken
        self.sent: list[tuple[list[str], bool]] = []
        self.marked: list[tuple[list[str], bool]] = []

    async def publish(self, records: Sequence[TaskRecord]) -> list[str]:
        if self.broken:
            raise ConnectionResetError("the replies channel broke")
        acked = any(d.settled for d in self.watched)
        self.sent.append(([r.id for r in records], acked))
        return [r.id for r in records]

    async def mark_sent(self, task_ids: Sequence[str]) -> None:
        self.marked.append((list(task_ids), any(d.settled for d in self.watched)))


class OwingStore(FakeStore):
    """Every result whose id starts with "r" leaves its task owing a reply."""

    async def apply(
        self,
        messages: Sequence[TrackerMessage],
        *,
        resend: Collection[str] = (),
        sent: Collection[str] = (),
    ) -> Applied:
        applied = await super().apply(messages, resend=resend, sent=sent)
        owed = tuple(
            TaskRecord(id=m.id, status=TaskStatus.COMPLETED, reply_to="q", reply=ReplyState.OWED)
            for m in messages
            if isinstance(m, TaskResult) and m.id.startswith("r")
        )
        return replace(applied, replies=owed)


def replying(store: FakeStore, replies: RecordingReplies) -> Consumer:
    """A consumer with these stand-ins for its store and its reply sender."""
    return Consumer(
        cast(TrackerStore, store),
        TOPOLOGY,
        prefetch=100,
        batch_max=100,
        batch_wait_ms=1,
        replies=cast(ReplySender, replies),
    )


async def test_owed_replies_are_sent_after_the_commit_and_before_the_ack() -> None:
    store = OwingStore()
    owing = [FakeDelivery(result_body(i), n) for n, i in enumerate(["a", "r1", "r2"], 1)]
    replies = RecordingReplies(owing)
    consumer = replying(store, replies)
    await feed(consumer, owing)
    assert store.committed == [["a", "r1", "r2"]]
    # Each reply right before the ack of the delivery that owes it: r1's reply before
    # any ack, r2's after r1's delivery was acked (with the one before it) but before
    # its own; a kill between two frames doubles one reply at most, not a batch.
    assert replies.sent == [(["r1"], False), (["r2"], True)]
    assert [d.settled for d in owing] == [[], [("ack", True)], [("ack", True)]]
    assert replies.marked == [(["r1", "r2"], True)]  # marked sent after the acks
    quiet = RecordingReplies([])
    consumer = replying(OwingStore(), quiet)
    await feed(consumer, [FakeDelivery(result_body("b"), 1)])
    assert quiet.sent == []  # a batch that owes nothing sends nothing


async def test_a_redelivered_message_asks_for_its_tasks_reply_again() -> None:
    """A tracker that died after the commit may not have sent the reply: the tasks the
    redelivered messages name are passed as `resend`; first deliveries are not."""
    store = OwingStore()
    batch = [
        FakeDelivery(result_body("r1"), 1, redelivered=True),
        FakeDelivery(result_body("r2"), 2),
    ]
    consumer = replying(store, RecordingReplies(batch))
    await feed(consumer, batch)
    assert store.resend == [["r1"]]


async def test_replies_that_cannot_be_sent_return_the_batch_unacked() -> None:
    """No ack without the replies before it: the batch comes back redelivered, and its
    replies are sent then."""
    batch = [FakeDelivery(result_body("r1"), 1), FakeDelivery(result_body("r2"), 2)]
    consumer = replying(OwingStore(), RecordingReplies(batch, broken=True))
    await feed(consumer, batch)
    assert [d.settled for d in batch] == [[("reject", True)], [("reject", True)]]
