"""Cancelling tasks: a queued one never runs, a running one is stopped on its worker."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from helpers import TrackerApi, eventually

from leveret.cli.procs import Cluster
from leveret.client import Client
from leveret.contracts import TaskStatus

pytestmark = pytest.mark.broker

TESTS_DIR = str(Path(__file__).resolve().parents[1])


@pytest.fixture
def cancel_cluster(cluster: Cluster) -> Cluster:
    cluster.extra_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (TESTS_DIR, os.environ.get("PYTHONPATH")) if p
    )
    cluster.start_tracker()
    cluster.start_scheduler()
    return cluster


async def _cancel(c: Cluster, task_id: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=c.scheduler_url) as http:
        return await http.delete(f"/tasks/{task_id}")


@pytest.mark.parametrize("kind", ["sleep", "block"])  # async, and sync in a child process
async def test_running_task_is_stopped_and_recorded_cancelled(
    cancel_cluster: Cluster, kind: str
) -> None:
    c = cancel_cluster
    c.start_worker("cw", "--concurrency", "2", "--handlers", "sample_handlers")
    api = TrackerApi(c.tracker_url)
    async with Client(c.amqp_url, namespace=c.namespace) as client:
        task_id = await client.submit(kind, 60, wait=True)

        async def running() -> bool:
            return (await api.task(task_id)).get("status") == "running"

        await eventually(running, 20, "the task to run")
        r = await _cancel(c, task_id)
        assert r.status_code == 202, r.text
        result = await client.result(task_id, timeout_s=20)
        after = await client.run("echo", "still working", timeout_s=20)
    assert result.status == TaskStatus.CANCELLED
    assert result.error is not None and result.error.type == "cancelled"
    assert (result.finished_at - result.started_at).total_seconds() < 10
    assert after.result == "still working"

    async def recorded() -> bool:
        return (await api.task(task_id)).get("status") == "cancelled"

    await eventually(recorded, 10, "the tracker to record it cancelled")
    await api.close()


async def test_queued_task_never_runs_even_on_a_worker_that_starts_later(
    cancel_cluster: Cluster,
) -> None:
    c = cancel_cluster
    api = TrackerApi(c.tracker_url)
    async with Client(c.amqp_url, namespace=c.namespace) as client:
        # No worker yet: the task waits in its queue when it is cancelled.
        task_id = await client.submit("echo", "must not run", wait=True)
        r = await _cancel(c, task_id)
        assert r.status_code == 202
        c.start_worker("late", "--concurrency", "1")
        result = await client.result(task_id, timeout_s=20)
    assert result.status == TaskStatus.CANCELLED
    assert result.result is None
    assert (await _cancel(c, "never-submitted")).status_code == 404
    await api.close()


async def test_cancel_over_amqp(cancel_cluster: Cluster) -> None:
    import aio_pika

    c = cancel_cluster
    c.start_worker("aw", "--concurrency", "1")
    async with Client(c.amqp_url, namespace=c.namespace) as client:
        task_id = await client.submit("sleep", 60, wait=True)
        connection = await aio_pika.connect(c.amqp_url)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.get_exchange(f"{c.namespace}.submit")
            body = b'{"id": "' + task_id.encode() + b'", "reason": "changed my mind"}'
            await exchange.publish(aio_pika.Message(body, type="task.cancel"), "default")
        result = await client.result(task_id, timeout_s=30)
    assert result.status == TaskStatus.CANCELLED
    assert result.error is not None and result.error.message == "changed my mind"
