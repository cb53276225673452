"""The chaos run: 2000 tasks on 4 workers while one worker is SIGKILLed, another is
frozen (SIGSTOP) past the heartbeat timeout and later woken, and the tracker is
SIGKILLed and restarted. Every task must end `completed` exactly once, and every
producer must get exactly one terminal reply."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import signal
import statistics
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import httpx
import pytest
from helpers import TrackerApi, eventually, ready_messages, report

from leveret.amqp import connect
from leveret.cli.procs import Cluster, Service
from leveret.contracts import REPLY_RESULT
from leveret.topology import Topology

pytestmark = [pytest.mark.broker, pytest.mark.chaos]

TASKS = 2000
HEARTBEAT_TIMEOUT_S = 3.0


def reassigned_starts(tasks: list[dict[str, Any]], worker: str) -> list[datetime]:
    """When the next attempt elsewhere started, for every attempt `worker` did not finish."""
    starts = []
    for task in tasks:
        attempts = sorted(task["attempts"], key=lambda a: a["attempt"])
        for attempt, nxt in itertools.pairwise(attempts):
            if attempt["worker"] == worker and nxt["worker"] != worker and nxt.get("started_at"):
                starts.append(datetime.fromisoformat(nxt["started_at"]))
    return starts


def describe(starts: list[datetime], since: datetime) -> str:
    if not starts:
        return "no task was in flight"
    delays = [(s - since).total_seconds() for s in starts]
    return (
        f"median {statistics.median(delays):.2f} s, max {max(delays):.2f} s "
        f"over {len(delays)} tasks"
    )


async def _submit_with_replies(
    url: str, namespace: str, tasks: list[dict[str, Any]], replies: Counter[str]
) -> aio_pika.abc.AbstractConnection:
    """Publish every task (confirmed) with its own correlation id and a `reply_to`
    queue of the test's; count the terminal replies per correlation id as they come.
    Returns the connection (closing it ends the count)."""
    connection = await connect(url, f"test-producer-{namespace}")
    channel = await connection.channel()
    inbox = await channel.declare_queue(exclusive=True)

    async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        if message.type == REPLY_RESULT and message.correlation_id:
            replies[message.correlation_id] += 1

    await inbox.consume(on_reply, no_ack=True)
    exchange = await channel.get_exchange(f"{namespace}.submit")
    for start in range(0, len(tasks), 500):
        await asyncio.gather(
            *(
                exchange.publish(
                    aio_pika.Message(
                        json.dumps(task).encode(),
                        correlation_id=f"c{start + i}",
                        reply_to=inbox.name,
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    "default",
                )
                for i, task in enumerate(tasks[start : start + 500])
            )
        )
    return connection


async def running_on(api: TrackerApi, worker: str, at_least: int) -> bool:
    """Whether the tracker shows `worker` running `at_least` tasks."""
    r = await api.http.get("/tasks", params={"status": "running", "limit": 1000})
    return sum(t["worker"] == worker for t in r.json()["tasks"]) >= at_least


async def _holding_when_frozen(
    cluster: Cluster, api: TrackerApi, worker: Service, name: str
) -> None:
    """Leave `worker` frozen while the tracker knows it runs an attempt it has not
    finished. Tasks are short, so one the tracker shows running may be finishing: the
    worker is frozen first (nothing it holds ends now), everything it sent before is
    let reach the tracker, and only then is the tracker asked; if it holds nothing, it
    is thawed and the next moment is tried."""
    inbox = Topology(cluster.namespace).tracker.name
    for _ in range(20):
        await eventually(lambda: running_on(api, name, 2), 30, f"{name} to run known tasks")
        worker.send(signal.SIGSTOP)

        async def delivered() -> bool:
            return await ready_messages(cluster.amqp_url, inbox) == 0

        await eventually(delivered, 10, "what the frozen worker sent to reach the tracker")
        if await running_on(api, name, 1):
            return
        worker.send(signal.SIGCONT)
    raise AssertionError(f"{name} never held an unfinished attempt the tracker knew of")


async def test_nothing_lost_or_recorded_twice_under_chaos(cluster: Cluster) -> None:
    cluster.extra_env["LEVERET_HEARTBEAT_TIMEOUT_S"] = str(HEARTBEAT_TIMEOUT_S)
    cluster.start_tracker()
    cluster.start_scheduler()
    workers = {
        name: cluster.start_worker(name, "--concurrency", "6") for name in ("w1", "w2", "w3", "w4")
    }
    api = TrackerApi(cluster.tracker_url)
    rng = random.Random(2000)
    tasks = [
        {"kind": "echo", "payload": i}
        if i % 2
        else {"kind": "sleep", "payload": round(rng.uniform(0.05, 0.5), 3)}
        for i in range(TASKS)
    ]
    replies: Counter[str] = Counter()
    producer = await _submit_with_replies(cluster.amqp_url, cluster.namespace, tasks, replies)

    async def completed_at_least(n: int) -> bool:
        try:
            return (await api.stats())["counts"]["completed"] >= n
        except httpx.HTTPError:
            return False  # the tracker is being restarted

    work_queue = f"{cluster.namespace}.work.default"
    await eventually(lambda: completed_at_least(150), 60, "150 completed tasks")
    # Each fault strikes while work still waits in the queue (so the workers are busy).
    assert await ready_messages(cluster.amqp_url, work_queue) > 0
    await _holding_when_frozen(cluster, api, workers["w1"], "w1")
    killed_at = datetime.now(UTC)
    workers["w1"].send(signal.SIGKILL)

    async def w1_released() -> bool:
        # Nothing shows as running on w1 any more: what it held runs (or ran) elsewhere.
        # Waiting for it keeps the next fault from striking the same tasks.
        try:
            r = await api.http.get("/tasks", params={"status": "running", "limit": 1000})
        except httpx.HTTPError:
            return False
        return all(t["worker"] != "w1" for t in r.json()["tasks"])

    await eventually(w1_released, 30, "w1's tasks to be taken by other workers")
    await eventually(lambda: completed_at_least(450), 60, "450 completed tasks")
    assert await ready_messages(cluster.amqp_url, work_queue) > 0
    # The tracker hears of an attempt only in the worker's next `task.started` flush
    # (every 200 ms): freeze w2 when it is known to hold some, or it may hold only
    # attempts nobody heard of, and the test would prove nothing.
    await eventually(lambda: running_on(api, "w2", 2), 30, "w2 to run tasks the tracker knows of")
    frozen_at = datetime.now(UTC)
    workers["w2"].send(signal.SIGSTOP)

    # While w2 is frozen, the tracker itself dies and comes back.
    tracker = next(s for s in cluster.services if s.name == "tracker")
    tracker.send(signal.SIGKILL)
    assert tracker.proc.wait(10) == -signal.SIGKILL
    await asyncio.to_thread(cluster.start_tracker)

    async def w2_fenced() -> bool:
        # Fenced by the watchdog (its connection closed), not merely shown `dead` for
        # its silence: a slow tracker restart makes it look dead before it is fenced.
        try:
            w2 = next((w for w in await api.workers() if w["id"] == "w2"), {})
        except httpx.HTTPError:
            return False
        return w2.get("death") == "fenced"

    await eventually(w2_fenced, HEARTBEAT_TIMEOUT_S * 4 + 30, "w2 to be fenced")
    workers["w2"].send(signal.SIGCONT)

    async def all_done() -> bool:
        counts = (await api.stats())["counts"]
        return counts["completed"] + counts["failed"] >= TASKS

    await eventually(all_done, 180, f"{TASKS} tasks to finish", interval_s=0.25)

    async def every_producer_answered() -> bool:
        return len(replies) >= TASKS

    await eventually(every_producer_answered, 30, f"{TASKS} producers to get a reply")
    listed = await api.all_tasks()
    recorded = await api.tasks_in_full([t["id"] for t in listed])
    stats = await api.stats()
    w2 = next(w for w in await api.workers() if w["id"] == "w2")
    await api.close()
    await producer.close()

    assert len(recorded) == TASKS
    assert len({t["id"] for t in recorded}) == TASKS
    assert stats["counts"]["completed"] == TASKS, stats["counts"]
    assert all(t["status"] == "completed" for t in recorded)
    # Every producer got exactly one terminal reply, though some tasks ran twice.
    doubled = {c: n for c, n in replies.items() if n != 1}
    assert not doubled, f"{len(doubled)} producers got more than one reply: {doubled}"
    assert len(replies) == TASKS
    # A result of an attempt the tracker wrote off never became the task's result.
    for t in recorded:
        for a in t["attempts"]:
            if a.get("outcome") in ("lost", "fenced"):
                assert a["attempt"] != t["attempt"], t
    ran_twice = sum(1 for t in recorded if t["attempt"] > 1 or len(t["attempts"]) > 1)
    crash = reassigned_starts(recorded, "w1")
    hang = reassigned_starts(recorded, "w2")
    per_1000 = 1000 * ran_twice / TASKS
    report(f"chaos: {TASKS} tasks, {ran_twice} ran more than once ({per_1000:.1f} per 1000)")
    report(f"chaos: reassignment after SIGKILL: {describe(crash, killed_at)}")
    report(
        f"chaos: reassignment after SIGSTOP (timeout {HEARTBEAT_TIMEOUT_S} s, tracker "
        f"restarted meanwhile): {describe(hang, frozen_at)}"
    )
    assert crash, "the killed worker held no task: the test did not test anything"
    assert hang, "the frozen worker held no task: the test did not test anything"
    # Order, not speed: what the killed worker held started elsewhere after the kill.
    assert min(crash) > killed_at, (killed_at, sorted(crash)[:3])
    # The frozen worker was fenced after a heartbeat timeout of silence, and what it
    # held started elsewhere only after that.
    dead_at = datetime.fromisoformat(w2["dead_at"])
    assert w2["death"] == "fenced", w2
    assert (dead_at - datetime.fromisoformat(w2["last_seen"])).total_seconds() >= (
        HEARTBEAT_TIMEOUT_S
    ), w2
    assert min(hang) >= dead_at > frozen_at, (frozen_at, dead_at, sorted(hang)[:3])
    # A sanity bound, not a goal: nothing stranded for long.
    assert max(hang) - frozen_at < timedelta(seconds=HEARTBEAT_TIMEOUT_S * 4 + 60)
    # The frozen worker came back under a new registration and worked again.
    assert "re-registering as w2~2" in workers["w2"].log()
