"""A rolling restart never fails a long task.

Each worker stops gracefully (SIGTERM) with a grace period shorter than the task, so
it hands the task back unfinished, and a fresh worker takes it. A hand-back is not a
crash: it must not spend the poison budget (a RabbitMQ 3.10 quorum queue counts a
requeue as a delivery, and its delivery limit dead-letters the task), nor the task's
retries, and the attempt history says what happened to each attempt: `returned`,
never an outcome left `null`. Real crash loops are still stopped: see test_poison.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from helpers import TrackerApi, eventually, report

from leveret.cli.procs import Cluster, Service
from leveret.contracts import TERMINAL_STATUSES
from leveret.topology import WORK_DELIVERY_LIMIT

pytestmark = [pytest.mark.broker, pytest.mark.chaos]

GRACE_S = 0.5
TASK_S = 6.0
#: More graceful stops in a row than the delivery limit lets a task be delivered.
RESTARTS = 5


async def test_rolling_restart_hands_a_long_task_back_without_failing_it(
    cluster: Cluster,
) -> None:
    assert RESTARTS > WORK_DELIVERY_LIMIT  # else the test would not show anything
    cluster.extra_env["LEVERET_GRACE_PERIOD_S"] = str(GRACE_S)
    await asyncio.to_thread(cluster.start_tracker)
    await asyncio.to_thread(cluster.start_scheduler)
    worker = await asyncio.to_thread(cluster.start_worker, "r0", "--concurrency", "1")
    async with httpx.AsyncClient(base_url=cluster.scheduler_url, timeout=30) as http:
        # No retries: a hand-back that spent one would leave the task none.
        task = {"kind": "sleep", "payload": TASK_S, "max_retries": 0}
        r = await http.post("/tasks", json=task)
    assert r.status_code == 202, r.text
    task_id = r.json()["id"]
    api = TrackerApi(cluster.tracker_url)
    began = time.monotonic()
    try:
        for n in range(RESTARTS):
            await _running_on(api, task_id, worker)
            fresh = await asyncio.to_thread(cluster.start_worker, f"r{n + 1}", "--concurrency", "1")
            code = await asyncio.to_thread(worker.stop, 15)  # SIGTERM, then wait
            assert code == 0, f"{worker.name} exited {code}:\n{worker.log()[-2000:]}"
            worker = fresh
        await _running_on(api, task_id, worker)
        state = await api.reach(task_id, "completed", timeout_s=3 * TASK_S)
    finally:
        await api.close()
    took = time.monotonic() - began
    attempts = state["attempts"]
    outcomes = [a["outcome"] for a in attempts]
    report(
        f"rolling restart: {RESTARTS} graceful stops (grace {GRACE_S} s) during a "
        f"{TASK_S:.0f} s task: {state['status']} after {len(attempts)} attempts "
        f"({outcomes.count('returned')} returned) in {took:.1f} s"
    )
    assert state["status"] == "completed" and state["error"] is None, state
    assert outcomes == ["returned"] * RESTARTS + ["completed"], attempts
    assert [a["worker"] for a in attempts] == [f"r{n}" for n in range(RESTARTS + 1)], attempts
    assert all(a["finished_at"] for a in attempts), attempts
    assert state["result"] == TASK_S and state["worker"] == f"r{RESTARTS}", state


async def _running_on(api: TrackerApi, task_id: str, worker: Service) -> dict[str, Any]:
    """The task's view once it runs on `worker`; fails at once if it ended meanwhile."""
    seen: dict[str, Any] = {}

    async def running() -> bool:
        seen.clear()
        seen.update(await api.task(task_id))
        if seen.get("status") in TERMINAL_STATUSES:
            raise AssertionError(f"the task ended while {worker.name} should run it: {seen}")
        return seen.get("status") == "running" and seen.get("worker") == worker.name

    try:
        await eventually(running, 30, f"the task to run on {worker.name}")
    except TimeoutError as exc:
        raise AssertionError(f"{exc} (last seen: {seen})") from None
    return dict(seen)
