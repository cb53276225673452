"""Cluster-wide limits per kind: across all workers together, not per worker."""

from __future__ import annotations

from datetime import datetime

import httpx
import pytest
from helpers import TrackerApi, eventually, report

from leveret.cli.procs import Cluster

pytestmark = pytest.mark.broker


async def _run(cluster: Cluster, tasks: list[dict]) -> list[dict]:
    api = TrackerApi(cluster.tracker_url)
    before = (await api.stats())["counts"]["completed"]
    async with httpx.AsyncClient(base_url=cluster.scheduler_url) as http:
        r = await http.post("/tasks/batch", json={"tasks": tasks})
    ids = [t["id"] for t in r.json()["tasks"]]

    async def done() -> bool:
        return (await api.stats())["counts"]["completed"] >= before + len(ids)

    await eventually(done, 60, "every task to complete", interval_s=0.1)
    states = await api.tasks_in_full(ids)
    await api.close()
    return states


def _max_overlap(states: list[dict]) -> int:
    edges = []
    for s in states:
        edges.append((datetime.fromisoformat(s["started_at"]), 1))
        edges.append((datetime.fromisoformat(s["finished_at"]), -1))
    running = peak = 0
    for _, step in sorted(edges):
        running += step
        peak = max(peak, running)
    return peak


async def test_running_and_start_rate_limits_hold_across_workers(cluster: Cluster) -> None:
    cluster.start_tracker()
    cluster.start_scheduler()
    for name in ("l1", "l2", "l3"):
        cluster.start_worker(
            name, "--concurrency", "4", "--limit", "sleep:running=2", "--limit", "echo:rate=5"
        )
    sleeps = await _run(cluster, [{"kind": "sleep", "payload": 0.3} for _ in range(12)])
    peak = _max_overlap(sleeps)
    echoes = await _run(cluster, [{"kind": "echo", "payload": i} for i in range(16)])
    starts = sorted(datetime.fromisoformat(s["started_at"]) for s in echoes)
    rate = (len(starts) - 1) / (starts[-1] - starts[0]).total_seconds()
    report(f"limits: sleep max_running=2 -> peak {peak} running at once over 3 workers")
    report(f"limits: echo max_starts_per_s=5 -> observed {rate:.2f} starts/s over 16 tasks")
    assert peak <= 2
    assert 4.0 <= rate <= 5.5
