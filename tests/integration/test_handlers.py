"""User handlers in real workers: sync ones run off the event loop and can be stopped."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import TrackerApi

from leveret.cli.procs import Cluster
from leveret.client import Client
from leveret.contracts import TaskStatus

pytestmark = pytest.mark.broker

TESTS_DIR = str(Path(__file__).resolve().parents[1])


@pytest.fixture
def handlers_cluster(cluster: Cluster) -> Cluster:
    cluster.extra_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (TESTS_DIR, os.environ.get("PYTHONPATH")) if p
    )
    cluster.start_scheduler()
    cluster.start_worker("hw", "--concurrency", "2", "--handlers", "sample_handlers")
    return cluster


async def test_blocking_handler_past_its_timeout_is_stopped(handlers_cluster: Cluster) -> None:
    c = handlers_cluster
    async with Client(c.amqp_url, namespace=c.namespace) as client:
        stuck = await client.submit("block", 60, timeout_s=0.5, wait=True)
        result = await client.result(stuck, timeout_s=20)
        assert result.status == TaskStatus.FAILED
        assert result.error is not None and result.error.type == "timeout"
        assert result.started_at is not None
        assert (result.finished_at - result.started_at).total_seconds() < 5
        # Both slots are usable again: the stuck child was replaced, not leaked.
        ids = [await client.submit("block", 0.1, wait=True) for _ in range(4)]
        for task_id in ids:
            assert (await client.result(task_id, timeout_s=20)).status == TaskStatus.COMPLETED


async def test_handler_context_and_errors(handlers_cluster: Cluster) -> None:
    c = handlers_cluster
    async with Client(c.amqp_url, namespace=c.namespace) as client:
        me = await client.run("whoami", None, timeout_s=20)
        assert me.status == TaskStatus.COMPLETED
        assert me.result["attempt"] == 1
        assert me.result["key"] == me.id
        assert me.result["pid"] != c.services[-1].pid  # ran in a child process
        picky = await client.run("picky", None, timeout_s=20)
        assert picky.error is not None and picky.error.type == "picky"
        crashed = await client.run("die_in_child", None, timeout_s=20)
        assert crashed.status == TaskStatus.FAILED
        assert crashed.error is not None and crashed.error.type == "handler_crashed"
        after = await client.run("echo", "alive", timeout_s=20)
        assert after.result == "alive"


async def test_cpu_bound_handler_does_not_starve_heartbeats(cluster: Cluster) -> None:
    """A handler burning CPU for longer than the heartbeat timeout: the worker stays alive."""
    cluster.extra_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (TESTS_DIR, os.environ.get("PYTHONPATH")) if p
    )
    cluster.extra_env["LEVERET_HEARTBEAT_TIMEOUT_S"] = "1.5"
    cluster.start_tracker()
    cluster.start_scheduler()
    cluster.start_worker("busy", "--concurrency", "2", "--handlers", "sample_handlers")
    api = TrackerApi(cluster.tracker_url)
    async with Client(cluster.amqp_url, namespace=cluster.namespace) as client:
        ids = [await client.submit("burn", 4, wait=True) for _ in range(2)]
        for task_id in ids:
            result = await client.result(task_id, timeout_s=30)
            assert result.status == TaskStatus.COMPLETED
            assert result.attempt == 1
    states = {w["id"]: w["state"] for w in await api.workers()}
    await api.close()
    assert states == {"busy": "alive"}
