"""Retries with exponential backoff, held by the broker, never by a worker."""

from __future__ import annotations

import itertools
import os
from datetime import datetime
from pathlib import Path

import pytest
from helpers import TrackerApi, eventually, report

from leveret.amqp import connect
from leveret.cli.procs import Cluster
from leveret.client import Client
from leveret.contracts import SubmitTask, TaskStatus, utcnow
from leveret.topology import RETRY_STEPS_S

pytestmark = pytest.mark.broker

TESTS_DIR = str(Path(__file__).resolve().parents[1])


@pytest.fixture
def retry_cluster(cluster: Cluster) -> Cluster:
    cluster.extra_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (TESTS_DIR, os.environ.get("PYTHONPATH")) if p
    )
    cluster.start_tracker()
    cluster.start_scheduler()
    cluster.start_worker("rw", "--concurrency", "4", "--handlers", "sample_handlers")
    return cluster


async def _parked(c: Cluster, step_s: int) -> int:
    connection = await connect(c.amqp_url, "test-retry-probe")
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(f"{c.namespace}.retry.{step_s}s", passive=True)
        return queue.declaration_result.message_count or 0


def _at(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp)


def _check_backoff(attempts: list[dict]) -> list[float]:
    """Each retry started no earlier than its failed attempt finished plus half the
    backoff step (the jitter's floor), and no absurdly later; returns the waits."""
    waits = []
    for failed, retry in itertools.pairwise(attempts):
        step = RETRY_STEPS_S[failed["attempt"] - 1]
        wait = (_at(retry["started_at"]) - _at(failed["finished_at"])).total_seconds()
        assert wait >= step / 2 - 0.02, (failed, retry)  # the broker held it that long
        assert wait <= step + 20, (failed, retry)  # sanity bound only
        waits.append(wait)
    return waits


async def test_failures_are_retried_with_backoff_held_by_the_broker(retry_cluster: Cluster) -> None:
    """Proves: a failed attempt with retries left goes back after an exponential,
    jittered delay that the broker holds (the task sits in the step's TTL queue while
    the worker holds nothing), `max_retries` on the task overrides the kind's default,
    and only the final outcome reaches `reply_to`."""
    c = retry_cluster
    api = TrackerApi(c.tracker_url)
    async with Client(c.amqp_url, namespace=c.namespace) as client:
        # Attempts 1-4 fail; the kind allows 3 retries, the task asks for 4.
        [task_id] = await client.submit_many(
            [SubmitTask(kind="flaky", payload=4, max_retries=4)], wait=True
        )
        state: dict = {}

        async def fourth_failure() -> bool:
            nonlocal state
            state = await api.task(task_id)
            return state.get("attempt") == 4 and state.get("status") == "retrying"

        # Attempt 5 waits for the 8 s step (a delay of 4-8 s): meanwhile the broker
        # holds the task, not the worker. A heartbeat sent after the failure shows the
        # worker idle (one sent while it was still confirming the retry may not).
        await eventually(fourth_failure, 40, "the fourth failure")
        failed_at = max(_at(a["finished_at"]) for a in state["attempts"] if a["attempt"] == 4)
        workers: list = []

        async def idle_beat() -> bool:
            nonlocal workers
            workers = await api.workers()
            return any(_at(w["last_seen"]) > failed_at and not w["in_flight"] for w in workers)

        await eventually(idle_beat, 10, "a heartbeat of the idle worker after the failure")
        parked = await _parked(c, 8)
        counted_at = utcnow()  # both observations prove something only before the delay ran out
        assert counted_at < _at(state["retry_at"]), "observed too late to prove anything"
        assert parked == 1
        assert [(w["id"], w["state"], w["in_flight"]) for w in workers] == [("rw", "alive", [])]
        result = await client.result(task_id, timeout_s=40)
    # Only the final outcome reaches reply_to.
    assert result.status == TaskStatus.COMPLETED
    assert result.result == 5
    assert result.attempt == 5

    async def recorded() -> bool:
        return (await api.task(task_id)).get("status") == "completed"

    await eventually(recorded, 10, "the tracker to record the completion")
    state = await api.task(task_id)
    await api.close()
    attempts = sorted(state["attempts"], key=lambda a: a["attempt"])
    assert [(a["attempt"], a["outcome"]) for a in attempts] == [
        *((n, "failed") for n in range(1, 5)),
        (5, "completed"),
    ]
    waits = _check_backoff(attempts)
    report("retries: waits before attempts 2-5 " + ", ".join(f"{w:.2f} s" for w in waits))


async def test_retries_run_out_and_the_task_fails(retry_cluster: Cluster) -> None:
    """Proves: the kind's default `max_retries` (3 for `flaky`) applies when the task
    sets none, after which the task fails with the last attempt's error; a kind
    without retries (`fail`) fails at once."""
    c = retry_cluster
    async with Client(c.amqp_url, namespace=c.namespace) as client:
        task_id = await client.submit("flaky", 99, wait=True)  # the kind allows 3 retries
        quick = await client.submit("fail", "no retries by default", wait=True)
        result = await client.result(task_id, timeout_s=60)
        assert (await client.result(quick, timeout_s=30)).attempt == 1
    assert result.status == TaskStatus.FAILED
    assert result.attempt == 4
    assert result.error is not None and result.error.type == "flaky"
    api = TrackerApi(c.tracker_url)

    async def recorded() -> bool:
        return (await api.task(task_id)).get("status") == "failed"

    await eventually(recorded, 10, "the tracker to record it")
    state = await api.task(task_id)
    await api.close()
    attempts = sorted(state["attempts"], key=lambda a: a["attempt"])
    assert [(a["attempt"], a["outcome"]) for a in attempts] == [(n, "failed") for n in range(1, 5)]
    _check_backoff(attempts)
