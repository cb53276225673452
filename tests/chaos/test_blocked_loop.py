"""An async handler that blocks the event loop (``time.sleep(30)`` in ``async def``)
is interrupted by its own worker: its task fails ``blocked_event_loop`` after one
attempt, no worker is fenced, and the short tasks around it all complete, costing
the pool about a second of one worker.

Without the worker's loop monitor (``LEVERET_LOOP_BLOCK_LIMIT_S=0``) the same run
fails: the worker goes silent, the tracker fences it, the task blocks the next
worker, and so on until it is dead-lettered as poison.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from datetime import datetime
from pathlib import Path

import pytest
from helpers import TrackerApi, report

from leveret.cli.procs import Cluster
from leveret.client import Client
from leveret.contracts import SubmitTask, TaskResult, TaskStatus

pytestmark = [pytest.mark.broker, pytest.mark.chaos]

TESTS_DIR = str(Path(__file__).resolve().parents[1])
WORKERS = ("w0", "w1", "w2")
SHORT = 300
SHORT_S = 0.2  # each short task sleeps this long (asyncio.sleep: it yields)
BLOCK_S = 30.0  # the blocking task's time.sleep
#: A bound that catches a stranded task or a pool stalled for the whole block, far
#: above what the run takes (about SHORT * SHORT_S / 12 slots, plus a second).
SANITY_S = 60.0


async def _run(client: Client, tasks: list[SubmitTask]) -> tuple[list[TaskResult], float]:
    """Submit `tasks` (waiting for replies); their results, and how long that took."""
    started = time.monotonic()
    ids = await client.submit_many(tasks, wait=True)
    results = await asyncio.gather(*(client.result(i, timeout_s=SANITY_S) for i in ids))
    return list(results), time.monotonic() - started


def _short(n: int) -> list[SubmitTask]:
    return [SubmitTask(kind="sleep", payload=SHORT_S) for _ in range(n)]


async def test_a_handler_that_blocks_the_loop_fails_alone(cluster: Cluster) -> None:
    cluster.extra_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (TESTS_DIR, os.environ.get("PYTHONPATH")) if p
    )
    cluster.start_tracker()
    cluster.start_scheduler()
    args = ("--concurrency", "4", "--handlers", "blocking_handlers")
    workers = [await asyncio.to_thread(cluster.start_worker, name, *args) for name in WORKERS]
    api = TrackerApi(cluster.tracker_url)
    async with Client(cluster.amqp_url, namespace=cluster.namespace) as client:
        await _run(client, _short(len(WORKERS) * 4))  # warm up every worker
        blocker = SubmitTask(kind="sleep_on_loop", payload=BLOCK_S)
        tasks = [*_short(SHORT // 2), blocker, *_short(SHORT - SHORT // 2)]
        results, with_block_s = await _run(client, tasks)
        _, alone_s = await _run(client, _short(SHORT))
    blocked = results.pop(SHORT // 2)

    # The blocking task failed at once, saying why.
    assert blocked.status == TaskStatus.FAILED, blocked
    assert blocked.error is not None and blocked.error.type == "blocked_event_loop", blocked
    assert "time.sleep" in blocked.error.message and "asyncio.to_thread" in blocked.error.message
    view = await api.task(blocked.id)
    assert [a["outcome"] for a in view["attempts"]] == ["failed"], view["attempts"]
    # The short tasks around it all completed.
    assert [r.status for r in results] == [TaskStatus.COMPLETED] * SHORT
    # No worker was fenced or declared dead, and none had to re-register.
    states = {w["id"]: (w["state"], w["death"]) for w in await api.workers()}
    assert states == {name: ("alive", None) for name in WORKERS}, states
    await api.close()

    # The worker that ran it said which task blocked it, and for how long.
    log = next(w.log() for w in workers if w.name == blocked.worker)
    assert f"by task {blocked.id}" in log
    stalls = [float(s) for s in re.findall(r"event loop ran again after ([0-9.]+) s", log)]
    assert len(stalls) == 1, stalls
    attempt = view["attempts"][0]
    finished, started = (datetime.fromisoformat(attempt[k]) for k in ("finished_at", "started_at"))
    took = (finished - started).total_seconds()
    report(
        f"blocked event loop: time.sleep({BLOCK_S:g}) in an async handler was interrupted "
        f"after {stalls[0]:.2f} s of blocked loop (its attempt {took:.2f} s), failed "
        f"blocked_event_loop after 1 attempt, no worker fenced; {SHORT} short tasks took "
        f"{with_block_s:.1f} s beside it vs {alone_s:.1f} s alone "
        f"(cost {with_block_s - alone_s:+.1f} s)"
    )
