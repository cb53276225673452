"""Retries with exponential backoff, held by the broker, never by a worker."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

import pytest
from helpers import TrackerApi, eventually

from leveret.amqp import connect
from leveret.cli.procs import Cluster
from leveret.client import Client
from leveret.contracts import TaskStatus

pytestmark = pytest.mark.broker

TESTS_DIR = str(Path(__file__).resolve().parents[1])


@pytest.fixture
def retry_cluster(cluster: Cluster) -> Cluster:
    cluster.extra_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (TESTS_DIR, os.environ.get("PYTHONPATH")) if p
    )
    cluster.start_tracker()
    cluster.start_scheduler()
    cluster.start_worker("rw", "--concurrency", "4", "--handlers", "sample_handlers")
    return cluster


async def _parked(c: Cluster, step_s: int) -> int:
    connection = await connect(c.amqp_url, "test-retry-probe")
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(f"{c.namespace}.retry.{step_s}s", passive=True)
        return queue.declaration_result.message_count or 0


async def test_failures_are_retried_with_backoff_held_by_the_broker(retry_cluster: Cluster) -> None:
    c = retry_cluster
    api = TrackerApi(c.tracker_url)
    async with Client(c.amqp_url, namespace=c.namespace) as client:
        task_id = await client.submit("flaky", 2, wait=True)  # fails attempts 1 and 2

        async def second_failure() -> bool:
            state = await api.task(task_id)
            return state.get("attempt") == 2 and state.get("status") == "retrying"

        # While it waits for attempt 3 (a 2 s step), the broker holds it, not the worker.
        await eventually(second_failure, 20, "the second failure")
        assert await _parked(c, 2) == 1
        workers = await api.workers()
        assert all(not w["in_flight"] for w in workers), workers
        result = await client.result(task_id, timeout_s=30)
    # Only the final outcome reaches reply_to.
    assert result.status == TaskStatus.COMPLETED
    assert result.result == 3
    assert result.attempt == 3

    async def recorded() -> bool:
        return (await api.task(task_id)).get("status") == "completed"

    await eventually(recorded, 10, "the tracker to record the completion")
    state = await api.task(task_id)
    await api.close()
    attempts = sorted(state["attempts"], key=lambda a: a["attempt"])
    assert [a["attempt"] for a in attempts] == [1, 2, 3]
    starts = [datetime.fromisoformat(a["started_at"]) for a in attempts]
    first_gap = (starts[1] - starts[0]).total_seconds()
    second_gap = (starts[2] - starts[1]).total_seconds()
    print(f"observed backoff: {first_gap:.2f} s, {second_gap:.2f} s")
    assert 0.5 <= first_gap <= 2.0, first_gap  # step 1 s, jitter [0.5, 1] s
    assert 1.0 <= second_gap <= 3.0, second_gap  # step 2 s, jitter [1, 2] s


async def test_retries_run_out_and_the_task_fails(retry_cluster: Cluster) -> None:
    c = retry_cluster
    async with Client(c.amqp_url, namespace=c.namespace) as client:
        task_id = await client.submit("flaky", 99, wait=True)  # the kind allows 3 retries
        quick = await client.submit("fail", "no retries by default", wait=True)
        result = await client.result(task_id, timeout_s=60)
        assert (await client.result(quick, timeout_s=30)).attempt == 1
    assert result.status == TaskStatus.FAILED
    assert result.attempt == 4
    assert result.error is not None and result.error.type == "flaky"
    api = TrackerApi(c.tracker_url)

    async def recorded() -> bool:
        return (await api.task(task_id)).get("status") == "failed"

    await eventually(recorded, 10, "the tracker to record it")
    await api.close()
