"""User handlers in real workers: sync ones run off the event loop and can be stopped."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from datetime import datetime
from pathlib import Path

import pytest
from helpers import TrackerApi, eventually, report

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
    cluster.start_tracker()  # it sends the terminal replies the client waits for
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
        # Stopped at its timeout (plus starting its child), not after the 60 s it blocks.
        assert (result.finished_at - result.started_at).total_seconds() < 30
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
    """Proves: two sync handlers burning both cores for twice the heartbeat timeout
    (the default, 3 s) do not silence their worker: heartbeats listing both tasks in
    flight keep arriving during the burn, the tracker never declares the worker dead
    (no fencing, no re-registration as `busy~2`), and each task completes on its
    first attempt with nothing lost or reassigned."""
    cluster.extra_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (TESTS_DIR, os.environ.get("PYTHONPATH")) if p
    )
    cluster.start_tracker()
    cluster.start_scheduler()
    cluster.start_worker("busy", "--concurrency", "2", "--handlers", "sample_handlers")
    api = TrackerApi(cluster.tracker_url)
    # last_seen -> in_flight of every heartbeat the tracker showed us, and each state.
    beats: dict[str, list[str]] = {}
    states: set[tuple[str, str]] = set()

    async def watch() -> None:
        while True:
            for w in await api.workers():
                states.add((w["id"], w["state"]))
                if w["id"] == "busy":
                    beats[w["last_seen"]] = sorted(w["in_flight"])
            await asyncio.sleep(0.2)  # sampling interval of the watcher, not a wait

    async with Client(cluster.amqp_url, namespace=cluster.namespace) as client:
        ids = [await client.submit("burn", 6, wait=True) for _ in range(2)]
        watcher = asyncio.create_task(watch())
        try:
            results = [await client.result(task_id, timeout_s=60) for task_id in ids]
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
    for result in results:
        assert result.status == TaskStatus.COMPLETED
        assert (result.attempt, result.worker) == (1, "busy")

    both = sorted(ids)
    during = sorted(datetime.fromisoformat(at) for at, flying in beats.items() if flying == both)
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(during)]
    report(
        f"handlers: {len(during)} heartbeats seen while 2 tasks burned both cores for 6 s; "
        f"largest gap {max(gaps, default=float('nan')):.2f} s; states {sorted(states)}"
    )
    assert len(during) >= 3, beats  # about one a second arrives; 3 is a generous floor

    async def recorded() -> bool:
        views = await api.tasks_in_full(ids)
        return all(v.get("status") == "completed" for v in views)

    await eventually(recorded, 10, "the tracker to record both completions")
    for view in await api.tasks_in_full(ids):
        history = [(a["attempt"], a["worker"], a["outcome"]) for a in view["attempts"]]
        assert history == [(1, "busy", "completed")], view  # nothing lost or reassigned
    workers = await api.workers()
    await api.close()
    assert [(w["id"], w["state"], w["death"], w["dead_at"]) for w in workers] == [
        ("busy", "alive", None, None)
    ]
    assert all(state != "dead" for _, state in states), states
