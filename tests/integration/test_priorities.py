"""Priority bands and even distribution, on real workers."""

from __future__ import annotations

from collections import Counter
from datetime import datetime

import httpx
import pytest
from helpers import TrackerApi, eventually, report

from leveret.cli.procs import Cluster
from leveret.client import Client
from leveret.contracts import SubmitTask

pytestmark = pytest.mark.broker


async def _all_done(api: TrackerApi, n: int) -> None:
    async def done() -> bool:
        counts = (await api.stats())["counts"]
        return counts["completed"] + counts["failed"] >= n

    await eventually(done, 120, f"{n} tasks to finish", interval_s=0.1)


async def test_high_priority_overtakes_a_low_backlog(cluster: Cluster) -> None:
    cluster.start_tracker()
    cluster.start_scheduler()
    api = TrackerApi(cluster.tracker_url)
    async with httpx.AsyncClient(base_url=cluster.scheduler_url) as http:
        backlog = [{"kind": "sleep", "payload": 0.05, "priority": 1} for _ in range(30)]
        r = await http.post("/tasks/batch", json={"tasks": backlog})
        low_ids = [t["id"] for t in r.json()["tasks"]]
        # The worker starts only now: the whole low backlog is queued before it.
        cluster.start_worker("solo", "--concurrency", "1")

        async def some_started() -> bool:
            return (await api.stats())["counts"]["completed"] >= 3

        await eventually(some_started, 30, "the backlog to start")
        r = await http.post("/tasks", json={"kind": "echo", "payload": "vip", "priority": 9})
        high_id = r.json()["id"]
    async with Client(cluster.amqp_url, namespace=cluster.namespace) as client:
        [amqp_high] = await client.submit_many([SubmitTask(kind="echo", priority=8)])
    await _all_done(api, 32)
    states = await api.tasks_in_full([*low_ids, high_id, amqp_high])
    await api.close()
    order = sorted(states, key=lambda s: datetime.fromisoformat(s["started_at"]))
    ids = [s["id"] for s in order]
    lows_after = len(ids) - 1 - ids.index(high_id)
    report(
        f"priority: HTTP high task started at position {ids.index(high_id) + 1} of {len(ids)} "
        f"({lows_after} tasks after it); AMQP high at {ids.index(amqp_high) + 1}"
    )
    # Submitted after ~3 lows had run, it may wait for the one running and one more.
    assert ids.index(high_id) <= 6
    assert ids.index(amqp_high) <= 8


async def test_low_priority_is_not_starved(cluster: Cluster) -> None:
    cluster.start_tracker()
    cluster.start_scheduler()
    api = TrackerApi(cluster.tracker_url)
    async with httpx.AsyncClient(base_url=cluster.scheduler_url) as http:
        lows = [{"kind": "sleep", "payload": 0.02, "priority": 0} for _ in range(3)]
        highs = [{"kind": "sleep", "payload": 0.02, "priority": 9} for _ in range(60)]
        r = await http.post("/tasks/batch", json={"tasks": lows + highs})
    ids = [t["id"] for t in r.json()["tasks"]]
    cluster.start_worker("solo", "--concurrency", "1")
    await _all_done(api, 63)
    states = await api.tasks_in_full(ids)
    await api.close()
    started = {s["id"]: datetime.fromisoformat(s["started_at"]) for s in states}
    last_high = max(started[i] for i in ids[3:])
    assert all(started[i] < last_high for i in ids[:3]), "low tasks waited for every high one"


async def test_equal_workers_get_equal_shares(cluster: Cluster) -> None:
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
    assert all(abs(n - 100) <= 25 for n in shares.values()), shares
