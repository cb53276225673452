"""The tracker SIGKILLed again and again while it sends replies: no producer's reply is
lost, and a repeat (the kill caught replies in the kernel's send buffer while the
acks after them were dropped: a reset discards what was not sent yet) is an identical
copy with the same `message_id`. How many repeats there were is reported: the design
keeps them to the replies of one delivery per kill (see leveret.tracker.replies)."""

from __future__ import annotations

import asyncio
import json
import random
import signal
from collections import Counter

import aio_pika
import pytest
from helpers import eventually, report

from leveret.amqp import connect
from leveret.cli.procs import Cluster
from leveret.contracts import REPLY_RESULT
from leveret.topology import Topology

pytestmark = [pytest.mark.broker, pytest.mark.chaos]

TASKS = 10_000
KILLS = 5


async def test_tracker_killed_while_replying_loses_no_reply(cluster: Cluster) -> None:
    cluster.start_tracker()
    cluster.start_scheduler()
    for name in ("w1", "w2"):
        cluster.start_worker(name, "--concurrency", "16")
    replies: Counter[str] = Counter()
    copies: dict[str, set[tuple[str | None, bytes]]] = {}
    connection = await connect(cluster.amqp_url, f"test-producer-{cluster.namespace}")
    try:
        channel = await connection.channel()
        inbox = await channel.declare_queue(exclusive=True)

        async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            if message.type == REPLY_RESULT and message.correlation_id:
                replies[message.correlation_id] += 1
                copies.setdefault(message.correlation_id, set()).add(
                    (message.message_id, message.body)
                )

        await inbox.consume(on_reply, no_ack=True)
        exchange = await channel.get_exchange(Topology(cluster.namespace).submit_exchange)
        for start in range(0, TASKS, 500):
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(
                            json.dumps({"kind": "echo", "payload": i}).encode(),
                            correlation_id=f"c{i}",
                            reply_to=inbox.name,
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        ),
                        "default",
                    )
                    for i in range(start, min(TASKS, start + 500))
                )
            )
        rng = random.Random(9)
        struck = []
        for _ in range(KILLS):
            # Strike while replies flow: some answered already, more to come.
            before = len(replies)
            await eventually(lambda n=before: _more(replies, n), 60, "more replies to flow")
            tracker = next(s for s in cluster.services if s.name == "tracker")
            await asyncio.sleep(rng.uniform(0.05, 0.5))  # a random moment, not a sync
            tracker.send(signal.SIGKILL)
            assert tracker.proc.wait(10) == -signal.SIGKILL
            struck.append(len(replies))
            await asyncio.to_thread(cluster.start_tracker)

        async def all_answered() -> bool:
            return len(replies) >= TASKS

        await eventually(all_answered, 180, f"{TASKS} producers to get a reply")
        # One more task after the last reply: a late second copy of any reply (a
        # redelivery resends before anything newer is applied) would be in before its.
        await exchange.publish(
            aio_pika.Message(
                json.dumps({"kind": "echo", "payload": "marker"}).encode(),
                correlation_id="marker",
                reply_to=inbox.name,
            ),
            "default",
        )
        await eventually(lambda: _more(replies, TASKS), 60, "the marker's reply")
    finally:
        await connection.close()
    doubled = {c: n for c, n in replies.items() if n != 1}
    report(
        f"tracker SIGKILLed {KILLS} times while replying ({TASKS} tasks; after "
        f"{', '.join(map(str, struck))} replies): {len(replies) - 1} producers answered, "
        f"{len(doubled)} twice"
    )
    assert struck[0] < TASKS, "the first kill came after every reply: it tested nothing"
    assert len(replies) == TASKS + 1  # every producer answered (and the marker)
    differing = {c: n for c, n in copies.items() if len(n) != 1}
    assert not differing, f"repeated replies that are not identical copies: {differing}"


async def _more(replies: Counter[str], than: int) -> bool:
    return len(replies) > than
