"""Handlers report progress; producers see it through reply_to, observers on the events."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import TrackerApi, eventually

from leveret.cli.procs import Cluster
from leveret.client import Client
from leveret.contracts import TaskProgress, TaskStatus

pytestmark = pytest.mark.broker

TESTS_DIR = str(Path(__file__).resolve().parents[1])


@pytest.mark.parametrize("kind", ["steps", "steps_sync"])
async def test_progress_reaches_the_producer(cluster: Cluster, kind: str) -> None:
    cluster.extra_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (TESTS_DIR, os.environ.get("PYTHONPATH")) if p
    )
    cluster.start_tracker()
    cluster.start_scheduler()
    cluster.start_worker("pw", "--concurrency", "2", "--handlers", "sample_handlers")
    seen: list[TaskProgress] = []
    api = TrackerApi(cluster.tracker_url)
    async with Client(cluster.amqp_url, namespace=cluster.namespace) as client:
        task_id = await client.submit(kind, 4, wait=True, on_progress=seen.append)

        async def tracker_shows_progress() -> bool:
            progress = (await api.task(task_id)).get("progress") or {}
            return (progress.get("fraction") or 0) > 0 and bool(progress.get("message"))

        await eventually(tracker_shows_progress, 20, "the tracker to show progress")
        result = await client.result(task_id, timeout_s=30)
    await api.close()
    assert result.status == TaskStatus.COMPLETED
    assert result.result == "done"
    assert len(seen) >= 3, seen
    fractions = [p.fraction for p in seen]
    assert fractions == sorted(fractions)  # the latest report wins; order is kept
    assert seen[-1].message and seen[-1].message.startswith("step ")
    assert all(p.id == result.id and p.worker == "pw" and p.attempt == 1 for p in seen)
