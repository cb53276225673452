"""How fast a task held by a dead or hung worker starts elsewhere, over several trials.

Crash (SIGKILL): the broker requeues the worker's deliveries when its TCP
connection drops. Hang (SIGSTOP): the connection stays up; the tracker notices the
missing heartbeats and closes that connection through the management API.
"""

from __future__ import annotations

import asyncio
import signal
import statistics
from datetime import UTC, datetime

import httpx
import pytest
from helpers import TrackerApi, eventually, report

from leveret.cli.procs import Cluster

pytestmark = [pytest.mark.broker, pytest.mark.chaos]

TRIALS = 3
HEARTBEAT_TIMEOUT_S = 3.0


async def _trial(cluster: Cluster, api: TrackerApi, sig: signal.Signals, trial: int) -> float:
    """One long task on a lone victim; once it runs there, start a rescuer and hit the
    victim. Returns seconds from the hit to the task starting on the rescuer."""
    victim = cluster.start_worker(f"victim{trial}", "--concurrency", "1")
    async with httpx.AsyncClient(base_url=cluster.scheduler_url) as http:
        r = await http.post("/tasks", json={"kind": "sleep", "payload": 4})
    task_id = r.json()["id"]

    async def running_on_victim() -> bool:
        state = await api.task(task_id)
        return state.get("status") == "running" and state.get("worker") == victim.name

    await eventually(running_on_victim, 30, f"{victim.name} to run the task")
    rescuer = await asyncio.to_thread(cluster.start_worker, f"rescuer{trial}", "--concurrency", "1")
    hit_at = datetime.now(UTC)
    victim.send(sig)

    async def done() -> bool:
        return (await api.task(task_id)).get("status") == "completed"

    await eventually(done, 30, "the task to complete elsewhere")
    state = await api.task(task_id)
    victim.send(signal.SIGKILL)
    victim.send(signal.SIGCONT)
    rescuer.stop(10)
    assert state["worker"] == rescuer.name, state
    return (datetime.fromisoformat(state["started_at"]) - hit_at).total_seconds()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["crash", "hang"])
async def test_reassignment_time(cluster: Cluster, sig: signal.Signals) -> None:
    cluster.extra_env["LEVERET_HEARTBEAT_TIMEOUT_S"] = str(HEARTBEAT_TIMEOUT_S)
    cluster.start_tracker()
    cluster.start_scheduler()
    api = TrackerApi(cluster.tracker_url)
    delays = [await _trial(cluster, api, sig, trial) for trial in range(TRIALS)]
    await api.close()
    label = "SIGKILL" if sig == signal.SIGKILL else f"SIGSTOP (timeout {HEARTBEAT_TIMEOUT_S} s)"
    report(
        f"reassignment after {label}: median {statistics.median(delays):.2f} s, "
        f"max {max(delays):.2f} s over {TRIALS} trials"
    )
    # Goals: crash <= 1 s; hang <= timeout + 2 s. The bound on the worst trial keeps
    # a second of slack for a loaded CI machine; the median must meet the goal.
    goal = 1.0 if sig == signal.SIGKILL else HEARTBEAT_TIMEOUT_S + 2
    assert statistics.median(delays) <= goal, delays
    assert max(delays) <= goal + 1, delays
