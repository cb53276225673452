"""A task that kills its worker on every delivery is stopped by the delivery limit,
dead-lettered, and recorded `failed` by the tracker, which tells the producer."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from helpers import TrackerApi, eventually

from leveret.amqp import connect
from leveret.cli.procs import Cluster
from leveret.client import Client
from leveret.contracts import TaskStatus
from leveret.topology import WORK_DELIVERY_LIMIT

pytestmark = [pytest.mark.broker, pytest.mark.chaos]

TESTS_DIR = str(Path(__file__).resolve().parents[1])


async def test_poison_task_is_dead_lettered_and_reported(cluster: Cluster) -> None:
    cluster.extra_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (TESTS_DIR, os.environ.get("PYTHONPATH")) if p
    )
    cluster.start_tracker()
    cluster.start_scheduler()
    args = ("--concurrency", "1", "--handlers", "sample_handlers")
    worker = cluster.start_worker("p1", *args)
    crashes = 0
    async with Client(cluster.amqp_url, namespace=cluster.namespace) as client:
        poison = await client.submit("die", None, wait=True)
        outcome = asyncio.ensure_future(client.result(poison, timeout_s=120))
        deadline = time.monotonic() + 120
        # Play supervisor: restart the worker each time the poison task kills it.
        while not outcome.done():
            assert time.monotonic() < deadline, "the poison task was never stopped"
            if not worker.alive():
                assert worker.proc.returncode == 17
                crashes += 1
                # Not start_worker: it waits for "ready", and this one may die first.
                name = f"p{crashes + 1}"
                worker = cluster.spawn(name, "worker", "--worker-id", name, *args)
            await asyncio.wait([outcome], timeout=0.1)
        result = outcome.result()
        if crashes <= WORK_DELIVERY_LIMIT:
            # The last delivery killed the worker we started last, before the reply came.
            assert await asyncio.to_thread(worker.proc.wait, 30) == 17
            crashes += 1
            worker = await asyncio.to_thread(cluster.start_worker, "after", *args)
        after = await client.run("echo", "next", timeout_s=30)
    assert result.status == TaskStatus.FAILED
    assert result.error is not None and result.error.type == "poison"
    # The broker delivered it once plus the limit, and each delivery killed a worker.
    deliveries = WORK_DELIVERY_LIMIT + 1
    expected = f"worker crashed {deliveries} times running it (delivery limit reached)"
    assert result.error.message == expected
    assert crashes == WORK_DELIVERY_LIMIT + 1
    assert after.result == "next"

    api = TrackerApi(cluster.tracker_url)

    async def recorded() -> bool:
        state = await api.task(poison)
        return state.get("status") == "failed"

    await eventually(recorded, 10, "the tracker to record the poison task")
    state = await api.task(poison)
    assert state["error"] == {"type": "poison", "message": expected}, state
    await api.close()
    # Nothing sits unnoticed in the dead-letter queue.
    connection = await connect(cluster.amqp_url, "test-poison-probe")
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(f"{cluster.namespace}.dead.letters", passive=True)
        assert queue.declaration_result.message_count == 0
