"""Submission parsing and validation, and the intake key of a submission without an id
(pure logic, no broker)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import pytest
from aio_pika.message import IncomingMessage
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec
from pamqp.header import ContentHeader

from leveret.contracts import SubmitTask
from leveret.errors import SubmissionError
from leveret.roles import RoleUsers
from leveret.scheduler.admission import (
    KindCatalog,
    check_payload_size,
    check_supported,
    envelope,
    parse_body,
)
from leveret.scheduler.intake import (
    FORGET_AFTER_S,
    IntakeKeys,
    intake_key,
    may_submit,
    redelivered,
)


@pytest.mark.parametrize(
    ("body", "code", "status"),
    [
        (b"\xff", "invalid_encoding", 400),
        (b"{", "invalid_json", 400),
        (b"42", "not_an_object", 400),
        (b'{"payload": 1}', "invalid_task", 422),
        (b"x" * 101, "payload_too_large", 413),
    ],
)
def test_parse_body_says_what_is_wrong(body: bytes, code: str, status: int) -> None:
    with pytest.raises(SubmissionError) as info:
        parse_body(body, max_bytes=100)
    assert (info.value.code, info.value.status) == (code, status)
    assert info.value.message


def test_missing_kind_is_named_in_the_message() -> None:
    with pytest.raises(SubmissionError, match="kind"):
        parse_body(b'{"payload": 1}', max_bytes=100)


def test_unknown_kind_lists_known_ones() -> None:
    kinds = KindCatalog(["resize"])
    with pytest.raises(SubmissionError, match="resize") as info:
        check_supported(SubmitTask(kind="nope"), kinds)
    assert info.value.code == "unknown_kind"
    check_supported(SubmitTask(kind="resize"), kinds)
    assert kinds.add(["resize", "thumb"]) == {"thumb"}


def test_requires_is_refused_only_on_a_limited_kind() -> None:
    kinds = KindCatalog()
    check_supported(SubmitTask(kind="echo", requires=["gpu"]), kinds)
    kinds.limited.add("echo")
    check_supported(SubmitTask(kind="echo"), kinds)
    with pytest.raises(SubmissionError, match="cluster-wide limit") as info:
        check_supported(SubmitTask(kind="echo", requires=["gpu"]), kinds)
    assert info.value.code == "unsupported"


def test_envelope_keeps_requirements_in_canonical_form() -> None:
    task = SubmitTask(kind="echo", requires=["region-eu", "gpu", "gpu"])
    assert envelope(task).requires == ["gpu", "region-eu"]
    assert envelope(SubmitTask(kind="echo")).requires == []


def test_envelope_defaults() -> None:
    task = SubmitTask(kind="echo", payload="p")
    msg = envelope(task, default_id="mid", default_pool="gpu", correlation_id="c", reply_to="r")
    assert (msg.id, msg.pool, msg.correlation_id, msg.reply_to) == ("mid", "gpu", "c", "r")
    explicit = envelope(SubmitTask(kind="echo", id="mine", pool="cpu"), default_id="mid")
    assert (explicit.id, explicit.pool) == ("mine", "cpu")
    assert len(envelope(task).id) == 32
    with pytest.raises(SubmissionError):
        envelope(task, default_pool="Not A Pool")


def test_payload_size_of_batch_items() -> None:
    check_payload_size(SubmitTask(kind="echo", payload="x" * 10), 12)
    with pytest.raises(SubmissionError) as info:
        check_payload_size(SubmitTask(kind="echo", payload="x" * 20), 12)
    assert info.value.status == 413
    # the bound is on the payload's JSON size (quotes included): 10 chars + 2 quotes fits 12
    check_payload_size(SubmitTask(kind="echo", payload="x" * 10), len(json.dumps("x" * 10)))
    with pytest.raises(SubmissionError):
        check_payload_size(SubmitTask(kind="echo", payload="x" * 11), len(json.dumps("x" * 10)))


# The intake key: what a redelivered AMQP submission without an id is recognised by.


class FakeChannel:
    """An aiormq channel as an incoming message sees it: open or closed."""

    is_closed = False


def delivery(
    body: bytes = b'{"kind": "echo"}',
    *,
    redelivered: bool = False,
    routing_key: str = "default",
    tag: int = 1,
    channel: FakeChannel | None = None,
    **properties: Any,
) -> IncomingMessage:
    """A delivery from the intake queue, decoded by aio-pika as the scheduler gets it."""
    header = ContentHeader(body_size=len(body), properties=spec.Basic.Properties(**properties))
    deliver = spec.Basic.Deliver(
        consumer_tag=f"ctag-{tag}",
        delivery_tag=tag,
        redelivered=redelivered,
        exchange="ns.submit",
        routing_key=routing_key,
    )
    open_or_closed: Any = channel or FakeChannel()
    return IncomingMessage(DeliveredMessage(deliver, header, body, open_or_closed))


SENT = {
    "correlation_id": "c1",
    "reply_to": "amq.gen-abc",
    "timestamp": datetime(2024, 5, 1, 12, tzinfo=UTC),
    "message_type": "submit",
    "app_id": "producer",
    "user_id": "guest",
    "headers": {"trace": "t-1", "tags": ["a", {"b": 2}]},
}


def test_an_intake_key_is_the_same_on_every_delivery() -> None:
    first = delivery(**SENT)
    broker_headers = {
        **SENT["headers"],
        "x-delivery-count": 3,
        "x-death": [{"count": 1, "queue": "ns.intake"}],
        "x-first-death-queue": "ns.intake",
        "x-last-death-reason": "rejected",
    }
    again = delivery(redelivered=True, tag=9, **(SENT | {"headers": broker_headers}))
    assert intake_key(first) == intake_key(again)
    assert len(intake_key(first)) == 64  # SHA-256, hex: the column's width
    reordered = dict(reversed(list(SENT["headers"].items())))
    assert intake_key(delivery(**(SENT | {"headers": reordered}))) == intake_key(first)


@pytest.mark.parametrize(
    "change",
    [
        {"body": b'{"kind": "echo", "payload": 1}'},
        {"routing_key": "gpu"},
        {"correlation_id": "c2"},
        {"reply_to": "elsewhere"},
        {"timestamp": datetime(2024, 5, 1, 13, tzinfo=UTC)},
        {"message_type": "other"},
        {"app_id": "another"},
        {"user_id": "admin"},
        {"message_id": "not a valid id"},
        {"headers": {"trace": "t-2", "tags": ["a", {"b": 2}]}},
        {"headers": {"trace": "t-1", "tags": ["a", {"b": "2"}]}},  # a value's type counts
    ],
)
def test_an_intake_key_tells_submissions_apart(change: dict[str, Any]) -> None:
    assert intake_key(delivery(**(SENT | change))) != intake_key(delivery(**SENT))


def test_intake_key_fields_do_not_run_into_each_other() -> None:
    one = delivery(b"ab", correlation_id="c")
    other = delivery(b"a", correlation_id="bc")
    assert intake_key(one) != intake_key(other)


def test_a_redelivery_is_told_by_the_flag_or_the_delivery_count() -> None:
    assert not redelivered(delivery())
    assert not redelivered(delivery(headers={"x-delivery-count": 0}))
    assert redelivered(delivery(redelivered=True))
    assert redelivered(delivery(headers={"x-delivery-count": 1}))


class FakeKeyStore:
    """The two store calls IntakeKeys makes, in memory."""

    def __init__(self, rows: dict[str, str] | None = None) -> None:
        self.rows = dict(rows or {})  # task id -> intake key, oldest first
        self.lookups = 0
        self.fail = False

    async def unacked_intake(self, key: str, limit: int = 64) -> list[str]:
        self.lookups += 1
        return [task for task, k in self.rows.items() if k == key][:limit]

    async def forget_intake(self, ids: Iterable[str]) -> None:
        if self.fail:
            raise OSError("database gone")
        for task in ids:
            self.rows.pop(task, None)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def keys_on(store: FakeKeyStore, clock: Clock | None = None) -> IntakeKeys:
    return IntakeKeys(store, clock=clock or Clock())  # type: ignore[arg-type]


async def test_a_first_delivery_costs_no_lookup() -> None:
    store = FakeKeyStore({"t1": "k"})
    assert await keys_on(store).task_of("k", delivery()) is None
    assert store.lookups == 0


async def test_a_redelivery_takes_a_task_no_live_delivery_holds() -> None:
    store = FakeKeyStore({"old": "k", "mine": "k", "other": "x"})
    keys = keys_on(store)
    live = delivery(tag=1)
    keys.hold("mine", live)  # a first delivery of a twin, being admitted now
    keys.hold("old", live)
    assert await keys.task_of("k", delivery(redelivered=True, tag=2)) is None
    keys.done("old", live, acked=False)  # back to its queue: free again
    second = delivery(redelivered=True, tag=3)
    assert await keys.task_of("k", second) == "old"
    assert await keys.task_of("k", delivery(redelivered=True, tag=4)) is None  # held now
    assert await keys.task_of("k", second) == "old"  # its own holder asks again
    assert keys.rematched == 2


async def test_a_task_held_on_a_closed_channel_goes_to_its_redelivery() -> None:
    """The channel closed under a delivery still being admitted: the broker requeued it,
    and the redelivery (on the restored channel) may arrive first."""
    channel = FakeChannel()
    store = FakeKeyStore({"t1": "k"})
    keys = keys_on(store)
    old = delivery(tag=1, channel=channel)
    keys.hold("t1", old)
    channel.is_closed = True
    new = delivery(redelivered=True, tag=1)
    assert await keys.task_of("k", new) == "t1"
    keys.done("t1", old, acked=False)  # the old handler ends: the new holder stays
    assert await keys.task_of("k", delivery(redelivered=True, tag=2)) is None


async def test_an_acked_task_stays_held_while_its_channel_is_open() -> None:
    """A twin's redelivery handled after the first one's ack went out must not take its
    task: that ack reaches the broker unless its channel closes first."""
    channel = FakeChannel()
    store = FakeKeyStore({"t1": "k"})
    keys = keys_on(store)
    first = delivery(redelivered=True, tag=1, channel=channel)
    assert await keys.task_of("k", first) == "t1"
    keys.done("t1", first, acked=True)
    assert await keys.task_of("k", delivery(redelivered=True, tag=2)) is None  # a twin
    channel.is_closed = True  # the ack may be lost: its redelivery is the task
    assert await keys.task_of("k", delivery(redelivered=True, tag=1)) == "t1"


async def test_acked_keys_are_forgotten_once_settled() -> None:
    clock = Clock()
    store = FakeKeyStore({"t1": "k", "t2": "k", "t3": "k"})
    keys = keys_on(store, clock)
    for task in ("t1", "t2"):
        message = delivery(tag=len(task))
        keys.hold(task, message)
        keys.done(task, message, acked=True)
    clock.now += FORGET_AFTER_S / 2
    keys.done("t3", delivery(tag=3), acked=True)
    assert await keys.forget() == 0  # an ack this fresh may still be lost with a crash
    clock.now += FORGET_AFTER_S / 2
    assert await keys.forget() == 2
    assert store.rows == {"t3": "k"}
    assert keys.pending == 1
    assert await keys.forget(settled_only=False) == 1  # a graceful stop: every ack arrived
    assert store.rows == {}


async def test_forgetting_never_fails_and_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    store = FakeKeyStore({"t1": "k"})
    keys = keys_on(store, clock)
    store.fail = True
    keys.done("t1", delivery(), acked=True)
    clock.now += FORGET_AFTER_S
    assert await keys.forget() == 0  # logged and dropped: the key stays set
    assert (keys.left_set, keys.pending, store.rows) == (1, 0, {"t1": "k"})
    monkeypatch.setattr("leveret.scheduler.intake.FORGET_MAX", 3)
    for n in range(5):
        keys.done(f"x{n}", delivery(), acked=True)
    assert (keys.pending, keys.left_set) == (3, 3)


def test_only_producers_and_the_scheduler_may_submit_once_roles_are_listed() -> None:
    assert may_submit(RoleUsers({}), None), "quick start: anyone"
    assert may_submit(RoleUsers.of(worker=["w"]), "w"), "no producer listed: anyone"
    roles = RoleUsers.of(producer=["p"], scheduler=["s"], worker=["w"])
    assert may_submit(roles, "p")
    assert may_submit(roles, "s")
    assert not may_submit(roles, "w")
    assert not may_submit(roles, None)
