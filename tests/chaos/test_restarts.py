"""Services restarted under load lose nothing: the scheduler killed mid-submission,
and the broker itself restarted (a private node, never the shared one)."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections import Counter

import aio_pika
import httpx
import pytest
from helpers import TrackerApi, eventually, report

from leveret.amqp import connect
from leveret.cli.procs import Cluster

pytestmark = [pytest.mark.broker, pytest.mark.chaos]


async def _count_results(
    url: str, namespace: str, counts: Counter[str], ready: asyncio.Event, stop: asyncio.Event
) -> None:
    """Count every result published on the results exchange, by task id."""
    connection = await connect(url, f"test-results-{namespace}")
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(f"{namespace}.results")
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(exchange, "#")

        async def on_result(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            counts[json.loads(message.body)["id"]] += 1

        await queue.consume(on_result, no_ack=True)
        ready.set()
        await stop.wait()


async def test_scheduler_killed_mid_submission_loses_and_doubles_nothing(cluster: Cluster) -> None:
    cluster.start_tracker()
    scheduler = cluster.start_scheduler()
    cluster.start_worker("w1", "--concurrency", "16")
    counts: Counter[str] = Counter()
    ready, stop = asyncio.Event(), asyncio.Event()
    counter = asyncio.ensure_future(
        _count_results(cluster.amqp_url, cluster.namespace, counts, ready, stop)
    )
    await ready.wait()
    accepted: list[str] = []
    refused = 0
    async with httpx.AsyncClient(base_url=cluster.scheduler_url, timeout=5) as http:
        for i in range(600):
            if i == 200:
                scheduler.send(signal.SIGKILL)
            if i == 260:
                scheduler = await asyncio.to_thread(cluster.start_scheduler)
            task_id = f"sub-{i}-{uuid.uuid4().hex[:6]}"
            try:
                r = await http.post("/tasks", json={"kind": "echo", "payload": i, "id": task_id})
            except httpx.HTTPError:
                refused += 1
                continue
            if r.status_code == 202:
                accepted.append(task_id)
            else:
                refused += 1
    api = TrackerApi(cluster.tracker_url)

    async def all_recorded() -> bool:
        return (await api.stats())["counts"]["completed"] >= len(accepted)

    await eventually(all_recorded, 60, f"{len(accepted)} accepted tasks to complete")
    states = await api.tasks_in_full(accepted)
    await api.close()

    async def all_counted() -> bool:
        return all(counts[t] for t in accepted)

    await eventually(all_counted, 20, "a result for every accepted task")
    stop.set()
    await counter
    assert all(s.get("status") == "completed" for s in states)
    doubled = [t for t in accepted if counts[t] > 1]
    report(
        f"scheduler kill: {len(accepted)} accepted, {refused} refused while it was down, "
        f"{len(doubled)} run twice"
    )
    assert not doubled
    assert refused > 0, "the kill did not interrupt submissions"


async def test_broker_restart_loses_nothing(private_broker, tmp_path) -> None:  # type: ignore[no-untyped-def]
    cluster = Cluster(
        namespace=f"t{uuid.uuid4().hex[:8]}",
        amqp_url=private_broker.url,
        workdir=tmp_path / "cluster",
        extra_env={"LEVERET_MANAGEMENT_URL": private_broker.management_url},
    )
    try:
        cluster.start_tracker()
        cluster.start_scheduler()
        for name in ("b1", "b2"):
            cluster.start_worker(name, "--concurrency", "8")
        tasks = [{"kind": "sleep", "payload": 0.05} for _ in range(600)]
        async with httpx.AsyncClient(base_url=cluster.scheduler_url, timeout=30) as http:
            r = await http.post("/tasks/batch", json={"tasks": tasks})
            assert r.status_code == 202
        api = TrackerApi(cluster.tracker_url)

        async def completed(n: int) -> bool:
            try:
                return (await api.stats())["counts"]["completed"] >= n
            except httpx.HTTPError:
                return False

        await eventually(lambda: completed(100), 60, "100 completed tasks")
        await asyncio.to_thread(private_broker.restart)
        await eventually(lambda: completed(600), 120, "all 600 tasks after the broker restart")
        stats = await api.stats()
        await api.close()
        assert stats["counts"]["completed"] == 600
        for service in cluster.services:
            assert service.alive(), f"{service.name} died:\n{service.log()[-2000:]}"
    finally:
        codes = cluster.stop_all()
    assert all(code == 0 for code in codes.values()), codes
