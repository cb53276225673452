"""Held tasks on a real broker: dependencies (DAGs, failures, cycles, restarts) and
delayed tasks (`delay_s`, `run_at`), through the HTTP API and plain AMQP."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest
from helpers import TrackerApi, eventually, ready_messages, report

from leveret.cli.procs import Cluster
from leveret.client import Client
from leveret.contracts import SubmitTask, TaskStatus, utcnow
from leveret.topology import Topology

pytestmark = pytest.mark.broker


#: A sanity bound on how late a due task may start: generous, for a loaded machine (the
#: measured lateness is reported; it is tens of milliseconds on an idle one).
LATE_SANITY_S = 10.0


def at(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def uid(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


async def submit_batch(cluster: Cluster, tasks: list[dict[str, Any]]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=cluster.scheduler_url, timeout=10) as http:
        return await http.post("/tasks/batch", json={"tasks": tasks})


async def test_a_dag_in_one_batch_runs_in_dependency_order(cluster: Cluster) -> None:
    cluster.start_tracker()
    cluster.start_scheduler()
    cluster.start_worker("w1", "--concurrency", "4")
    a, b, c, d = (uid(n) for n in "abcd")
    r = await submit_batch(
        cluster,
        [  # children first: a whole DAG is one request, in any order
            {"id": d, "kind": "echo", "payload": "d", "depends_on": [b, c]},
            {"id": b, "kind": "sleep", "payload": 0.2, "depends_on": [a]},
            {"id": c, "kind": "sleep", "payload": 0.4, "depends_on": [a]},
            {"id": a, "kind": "sleep", "payload": 0.5},
        ],
    )
    assert r.status_code == 202, r.text
    assert [t["status"] for t in r.json()["tasks"]] == ["blocked", "blocked", "blocked", "pending"]
    api = TrackerApi(cluster.tracker_url)
    try:
        await api.reach(d, "completed", 30)
        state = {t: await api.task(t) for t in (a, b, c, d)}
    finally:
        await api.close()
    assert sorted(state[d]["depends_on"]) == sorted([b, c])
    parents = {b: [a], c: [a], d: [b, c]}
    latencies = []
    for child, ps in parents.items():
        started = at(state[child]["started_at"])
        last_parent = max(at(state[p]["finished_at"]) for p in ps)
        assert started >= last_parent, f"{child} started before its parents finished"
        latencies.append((started - last_parent).total_seconds())
    assert all(s["status"] == "completed" for s in state.values())
    report(
        "dependency release latency (child start - last parent finish): "
        + ", ".join(f"{x * 1000:.0f} ms" for x in latencies)
        + f" (max {max(latencies) * 1000:.0f} ms)"
    )


async def test_a_failing_parent_fails_its_dependants_transitively(cluster: Cluster) -> None:
    cluster.start_tracker()
    cluster.start_scheduler()
    cluster.start_worker("w1", "--concurrency", "4")
    a, b, c, ok = (uid(n) for n in ("a", "b", "c", "ok"))
    r = await submit_batch(
        cluster,
        [
            {"id": a, "kind": "fail", "payload": "boom"},
            {"id": ok, "kind": "echo"},
            {"id": b, "kind": "echo", "depends_on": [a, ok]},
            {"id": c, "kind": "echo", "depends_on": [b]},
        ],
    )
    assert r.status_code == 202, r.text
    api = TrackerApi(cluster.tracker_url)
    try:
        child = await api.reach(b, "failed")
        grandchild = await api.reach(c, "failed")
        await api.reach(ok, "completed")  # a sibling parent is not affected
    finally:
        await api.close()
    assert child["error"] == {
        "type": "dependency_failed",
        "message": f"parent {a} failed: requested_failure",
    }
    assert grandchild["error"]["type"] == "dependency_failed"
    assert grandchild["error"]["message"] == f"parent {b} failed: dependency_failed"
    assert child["attempts"] == [] and child["started_at"] is None  # never ran


async def test_cycles_and_unknown_parents_are_refused(cluster: Cluster) -> None:
    cluster.start_scheduler()
    async with httpx.AsyncClient(base_url=cluster.scheduler_url, timeout=10) as http:
        r = await http.post(
            "/tasks/batch",
            json={
                "tasks": [
                    {"id": "x", "kind": "echo", "depends_on": ["z"]},
                    {"id": "y", "kind": "echo", "depends_on": ["x"]},
                    {"id": "z", "kind": "echo", "depends_on": ["y"]},
                ]
            },
        )
        assert r.status_code == 422
        detail = r.json()["detail"]
        assert detail["error"] == "dependency_cycle"
        assert "x → z → y → x" in detail["message"]

        r = await http.post("/tasks", json={"id": "self", "kind": "echo", "depends_on": ["self"]})
        assert r.status_code == 422
        assert r.json()["detail"]["error"] == "dependency_cycle"

        r = await http.post("/tasks", json={"kind": "echo", "depends_on": ["never-submitted"]})
        assert r.status_code == 422
        detail = r.json()["detail"]
        assert detail["error"] == "unknown_dependency"
        assert "never-submitted" in detail["message"]

        # Nothing of a refused batch was accepted: its ids are still free.
        r = await http.post("/tasks", json={"id": "x", "kind": "echo"})
        assert r.status_code == 202


async def test_a_chain_over_amqp_as_separate_messages(cluster: Cluster) -> None:
    cluster.start_tracker()
    cluster.start_scheduler()
    cluster.start_worker("w1", "--concurrency", "4")
    a, b, c = (uid(n) for n in "abc")
    async with Client(cluster.amqp_url, namespace=cluster.namespace) as client:
        await client.submit_many([SubmitTask(id=a, kind="sleep", payload=0.3)])
        await client.submit_many(
            [
                SubmitTask(id=b, kind="echo", payload="b", depends_on=[a]),
                SubmitTask(id=c, kind="echo", payload="c", depends_on=[b]),
            ],
            wait=True,
        )
        result = await client.result(c, timeout_s=30)
        assert result.status == TaskStatus.COMPLETED and result.result == "c"
        [orphan] = await client.submit_many(
            [SubmitTask(kind="echo", depends_on=["nobody-knows"])], wait=True
        )
        refused = await client.result(orphan, timeout_s=30)
        assert refused.status == TaskStatus.REJECTED
        assert refused.error is not None and refused.error.type == "unknown_dependency"
    api = TrackerApi(cluster.tracker_url)
    try:
        state = {t: await api.task(t) for t in (a, b, c)}
    finally:
        await api.close()
    assert at(state[b]["started_at"]) >= at(state[a]["finished_at"])
    assert at(state[c]["started_at"]) >= at(state[b]["finished_at"])


async def test_a_delayed_task_starts_on_time_not_before(cluster: Cluster) -> None:
    cluster.start_tracker()
    cluster.start_scheduler()
    cluster.start_worker("w1", "--concurrency", "4")
    task_id = uid("later")
    async with httpx.AsyncClient(base_url=cluster.scheduler_url, timeout=10) as http:
        sent = utcnow()
        r = await http.post("/tasks", json={"id": task_id, "kind": "echo", "delay_s": 2})
    assert r.status_code == 202 and r.json()["status"] == "delayed"
    answered = utcnow()
    api = TrackerApi(cluster.tracker_url)
    try:
        done = await api.reach(task_id, "completed", 30)
    finally:
        await api.close()
    run_at = at(done["run_at"])
    # Due 2 s after the scheduler took it, which was between sending and the answer.
    assert sent + timedelta(seconds=2) <= run_at <= answered + timedelta(seconds=2)
    started = at(done["started_at"])
    error_s = (started - run_at).total_seconds()
    assert started >= run_at, f"started {-error_s:.3f} s early"
    assert error_s < LATE_SANITY_S, f"started {error_s:.3f} s late"
    report(f"delayed task (delay_s=2): started {error_s * 1000:.0f} ms after its due time")


async def test_run_at_naive_is_utc_and_is_honoured(cluster: Cluster) -> None:
    cluster.start_tracker()
    cluster.start_scheduler()
    cluster.start_worker("w1", "--concurrency", "4")
    due = utcnow() + timedelta(seconds=3)  # still ahead when the batch arrives, even if slow
    naive = due.replace(tzinfo=None).isoformat()
    aware = (due + timedelta(seconds=0.5)).astimezone().isoformat()  # local offset
    first, second = uid("naive"), uid("aware")
    r = await submit_batch(
        cluster,
        [
            {"id": first, "kind": "echo", "run_at": naive},
            {"id": second, "kind": "echo", "run_at": aware},
            {"id": uid("past"), "kind": "echo", "run_at": "2000-01-01T00:00:00Z"},
        ],
    )
    assert [t["status"] for t in r.json()["tasks"]] == ["delayed", "delayed", "pending"]
    api = TrackerApi(cluster.tracker_url)
    try:
        errors = []
        for task_id, expected in ((first, due), (second, due + timedelta(seconds=0.5))):
            done = await api.reach(task_id, "completed", 30)
            assert abs((at(done["run_at"]) - expected).total_seconds()) < 0.001
            error_s = (at(done["started_at"]) - expected).total_seconds()
            assert 0 <= error_s < LATE_SANITY_S, f"{task_id} started {error_s:.3f} s after run_at"
            errors.append(error_s)
    finally:
        await api.close()
    report("run_at tasks: started " + ", ".join(f"{e * 1000:.0f} ms" for e in errors) + " late")


def gated(release: Path) -> str:
    """A shell command that runs until the test creates `release` (workers need --shell)."""
    return f"while [ ! -e {release} ]; do sleep 0.02; done"


async def test_a_blocked_task_survives_a_scheduler_kill(cluster: Cluster, tmp_path: Path) -> None:
    """The parent ends while the scheduler is dead: its outcome waits in the scheduler's
    queue, and the restarted scheduler releases the child from it."""
    cluster.start_tracker()
    scheduler = cluster.start_scheduler()
    cluster.start_worker("w1", "--concurrency", "4", "--shell")
    release = tmp_path / "release-parent"
    parent, child = uid("parent"), uid("child")
    r = await submit_batch(
        cluster,
        [
            {"id": parent, "kind": "shell", "payload": gated(release)},
            {"id": child, "kind": "echo", "payload": "after", "depends_on": [parent]},
        ],
    )
    assert r.status_code == 202, r.text
    outcomes = Topology(cluster.namespace).scheduler_outcomes.name
    api = TrackerApi(cluster.tracker_url)
    try:
        await api.reach(parent, "running", 20)
        await api.reach(child, "blocked", 10)
        scheduler.send(signal.SIGKILL)
        await asyncio.to_thread(scheduler.proc.wait, 10)
        release.touch()  # only now can the parent finish: while the scheduler is dead
        await api.reach(parent, "completed", 20)

        async def outcome_waits() -> bool:
            return await ready_messages(cluster.amqp_url, outcomes) >= 1

        await eventually(outcome_waits, 20, "the parent's outcome queued for the scheduler")
        assert (await api.task(child))["status"] == "blocked"  # nobody released it
        restarted = time.monotonic()
        await asyncio.to_thread(cluster.start_scheduler)
        done = await api.reach(child, "completed", 30)
        parent_state = await api.task(parent)
    finally:
        release.touch()
        await api.close()
    assert done["result"] == "after"
    assert at(done["started_at"]) >= at(parent_state["finished_at"])
    report(
        f"blocked task after a scheduler SIGKILL: completed {time.monotonic() - restarted:.2f} s "
        "after the restart began"
    )


async def test_a_parent_that_ends_while_the_tracker_is_down_still_releases(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The scheduler hears outcomes from the tracker (`tasks.ended`, after its commit): a
    result that waits in the tracker's queue through a SIGKILL releases its child later."""
    tracker = cluster.start_tracker()
    cluster.start_scheduler()
    cluster.start_worker("w1", "--concurrency", "4", "--shell")
    release = tmp_path / "release-parent"
    parent, child = uid("parent"), uid("child")
    connection = await aio_pika.connect(cluster.amqp_url)
    api = TrackerApi(cluster.tracker_url)
    try:
        channel = await connection.channel()
        results = await channel.declare_queue(exclusive=True)
        await results.bind(f"{cluster.namespace}.results", "completed.#")
        r = await submit_batch(
            cluster,
            [
                {"id": parent, "kind": "shell", "payload": gated(release)},
                {"id": child, "kind": "echo", "payload": "after", "depends_on": [parent]},
            ],
        )
        assert r.status_code == 202, r.text
        await api.reach(parent, "running", 20)
        await api.reach(child, "blocked", 10)
        tracker.send(signal.SIGKILL)
        await asyncio.to_thread(tracker.proc.wait, 10)
        release.touch()  # only now can the parent finish: while the tracker is dead
        seen: list[str] = []
        async with results.iterator(timeout=20) as stream:
            async for message in stream:  # the parent's result, published while it is down
                await message.ack()
                seen.append(json.loads(message.body)["id"])
                if seen[-1] == parent:
                    break
        # The child waits for the tracker: nothing of it ran while the tracker was down.
        while (message := await results.get(no_ack=True, fail=False)) is not None:
            seen.append(json.loads(message.body)["id"])
        assert child not in seen
        restarted = utcnow()
        await asyncio.to_thread(cluster.start_tracker)
        done = await api.reach(child, "completed", 30)
        parent_state = await api.task(parent)
    finally:
        release.touch()
        await api.close()
        await connection.close()
    assert done["result"] == "after" and parent_state["status"] == "completed"
    assert at(parent_state["finished_at"]) < restarted  # it ended while the tracker was down
    assert at(done["started_at"]) >= restarted  # released only once the tracker was back
    report(
        "parent ended while the tracker was down: child started "
        f"{(at(done['started_at']) - restarted).total_seconds():.2f} s after the tracker restart "
        "began"
    )
