"""Cluster-wide limits per kind: across all workers together, not per worker.

A limited kind has a single-active-consumer queue (see leveret.worker.limits): the
broker lets one worker at a time take its tasks, with a prefetch of `max_running`
and a start pacer of `max_starts_per_s`. The tests judge the limits by the attempt
history the tracker recorded (the workers' own start and finish times), as
invariants rather than timings: at no instant more than `max_running` attempts ran,
and no 1 s window holds more than `max_starts_per_s` starts (+1 for the window's
boundary and the timestamps' jitter). Observed rates are reported, not asserted.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pika
import pytest
from helpers import TrackerApi, eventually, report

from leveret.cli.procs import Cluster
from leveret.contracts import utcnow
from leveret.topology import Topology

pytestmark = pytest.mark.broker

TESTS_DIR = str(Path(__file__).resolve().parents[1])


@pytest.fixture
def limits_cluster(cluster: Cluster) -> Iterator[Cluster]:
    """The cluster; afterwards its limited kinds' queues are deleted too (the namespace
    clean-up does not know them)."""
    yield cluster
    cluster.stop_all(timeout_s=15)
    topology = Topology(cluster.namespace)
    params = pika.URLParameters(cluster.amqp_url)
    params.client_properties = {"connection_name": f"test-cleanup-{cluster.namespace}"}
    connection = pika.BlockingConnection(params)
    try:
        channel = connection.channel()
        for kind in ("sleep", "echo", "paced"):
            channel.queue_delete(topology.limited("default", kind).name)
    finally:
        connection.close()


async def _submit(cluster: Cluster, tasks: list[dict[str, Any]]) -> list[str]:
    async with httpx.AsyncClient(base_url=cluster.scheduler_url, timeout=10) as http:
        r = await http.post("/tasks/batch", json={"tasks": tasks})
    assert r.status_code == 202, r.text
    return [t["id"] for t in r.json()["tasks"]]


async def _all_completed(cluster: Cluster, ids: list[str]) -> list[dict[str, Any]]:
    """Wait until the tracker records every task completed; their full records."""
    api = TrackerApi(cluster.tracker_url)
    states: list[dict[str, Any]] = []

    async def done() -> bool:
        nonlocal states
        states = await api.tasks_in_full(ids)
        return all(s.get("status") == "completed" for s in states)

    try:
        await eventually(done, 90, "every task to complete", interval_s=0.2)
    finally:
        await api.close()
    return states


def _at(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp)


def _runs(states: list[dict[str, Any]], killed_at: datetime | None = None) -> list[dict[str, Any]]:
    """Every attempt with its start and end. An attempt lost with its killed worker
    ended when the worker was killed (`killed_at`, taken just before the signal), not
    when the tracker wrote it off seconds later."""
    runs = []
    for state in states:
        for a in state["attempts"]:
            start, end = _at(a["started_at"]), _at(a["finished_at"])
            if a["outcome"] == "lost":
                assert killed_at is not None, a
                end = max(start, min(end, killed_at))
            runs.append({**a, "start": start, "end": end})
    return runs


def _peak_running(runs: list[dict[str, Any]]) -> int:
    """The most attempts running at any one instant (an end before a start at a tie)."""
    edges = sorted([(r["start"], 1) for r in runs] + [(r["end"], -1) for r in runs])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


def _most_starts_in_1s(runs: list[dict[str, Any]]) -> int:
    """The most attempt starts in any window [t, t + 1 s)."""
    starts = sorted(r["start"] for r in runs)
    window = timedelta(seconds=1)
    return max(sum(1 for s in starts[i:] if s < t + window) for i, t in enumerate(starts))


def _rate(runs: list[dict[str, Any]]) -> float:
    starts = sorted(r["start"] for r in runs)
    return (len(starts) - 1) / max((starts[-1] - starts[0]).total_seconds(), 1e-9)


async def test_running_and_start_rate_limits_hold_across_workers(
    limits_cluster: Cluster,
) -> None:
    """Proves: `--limit sleep:running=2` and `--limit echo:rate=5`, given to three
    workers of 4 slots each, hold for the cluster: one worker (the queue's active
    consumer) runs each kind, never more than 2 sleeps at once, never more than 5
    echo starts in a second."""
    cluster = limits_cluster
    cluster.start_tracker()
    cluster.start_scheduler()
    for name in ("l1", "l2", "l3"):
        cluster.start_worker(
            name, "--concurrency", "4", "--limit", "sleep:running=2", "--limit", "echo:rate=5"
        )
    sleeps = _runs(await _all_completed(cluster, await _submit(cluster, _tasks("sleep", 0.3, 12))))
    echoes = _runs(await _all_completed(cluster, await _submit(cluster, _echoes(16))))
    peak, most = _peak_running(sleeps), _most_starts_in_1s(echoes)
    report(f"limits: sleep max_running=2 -> peak {peak} running at once over 3 workers")
    report(
        f"limits: echo max_starts_per_s=5 -> observed {_rate(echoes):.2f} starts/s over 16 "
        f"tasks, at most {most} in any 1 s"
    )
    assert len(sleeps) == 12 and len(echoes) == 16
    assert len({r["worker"] for r in sleeps}) == 1, sleeps  # the single active consumer
    assert len({r["worker"] for r in echoes}) == 1, echoes
    assert peak <= 2
    assert most <= 5 + 1


async def test_limits_declared_with_the_task_decorator(limits_cluster: Cluster) -> None:
    """Proves: ``@task("paced", max_running=2, max_starts_per_s=5)`` in a handler
    module is a cluster-wide limit without any `--limit` flag: two workers loading
    the module run `paced` through one of them, at most 2 at once and 5 starts a
    second."""
    cluster = limits_cluster
    cluster.extra_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (TESTS_DIR, os.environ.get("PYTHONPATH")) if p
    )
    cluster.start_tracker()
    cluster.start_scheduler()
    for name in ("p1", "p2"):
        cluster.start_worker(name, "--concurrency", "4", "--handlers", "limited_handlers")
    async with httpx.AsyncClient(base_url=cluster.scheduler_url, timeout=10) as http:

        async def known() -> bool:
            # The scheduler learns the kind and its limit from the same announcement.
            return "paced" in (await http.get("/healthz")).json()["kinds"]

        await eventually(known, 20, "the scheduler to learn `paced`")
    runs = _runs(await _all_completed(cluster, await _submit(cluster, _tasks("paced", 0.3, 14))))
    peak, most = _peak_running(runs), _most_starts_in_1s(runs)
    report(
        f"limits: @task(max_running=2, max_starts_per_s=5) -> peak {peak}, "
        f"{_rate(runs):.2f} starts/s, at most {most} in any 1 s"
    )
    assert len(runs) == 14
    assert len({r["worker"] for r in runs}) == 1, runs
    assert peak <= 2
    assert most <= 5 + 1


async def test_a_limit_survives_the_death_of_its_active_worker(limits_cluster: Cluster) -> None:
    """Proves: when the worker that holds a limited kind's queue is SIGKILLed while it
    runs tasks of that kind, the broker hands the queue (and the tasks it held) to
    another worker, every task still completes, and the limit held throughout."""
    cluster = limits_cluster
    cluster.start_tracker()
    cluster.start_scheduler()
    workers = {
        name: cluster.start_worker(name, "--concurrency", "4", "--limit", "sleep:running=2,rate=4")
        for name in ("fa", "fb")
    }
    ids = await _submit(cluster, _tasks("sleep", 2, 10))
    api = TrackerApi(cluster.tracker_url)
    running: list[dict[str, Any]] = []

    async def two_running() -> bool:
        nonlocal running
        running = [s for s in await api.tasks_in_full(ids) if s.get("status") == "running"]
        return len(running) == 2

    await eventually(two_running, 30, "two sleeps to run")
    active = {s["worker"] for s in running}
    assert len(active) == 1, running  # one worker runs the kind
    [victim] = active
    killed_at = utcnow()
    workers[victim].send(signal.SIGKILL)
    workers[victim].proc.wait(10)
    dead_at = utcnow()
    held = {s["id"] for s in running}

    states = await _all_completed(cluster, ids)

    async def written_off() -> bool:
        # The tracker fences the dead worker once its heartbeats stop: its attempts
        # without an outcome become `lost`.
        views = await api.tasks_in_full(ids)
        return all(a["outcome"] is not None for v in views for a in v["attempts"])

    await eventually(written_off, 30, "the dead worker's attempts to be written off")
    states = await api.tasks_in_full(ids)
    await api.close()
    runs = _runs(states, killed_at)
    lost_ids = {s["id"] for s in states if any(a["outcome"] == "lost" for a in s["attempts"])}
    # The precondition: the victim held tasks when it died (attempts lost with it) ...
    assert lost_ids and lost_ids <= held, (lost_ids, held)
    assert all(r["worker"] == victim for r in runs if r["outcome"] == "lost")
    # ... which another worker then ran to completion, like every task after the kill.
    survivor = ({"fa", "fb"} - {victim}).pop()
    for s in states:
        assert s["status"] == "completed" and s["worker"] in {victim, survivor}, s
        if s["id"] in lost_ids:
            assert (s["worker"], s["attempt"]) == (survivor, 2), s
    assert all(r["worker"] == survivor for r in runs if r["start"] > dead_at), runs
    peak, most = _peak_running(runs), _most_starts_in_1s(runs)
    report(
        f"limits: failover of sleep:running=2,rate=4 -> {len(lost_ids)} tasks lost with "
        f"the active worker and rerun; peak {peak}, at most {most} starts in any 1 s"
    )
    assert peak <= 2
    assert most <= 4 + 1


def _tasks(kind: str, payload: float, n: int) -> list[dict[str, Any]]:
    return [{"kind": kind, "payload": payload} for _ in range(n)]


def _echoes(n: int) -> list[dict[str, Any]]:
    return [{"kind": "echo", "payload": i} for i in range(n)]
