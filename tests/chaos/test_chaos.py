"""The chaos run: 2000 tasks on 4 workers while one worker is SIGKILLed, another is
frozen (SIGSTOP) past the heartbeat timeout and later woken, and the tracker is
SIGKILLed and restarted. Every task must end `completed` exactly once."""

from __future__ import annotations

import asyncio
import random
import signal
import statistics
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from helpers import TrackerApi, eventually, report

from leveret.cli.procs import Cluster

pytestmark = [pytest.mark.broker, pytest.mark.chaos]

TASKS = 2000
HEARTBEAT_TIMEOUT_S = 3.0


def reassignments(tasks: list[dict[str, Any]], worker: str, at: datetime) -> list[float]:
    """Seconds from `at` to the start of the next attempt elsewhere, per task `worker` lost."""
    delays = []
    for task in tasks:
        attempts = sorted(task["attempts"], key=lambda a: a["attempt"])
        for i, attempt in enumerate(attempts):
            if attempt["worker"] != worker or i + 1 >= len(attempts):
                continue
            nxt = attempts[i + 1]
            if nxt["worker"] != worker and nxt.get("started_at"):
                started = datetime.fromisoformat(nxt["started_at"])
                if started >= at:
                    delays.append((started - at).total_seconds())
    return delays


def describe(delays: list[float]) -> str:
    if not delays:
        return "no task was in flight"
    return (
        f"median {statistics.median(delays):.2f} s, max {max(delays):.2f} s "
        f"over {len(delays)} tasks"
    )


async def test_nothing_lost_or_recorded_twice_under_chaos(cluster: Cluster) -> None:
    cluster.extra_env["LEVERET_HEARTBEAT_TIMEOUT_S"] = str(HEARTBEAT_TIMEOUT_S)
    cluster.start_tracker()
    cluster.start_scheduler()
    workers = {
        name: cluster.start_worker(name, "--concurrency", "6") for name in ("w1", "w2", "w3", "w4")
    }
    api = TrackerApi(cluster.tracker_url)
    rng = random.Random(2000)
    tasks = [
        {"kind": "echo", "payload": i}
        if i % 2
        else {"kind": "sleep", "payload": round(rng.uniform(0.05, 0.5), 3)}
        for i in range(TASKS)
    ]
    async with httpx.AsyncClient(base_url=cluster.scheduler_url, timeout=60) as http:
        for start in range(0, TASKS, 500):
            r = await http.post("/tasks/batch", json={"tasks": tasks[start : start + 500]})
            assert r.status_code == 202, r.text

    async def completed_at_least(n: int) -> bool:
        try:
            return (await api.stats())["counts"]["completed"] >= n
        except httpx.HTTPError:
            return False  # the tracker is being restarted

    await eventually(lambda: completed_at_least(150), 60, "150 completed tasks")
    killed_at = datetime.now(UTC)
    workers["w1"].send(signal.SIGKILL)

    await eventually(lambda: completed_at_least(450), 60, "450 completed tasks")
    frozen_at = datetime.now(UTC)
    workers["w2"].send(signal.SIGSTOP)

    # While w2 is frozen, the tracker itself dies and comes back.
    tracker = next(s for s in cluster.services if s.name == "tracker")
    tracker.send(signal.SIGKILL)
    assert tracker.proc.wait(10) == -signal.SIGKILL
    await asyncio.to_thread(cluster.start_tracker)

    async def w2_declared_dead() -> bool:
        try:
            states = {w["id"]: w["state"] for w in await api.workers()}
        except httpx.HTTPError:
            return False
        return states.get("w2") == "dead"

    await eventually(w2_declared_dead, HEARTBEAT_TIMEOUT_S * 4 + 10, "w2 to be declared dead")
    workers["w2"].send(signal.SIGCONT)

    async def all_done() -> bool:
        counts = (await api.stats())["counts"]
        return counts["completed"] + counts["failed"] >= TASKS

    await eventually(all_done, 180, f"{TASKS} tasks to finish", interval_s=0.25)
    listed = await api.all_tasks()
    recorded = await api.tasks_in_full([t["id"] for t in listed])
    stats = await api.stats()
    await api.close()

    assert len(recorded) == TASKS
    assert len({t["id"] for t in recorded}) == TASKS
    assert stats["counts"]["completed"] == TASKS, stats["counts"]
    assert all(t["status"] == "completed" for t in recorded)
    # A result of an attempt the tracker wrote off never became the task's result.
    for t in recorded:
        for a in t["attempts"]:
            if a.get("outcome") == "lost":
                assert a["attempt"] != t["attempt"], t
    ran_twice = sum(1 for t in recorded if t["attempt"] > 1 or len(t["attempts"]) > 1)
    crash = reassignments(recorded, "w1", killed_at)
    hang = reassignments(recorded, "w2", frozen_at)
    per_1000 = 1000 * ran_twice / TASKS
    report(f"chaos: {TASKS} tasks, {ran_twice} ran more than once ({per_1000:.1f} per 1000)")
    report(f"chaos: reassignment after SIGKILL: {describe(crash)}")
    report(f"chaos: reassignment after SIGSTOP (timeout {HEARTBEAT_TIMEOUT_S} s): {describe(hang)}")
    assert crash, "the killed worker held no task: the test did not test anything"
    assert hang, "the frozen worker held no task: the test did not test anything"
    assert max(hang) <= HEARTBEAT_TIMEOUT_S + 2 + 2  # detection + close + a watchdog tick
    # The frozen worker came back under a new registration and worked again.
    assert "re-registering as w2~2" in workers["w2"].log()
