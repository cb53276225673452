"""Priority bands and even distribution, on real workers."""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from helpers import TrackerApi, eventually, ready_messages, report

from leveret.cli.procs import Cluster
from leveret.client import Client
from leveret.contracts import SubmitTask
from leveret.topology import Band, Topology

pytestmark = pytest.mark.broker


async def _all_done(api: TrackerApi, n: int) -> None:
    async def done() -> bool:
        counts = (await api.stats())["counts"]
        return counts["completed"] + counts["failed"] >= n

    await eventually(done, 120, f"{n} tasks to finish", interval_s=0.1)


def _start_order(states: list[dict]) -> list[str]:
    return [s["id"] for s in sorted(states, key=lambda s: datetime.fromisoformat(s["started_at"]))]


async def test_high_priority_overtakes_a_low_backlog(cluster: Cluster, tmp_path: Path) -> None:
    """A high task that reached the worker waits for at most one other task to start
    (the band weights, 6 : 3 : 1): here it starts before every task of a low backlog
    queued ahead of it, however slow the machine is."""
    cluster.start_tracker()
    cluster.start_scheduler()
    cluster.start_worker("solo", "--concurrency", "1", "--shell")
    api = TrackerApi(cluster.tracker_url)
    release = tmp_path / "release"
    high_queue = Topology(cluster.namespace).work("default", Band.HIGH).name
    try:
        async with httpx.AsyncClient(base_url=cluster.scheduler_url) as http:
            # The only slot is taken by a low task that runs until the test releases it.
            gate = {"kind": "shell", "payload": f"while [ ! -e {release} ]; do sleep 0.02; done"}
            r = await http.post("/tasks", json={**gate, "priority": 1})
            gate_id = r.json()["id"]
            await eventually(
                lambda: _status_is(api, gate_id, "running"), 30, "the gate task to run"
            )
            backlog = [{"kind": "sleep", "payload": 0.02, "priority": 1} for _ in range(30)]
            r = await http.post("/tasks/batch", json={"tasks": backlog})
            low_ids = [t["id"] for t in r.json()["tasks"]]
            r = await http.post("/tasks", json={"kind": "echo", "payload": "vip", "priority": 9})
            high_id = r.json()["id"]

        async def delivered() -> bool:  # the high task waits on the worker for the slot
            return await ready_messages(cluster.amqp_url, high_queue) == 0

        await eventually(delivered, 30, "the high task to reach the worker")
        async with Client(cluster.amqp_url, namespace=cluster.namespace) as client:
            [amqp_high] = await client.submit_many([SubmitTask(kind="echo", priority=8)])
        # Precondition: the whole backlog is queued behind the gate when the slot frees.
        assert (await api.task(gate_id))["status"] == "running"
        release.touch()
        await _all_done(api, 33)
        states = await api.tasks_in_full([gate_id, *low_ids, high_id, amqp_high])
    finally:
        release.touch()
        await api.close()
    assert {s["status"] for s in states} == {"completed"}
    ids = _start_order(states)
    report(
        f"priority: behind a running low task and 30 queued lows, the HTTP high task started "
        f"at position {ids.index(high_id) + 1} of {len(ids)}, the AMQP high one at "
        f"{ids.index(amqp_high) + 1}"
    )
    assert ids[:2] == [gate_id, high_id]  # next after the running task, before every low
    # The second high task reaches the worker once the first is done (prefetch 1): it may
    # wait for one low task at most.
    assert ids.index(amqp_high) <= 3


async def test_low_priority_is_not_starved(cluster: Cluster) -> None:
    """Every band gets slots while a bigger band has work: low and normal tasks start
    long before a high backlog queued with them is done."""
    cluster.start_tracker()
    cluster.start_scheduler()
    api = TrackerApi(cluster.tracker_url)
    async with httpx.AsyncClient(base_url=cluster.scheduler_url) as http:
        lows = [{"kind": "sleep", "payload": 0.02, "priority": 0} for _ in range(3)]
        normals = [{"kind": "sleep", "payload": 0.02, "priority": 4} for _ in range(6)]
        highs = [{"kind": "sleep", "payload": 0.02, "priority": 9} for _ in range(60)]
        r = await http.post("/tasks/batch", json={"tasks": lows + normals + highs})
    ids = [t["id"] for t in r.json()["tasks"]]
    low_ids, normal_ids, high_ids = ids[:3], ids[3:9], ids[9:]
    # The worker starts only now: every band has its whole backlog queued.
    cluster.start_worker("solo", "--concurrency", "1")
    await _all_done(api, len(ids))
    states = await api.tasks_in_full(ids)
    await api.close()
    order = _start_order(states)
    position = {task_id: order.index(task_id) + 1 for task_id in ids}
    last_high = max(position[i] for i in high_ids)
    report(
        f"bands on one slot, 3 low + 6 normal + 60 high queued: lows started at "
        f"{sorted(position[i] for i in low_ids)}, normals at "
        f"{sorted(position[i] for i in normal_ids)}, last high at {last_high}"
    )
    assert all(position[i] < last_high for i in low_ids), "low tasks waited for every high one"
    assert all(position[i] < last_high for i in normal_ids), "normal tasks waited for the highs"


async def test_equal_workers_get_equal_shares(cluster: Cluster) -> None:
    """Every worker gets a fair part of the work (each consumes with prefetch = its
    concurrency). The exact shares depend on how the machine schedules the workers; the
    bound only catches a worker left out or nearly so."""
    cluster.start_tracker()
    cluster.start_scheduler()
    for name in ("e1", "e2", "e3"):
        cluster.start_worker(name, "--concurrency", "2")
    api = TrackerApi(cluster.tracker_url)
    tasks = [{"kind": "sleep", "payload": 0.01} for _ in range(300)]
    async with httpx.AsyncClient(base_url=cluster.scheduler_url) as http:
        r = await http.post("/tasks/batch", json={"tasks": tasks})
    ids = [t["id"] for t in r.json()["tasks"]]
    await _all_done(api, 300)
    states = await api.tasks_in_full(ids)
    await api.close()
    shares = Counter(s["worker"] for s in states)
    report(f"distribution: 300 equal tasks on 3 equal workers: {dict(sorted(shares.items()))}")
    assert set(shares) == {"e1", "e2", "e3"}
    assert sum(shares.values()) == 300
    assert min(shares.values()) >= 300 // 3 // 3, shares  # at least a third of a fair share


async def _status_is(api: TrackerApi, task_id: str, status: str) -> bool:
    return (await api.task(task_id)).get("status") == status
