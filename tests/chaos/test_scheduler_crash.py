"""The scheduler SIGKILLed while AMQP submissions stream in, half of them without any
id: each submission is admitted as one task, ends `completed`, and its producer gets
one terminal reply. (tests/chaos/test_restarts.py kills it under HTTP submissions.)

A redelivered submission without an id must map to the task its first delivery made
(the scheduler's intake key), so the tracker holds exactly one task per submission.

The submissions are published with pika: aio-pika (aiormq) gives every message it
publishes a random `message_id`, which the scheduler takes as the task id, so an
aio-pika producer never sends a submission without an id.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sqlite3
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aio_pika
import pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from helpers import TrackerApi, eventually, ready_messages, report
from sqlalchemy import select

from leveret.amqp import connect, open_channel
from leveret.cli.procs import Cluster, Service
from leveret.contracts import REPLY_RESULT, TERMINAL_STATUSES
from leveret.scheduler.admission import Admission, KindCatalog
from leveret.scheduler.dispatch import Dispatcher
from leveret.scheduler.intake import Intake
from leveret.scheduler.store import SubmissionStore
from leveret.scheduler.tables import submissions
from leveret.settings import MIB
from leveret.topology import Topology

pytestmark = [pytest.mark.broker, pytest.mark.chaos]

SUBMISSIONS = 2000
KILL_AFTER = 700  # confirmed submissions
KILLS = 3  # at most, until one catches an id-less submission mid-admission
BACKLOG = 400  # submissions queued behind the frozen scheduler before each kill
#: How long the scheduler stays dead: the fault itself, not a synchronisation.
DOWNTIME_S = 3.0
PUBLISHERS = 8  # producer connections, each waiting for every confirm
#: The scheduler's intake prefetch here: on a thaw the broker hands it this many at
#: once, so the ready count drops by that much before any is admitted.
PREFETCH = 64
TERMINAL = {s.value for s in TERMINAL_STATUSES}


def publish(
    url: str,
    exchange: str,
    messages: Sequence[tuple[bytes, pika.BasicProperties]],
    on_confirm: Callable[[], None] = lambda: None,
) -> None:
    """Publish with pika, each message confirmed before the next (blocking: run it on a
    thread). Routing key `default`: the pool."""
    params = pika.URLParameters(url)
    params.client_properties = {"connection_name": f"test-producer-{threading.get_ident()}"}
    connection = pika.BlockingConnection(params)
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for body, properties in messages:
            channel.basic_publish(exchange, "default", body, properties, mandatory=True)
            on_confirm()
    finally:
        connection.close()


class Inbox:
    """The producer's `reply_to` queue (exclusive, for the whole run): every reply,
    by correlation id; and a marker that proves everything sent before it was read."""

    def __init__(self) -> None:
        self.replies: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)
        self.markers: set[str] = set()

    async def on_reply(self, message: AbstractIncomingMessage) -> None:
        if message.type == "test.marker":
            self.markers.add(message.body.decode())
        elif message.type == REPLY_RESULT and message.correlation_id:
            self.replies[message.correlation_id].append(json.loads(message.body))

    def terminal(self, corr: str) -> list[dict[str, Any]]:
        return [r for r in self.replies[corr] if r.get("status") in TERMINAL]

    def notices(self) -> int:
        """`duplicate` answers: none is due (a redelivery is its first delivery's task)."""
        return sum(r.get("status") == "duplicate" for rs in self.replies.values() for r in rs)


async def _drained(channel: aio_pika.abc.AbstractChannel, queue: str, inbox: Inbox) -> None:
    """Wait until every message that reached `queue` before now has been consumed: a
    marker published after them comes out after them."""
    marker = uuid.uuid4().hex
    await channel.default_exchange.publish(
        aio_pika.Message(marker.encode(), type="test.marker"), queue
    )

    async def seen() -> bool:
        return marker in inbox.markers

    await eventually(seen, 30, f"the marker through {queue}")


def _submission(i: int, inbox: str) -> tuple[bytes, pika.BasicProperties]:
    """Even: an `id` in the body; odd: neither an id nor a message_id (the scheduler
    makes one). Each has its own correlation id and the test's `reply_to`."""
    body: dict[str, Any] = {"kind": "echo", "payload": i}
    if i % 2 == 0:
        body["id"] = f"crash-{i}"
    properties = pika.BasicProperties(
        content_type="application/json",
        delivery_mode=2,
        correlation_id=f"corr-{i}",
        reply_to=inbox,
    )
    return json.dumps(body).encode(), properties


def _kill_on_claim(store: Path, scheduler: Service, timeout_s: float) -> None:
    """SIGKILL `scheduler` as soon as its store holds a committed, undispatched claim
    of a submission without an id (polled every millisecond, read-only)."""
    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = db.execute(
                "SELECT 1 FROM submissions WHERE state = 'claimed' "
                "AND intake_key IS NOT NULL LIMIT 1"
            ).fetchone()
            if found:
                scheduler.send(signal.SIGKILL)
                return
            time.sleep(0.001)  # a polling interval, not a synchronisation
        scheduler.send(signal.SIGKILL)  # admitted nothing in time: the check says so
    finally:
        db.close()


async def _kill_mid_admission(
    cluster: Cluster,
    scheduler: Service,
    intake: str,
    publishing: asyncio.Future[Any],
    confirmed: Callable[[], int],
) -> tuple[Service, list[int]]:
    """SIGKILL the scheduler while it has id-less submissions claimed and not yet acked;
    return the restarted scheduler and the confirmed count at each kill.

    The scheduler is frozen while a backlog builds and thawed; a thread watching its
    store (SQLite in WAL mode: a reader sees each commit) kills it the moment a claim
    of an id-less submission is committed and not yet marked dispatched, so its
    delivery is unacked. If the redeliveries still matched nothing, the restarted
    one is killed the same way while work is left.
    """

    async def backlog() -> int:
        return await ready_messages(cluster.amqp_url, intake)

    kills: list[int] = []
    restarted = scheduler
    for _ in range(KILLS):
        restarted.send(signal.SIGSTOP)
        frozen_at = await backlog()

        async def built(start: int = frozen_at) -> bool:
            return publishing.done() or await backlog() >= start + BACKLOG

        await eventually(built, 60, f"a backlog of {BACKLOG} behind a frozen scheduler")
        if await backlog() == 0:
            restarted.send(signal.SIGCONT)
            break  # nothing left to admit: no kill can catch anything
        store = cluster.workdir / "data" / "scheduler.db"
        killer = asyncio.ensure_future(asyncio.to_thread(_kill_on_claim, store, restarted, 60.0))
        restarted.send(signal.SIGCONT)
        await killer
        kills.append(confirmed())
        await asyncio.sleep(DOWNTIME_S)
        restarted = await asyncio.to_thread(cluster.start_scheduler)

        def matched(proc: Service = restarted) -> bool:
            return "redelivered submission is task" in proc.log()

        async def settled(proc: Service = restarted, start: int = await backlog()) -> bool:
            # Redeliveries come first: once it took more than a prefetch of the rest,
            # every one of them was seen. If none matched, kill again while work is left.
            return matched(proc) or await backlog() <= max(0, start - PREFETCH - BACKLOG // 4)

        await eventually(settled, 60, "the restarted scheduler past its redeliveries")
        if matched():
            break
    return restarted, kills


async def test_scheduler_killed_mid_intake_admits_each_submission_once(cluster: Cluster) -> None:
    cluster.extra_env["LEVERET_INTAKE_PREFETCH"] = str(PREFETCH)
    cluster.start_tracker()
    scheduler = cluster.start_scheduler()
    for name in ("w1", "w2"):
        cluster.start_worker(name, "--concurrency", "16")
    api = TrackerApi(cluster.tracker_url)
    inbox = Inbox()
    runs: Counter[str] = Counter()  # results on the results exchange: one per run
    connection = await connect(cluster.amqp_url, f"test-producer-{cluster.namespace}")
    try:
        channel = await connection.channel(publisher_confirms=True)
        replies = await channel.declare_queue(exclusive=True)
        await replies.consume(inbox.on_reply, no_ack=True)
        results = await channel.declare_queue(exclusive=True)
        await results.bind(f"{cluster.namespace}.results", "#")

        async def on_result(message: AbstractIncomingMessage) -> None:
            if message.type == "test.marker":
                inbox.markers.add(message.body.decode())
            else:
                runs[json.loads(message.body)["id"]] += 1

        await results.consume(on_result, no_ack=True)
        loop = asyncio.get_running_loop()
        confirmed = 0

        def on_confirm() -> None:
            nonlocal confirmed
            confirmed += 1

        submit = f"{cluster.namespace}.submit"
        with ThreadPoolExecutor(PUBLISHERS) as threads:
            publishing = asyncio.gather(
                *(
                    loop.run_in_executor(
                        threads,
                        publish,
                        cluster.amqp_url,
                        submit,
                        [_submission(i, replies.name) for i in range(k, SUBMISSIONS, PUBLISHERS)],
                        lambda: loop.call_soon_threadsafe(on_confirm),
                    )
                    for k in range(PUBLISHERS)
                )
            )

            intake = Topology(cluster.namespace).intake.name

            async def enough_confirmed() -> bool:
                if publishing.done():
                    publishing.result()  # a publisher failed: say why
                return confirmed >= KILL_AFTER

            await eventually(enough_confirmed, 60, f"{KILL_AFTER} confirmed", 0.2)
            restarted, kills = await _kill_mid_admission(
                cluster, scheduler, intake, publishing, lambda: confirmed
            )
            await publishing

        async def all_answered() -> bool:
            stats = await api.stats()
            unfinished = stats["total"] - sum(stats["counts"].get(s, 0) for s in TERMINAL)
            replied = all(inbox.terminal(f"corr-{i}") for i in range(SUBMISSIONS))
            return replied and not unfinished and stats["total"] >= SUBMISSIONS

        await eventually(all_answered, 120, f"{SUBMISSIONS} submissions to end and be answered")
        stats = await api.stats()
        # Whatever is still in flight (a second run of a task) ends before the workers
        # exit; then every reply and result sent is read before the markers.
        codes = await asyncio.to_thread(cluster.stop_all)
        await _drained(channel, replies.name, inbox)
        await _drained(channel, results.name, inbox)
    finally:
        await connection.close()
        await api.close()

    log = restarted.log()  # both runs: they share the file
    rematched = log.count("redelivered submission is task")
    redispatched = sum(int(n) for n in re.findall(r"re-dispatched (\d+) tasks", log))
    twice = sorted(t for t, n in runs.items() if n > 1)
    per_corr = Counter(len(inbox.terminal(f"corr-{i}")) for i in range(SUBMISSIONS))
    report(
        f"scheduler SIGKILL mid-intake ({SUBMISSIONS} AMQP submissions, half without an id): "
        f"killed at {kills} confirmed; {stats['total']} tasks recorded; "
        f"{rematched} id-less redeliveries found their first task; {redispatched} "
        f"re-dispatched at restart; {len(twice)} tasks ran twice "
        f"({len(twice) / SUBMISSIONS:.2%}); terminal replies per submission {dict(per_corr)}"
    )
    assert stats["total"] == SUBMISSIONS, stats  # one task per submission
    # The scenario happened: the kill caught submissions without an id between their
    # claim and their ack, and their redeliveries came back to the restarted scheduler.
    assert rematched > 0, "the kill caught no submission without an id mid-admission"
    assert stats["counts"].get("completed") == SUBMISSIONS, stats["counts"]
    assert inbox.notices() == 0
    doubled = {
        f"corr-{i}": [r["id"] for r in inbox.terminal(f"corr-{i}")]
        for i in range(SUBMISSIONS)
        if len(inbox.terminal(f"corr-{i}")) != 1
    }
    # A task that runs twice (at-least-once) must still be answered once: the tracker
    # sends the one terminal reply for the outcome it records.
    assert not doubled, (
        f"{len(doubled)} submissions answered more than once; of their tasks "
        f"{sum(1 for ids in doubled.values() if any(i in twice for i in ids))} ran twice: "
        f"{dict(list(doubled.items())[:5])}"
    )
    codes["scheduler"] = restarted.proc.returncode  # not the killed one's
    assert all(code == 0 for code in codes.values()), codes


class InProcessScheduler:
    """The scheduler's admission path in this process, on the real broker: a crash is
    closing the channel its delivery came on before the ack, a restart a new Intake."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.topology = Topology(cluster.namespace)
        self.url = f"sqlite+aiosqlite:///{cluster.workdir}/scheduler.db"

    async def __aenter__(self) -> InProcessScheduler:
        self.connection = await connect(self.cluster.amqp_url, "test-intake")
        self.declared = await self.topology.declare(await open_channel(self.connection))
        self.store = await SubmissionStore.open(self.url)
        self.admission = Admission(self.store, Dispatcher(self.declared))
        self.flusher = asyncio.ensure_future(self.admission.run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.flusher.cancel()
        await self.store.close()
        await self.connection.close()

    def intake(self) -> Intake:
        return Intake(self.admission, self.declared, KindCatalog(), max_bytes=MIB)

    async def deliver(self) -> tuple[AbstractIncomingMessage, aio_pika.abc.AbstractChannel]:
        """The next intake delivery, on a channel of its own."""
        channel = await self.connection.channel()
        queue = await channel.get_queue(self.topology.intake.name)
        found: list[AbstractIncomingMessage] = []

        async def got() -> bool:
            message = await queue.get(fail=False)
            if message is not None:
                found.append(message)
            return bool(found)

        await eventually(got, 10, "an intake delivery")
        return found[0], channel

    async def publish(self, body: bytes, corr: str) -> None:
        """One submission with neither an id nor a message_id."""
        properties = pika.BasicProperties(correlation_id=corr, delivery_mode=2)
        exchange = self.topology.submit_exchange
        await asyncio.to_thread(publish, self.cluster.amqp_url, exchange, [(body, properties)])

    async def tasks(self) -> list[str]:
        async with self.store.engine.connect() as conn:
            return sorted(await conn.scalars(select(submissions.c.id)))

    async def queued(self) -> int:
        return await ready_messages(self.cluster.amqp_url, self.topology.work("default").name)


@pytest.mark.parametrize("restart", [True, False], ids=["crash-restart", "channel-lost"])
async def test_a_redelivered_submission_without_id_is_its_first_task(
    cluster: Cluster, restart: bool
) -> None:
    """Admitted, dispatched, then its delivery went back to the queue unacked (the process
    died, or only its channel): the redelivery is that task, not a second one."""
    async with InProcessScheduler(cluster) as scheduler:
        await scheduler.publish(b'{"kind": "echo", "payload": "once"}', "c1")
        first, channel = await scheduler.deliver()
        await channel.close()  # the ack will never reach the broker
        intake = scheduler.intake()
        await intake.on_message(first)
        (task,) = await scheduler.tasks()
        assert await scheduler.queued() == 1
        again, _ = await scheduler.deliver()
        assert again.redelivered and again.body == first.body
        await (scheduler.intake() if restart else intake).on_message(again)
        assert await scheduler.tasks() == [task]
        assert await scheduler.queued() == 1  # not dispatched again either


async def test_identical_submissions_in_flight_stay_two_tasks(cluster: Cluster) -> None:
    """Two byte-identical submissions without an id, both left unacked by a crash after
    only the first was admitted: the redeliveries are two tasks, the first one's and a new
    one. And a key is forgotten once its ack is recorded: a later redelivered copy is new."""
    body = b'{"kind": "echo", "payload": "twin"}'
    async with InProcessScheduler(cluster) as scheduler:
        for _ in range(2):
            await scheduler.publish(body, "same")
        first, channel = await scheduler.deliver()
        second, _ = await scheduler.deliver()
        await channel.close()
        await scheduler.intake().on_message(first)  # admitted; its ack is lost
        await second.nack(requeue=True)  # never admitted: the crash took it too
        assert len(await scheduler.tasks()) == 1
        restarted = scheduler.intake()
        one, _ = await scheduler.deliver()
        two, _ = await scheduler.deliver()
        await asyncio.gather(restarted.on_message(one), restarted.on_message(two))
        assert len(await scheduler.tasks()) == 2
        assert restarted.keys.rematched == 1
        assert await restarted.keys.forget(settled_only=False) == 2

        await scheduler.publish(body, "same")  # the same bytes once more, a new submission
        _, channel = await scheduler.deliver()
        await channel.close()
        third_again, _ = await scheduler.deliver()
        assert third_again.redelivered
        await restarted.on_message(third_again)  # redelivered, yet no key left: new
        assert len(await scheduler.tasks()) == 3
