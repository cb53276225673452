"""Cancelling tasks: a queued one never runs, a running one is stopped on its worker, a
held one (delayed or blocked) ends at once and its dependants follow; a finished one is a
conflict."""

from __future__ import annotations

import json
import os
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import pytest
from helpers import TrackerApi, drop_namespace, eventually, report

from leveret.cli.procs import Cluster
from leveret.client import Client
from leveret.contracts import SubmitTask, TaskStatus, utcnow

pytestmark = pytest.mark.broker

TESTS_DIR = str(Path(__file__).resolve().parents[1])


@pytest.fixture
def cancel_cluster(cluster: Cluster) -> Cluster:
    cluster.extra_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (TESTS_DIR, os.environ.get("PYTHONPATH")) if p
    )
    cluster.start_tracker()
    cluster.start_scheduler()
    return cluster


async def _cancel(c: Cluster, task_id: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=c.scheduler_url) as http:
        return await http.delete(f"/tasks/{task_id}")


@pytest.mark.parametrize("kind", ["sleep", "block"])  # async, and sync in a child process
async def test_running_task_is_stopped_and_recorded_cancelled(
    cancel_cluster: Cluster, kind: str
) -> None:
    c = cancel_cluster
    c.start_worker("cw", "--concurrency", "2", "--handlers", "sample_handlers")
    api = TrackerApi(c.tracker_url)
    async with Client(c.amqp_url, namespace=c.namespace) as client:
        task_id = await client.submit(kind, 60, wait=True)

        async def running() -> bool:
            return (await api.task(task_id)).get("status") == "running"

        await eventually(running, 20, "the task to run")
        r = await _cancel(c, task_id)
        assert r.status_code == 202, r.text
        result = await client.result(task_id, timeout_s=20)
        after = await client.run("echo", "still working", timeout_s=20)
    assert result.status == TaskStatus.CANCELLED
    assert result.error is not None and result.error.type == "cancelled"
    assert (result.finished_at - result.started_at).total_seconds() < 10
    assert after.result == "still working"

    async def recorded() -> bool:
        return (await api.task(task_id)).get("status") == "cancelled"

    await eventually(recorded, 10, "the tracker to record it cancelled")
    await api.close()


async def test_queued_task_never_runs_even_on_a_worker_that_starts_later(
    cancel_cluster: Cluster,
) -> None:
    c = cancel_cluster
    api = TrackerApi(c.tracker_url)
    async with Client(c.amqp_url, namespace=c.namespace) as client:
        # No worker yet: the task waits in its queue when it is cancelled.
        task_id = await client.submit("echo", "must not run", wait=True)
        r = await _cancel(c, task_id)
        assert r.status_code == 202
        c.start_worker("late", "--concurrency", "1")
        result = await client.result(task_id, timeout_s=20)
    assert result.status == TaskStatus.CANCELLED
    assert result.result is None
    assert (await _cancel(c, "never-submitted")).status_code == 404
    await api.close()


async def test_cancel_over_amqp(cancel_cluster: Cluster) -> None:
    c = cancel_cluster
    c.start_worker("aw", "--concurrency", "1")
    async with Client(c.amqp_url, namespace=c.namespace) as client:
        task_id = await client.submit("sleep", 60, wait=True)
        # Intake handles messages concurrently: a cancel can overtake its own task's
        # submission and find it unknown. Cancel what is running, as the test means to.
        api = TrackerApi(c.tracker_url)
        await api.reach(task_id, "running")
        await api.close()
        await _cancel_over_amqp(c, task_id, "changed my mind")
        result = await client.result(task_id, timeout_s=30)
    assert result.status == TaskStatus.CANCELLED
    assert result.error is not None and result.error.message == "changed my mind"


# Held tasks, dependants and capability-bound tasks. Their handlers are shell commands:
# `touch` leaves a file behind if the handler ever runs, and a gated parent runs until
# the test creates its release file, so it cannot finish before the cancellation.


def _touch(path: Path) -> str:
    return f"touch {path}"


def _gated(release: Path) -> str:
    return f"while [ ! -e {release} ]; do sleep 0.02; done"


def _at(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


async def _cancel_over_amqp(c: Cluster, task_id: str, reason: str) -> None:
    """Publish a `task.cancel` request to the submit exchange (confirmed)."""
    connection = await aio_pika.connect(c.amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(f"{c.namespace}.submit")
        body = json.dumps({"id": task_id, "reason": reason}).encode()
        await exchange.publish(aio_pika.Message(body, type="task.cancel"), "default")


async def _submit_batch(c: Cluster, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=c.scheduler_url, timeout=10) as http:
        r = await http.post("/tasks/batch", json={"tasks": tasks})
    assert r.status_code == 202, r.text
    return list(r.json()["tasks"])


def _never_ran(state: dict[str, Any], marker: Path) -> None:
    assert state["attempts"] == [] and state["started_at"] is None, state
    assert not marker.exists(), f"the handler of {state['id']} ran"


async def test_a_cancelled_delayed_task_ends_at_once_and_never_starts(
    cancel_cluster: Cluster, tmp_path: Path
) -> None:
    c = cancel_cluster
    c.start_worker("dw", "--concurrency", "2", "--shell")
    api = TrackerApi(c.tracker_url)
    marker, witness_marker = tmp_path / "doomed-ran", tmp_path / "witness-ran"
    due = utcnow() + timedelta(seconds=8)
    doomed, witness = f"doomed-{uuid.uuid4().hex[:6]}", f"witness-{uuid.uuid4().hex[:6]}"
    answers = await _submit_batch(
        c,
        [
            {"id": doomed, "kind": "shell", "payload": _touch(marker), "run_at": due.isoformat()},
            {  # due just after it: once this one ran, the releaser went past the doomed one
                "id": witness,
                "kind": "shell",
                "payload": _touch(witness_marker),
                "run_at": (due + timedelta(seconds=0.5)).isoformat(),
            },
        ],
    )
    assert [a["status"] for a in answers] == ["delayed", "delayed"]
    try:
        await api.reach(doomed, "delayed", 10)
        asked = utcnow()
        r = await _cancel(c, doomed)
        assert asked < due, "precondition: the task must still be held when it is cancelled"
        assert r.status_code == 202 and r.json()["status"] == "cancelling", r.text
        ended = await api.reach(doomed, "cancelled", 20)
        recorded = utcnow()
        assert ended["error"]["type"] == "cancelled"
        # Ended by the scheduler when asked, not settled by a worker at its due time.
        assert _at(ended["finished_at"]) < due
        assert (await _cancel(c, doomed)).status_code == 409  # it has ended now
        done = await api.reach(witness, "completed", 30)
        assert _at(done["started_at"]) >= due + timedelta(seconds=0.5)
        assert witness_marker.exists()
        _never_ran(await api.task(doomed), marker)
        assert (await api.task(doomed))["status"] == "cancelled"
    finally:
        await api.close()
    report(
        f"cancelled delayed task: recorded cancelled {(recorded - asked).total_seconds():.2f} s "
        f"after DELETE, {(due - _at(ended['finished_at'])).total_seconds():.1f} s before its due "
        "time; it never started"
    )


async def test_a_cancelled_blocked_task_ends_while_its_parent_runs(
    cancel_cluster: Cluster, tmp_path: Path
) -> None:
    c = cancel_cluster
    c.start_worker("bw", "--concurrency", "2", "--shell")
    api = TrackerApi(c.tracker_url)
    release = tmp_path / "release-parent"
    markers = {n: tmp_path / f"{n}-ran" for n in ("child", "grandchild", "sibling")}
    parent, child, grandchild, sibling = (
        f"{n}-{uuid.uuid4().hex[:6]}" for n in ("parent", "child", "grandchild", "sibling")
    )
    answers = await _submit_batch(
        c,
        [
            {"id": parent, "kind": "shell", "payload": _gated(release)},
            {
                "id": child,
                "kind": "shell",
                "payload": _touch(markers["child"]),
                "depends_on": [parent],
            },
            {
                "id": grandchild,
                "kind": "shell",
                "payload": _touch(markers["grandchild"]),
                "depends_on": [child],
            },
            {  # released by the same parent outcome: proves the child had its chance
                "id": sibling,
                "kind": "shell",
                "payload": _touch(markers["sibling"]),
                "depends_on": [parent],
            },
        ],
    )
    assert [a["status"] for a in answers] == ["pending", "blocked", "blocked", "blocked"]
    try:
        await api.reach(parent, "running", 20)
        await api.reach(child, "blocked", 10)
        r = await _cancel(c, child)
        assert r.status_code == 202, r.text
        ended = await api.reach(child, "cancelled", 20)
        orphan = await api.reach(grandchild, "cancelled", 20)
        # Both ended while their (grand)parent still ran: it waits for the test's release.
        assert (await api.task(parent))["status"] == "running"
        assert ended["error"]["type"] == "cancelled"
        assert orphan["error"] == {
            "type": "dependency_cancelled",
            "message": f"parent {child} cancelled: cancelled",
        }
        assert (await api.task(sibling))["status"] == "blocked"  # not affected
        release.touch()
        await api.reach(parent, "completed", 20)
        await api.reach(sibling, "completed", 20)
        assert markers["sibling"].exists()
        for task_id, name in ((child, "child"), (grandchild, "grandchild")):
            state = await api.task(task_id)
            assert state["status"] == "cancelled"
            _never_ran(state, markers[name])
    finally:
        release.touch()
        await api.close()


async def test_cancelling_a_running_parent_ends_its_dependants_transitively(
    cancel_cluster: Cluster, tmp_path: Path
) -> None:
    """`dependency_cancelled` end to end, the cancellation sent over AMQP."""
    c = cancel_cluster
    c.start_worker("pw", "--concurrency", "2", "--shell")
    api = TrackerApi(c.tracker_url)
    release = tmp_path / "release-parent"  # never created: only the cancellation ends it
    markers = {n: tmp_path / f"{n}-ran" for n in ("child", "grandchild")}
    parent, other, child, grandchild = (
        f"{n}-{uuid.uuid4().hex[:6]}" for n in ("parent", "other", "child", "grandchild")
    )
    await _submit_batch(
        c,
        [
            {"id": parent, "kind": "shell", "payload": _gated(release)},
            {"id": other, "kind": "echo", "payload": "fine"},
            {
                "id": child,
                "kind": "shell",
                "payload": _touch(markers["child"]),
                "depends_on": [parent, other],
            },
            {
                "id": grandchild,
                "kind": "shell",
                "payload": _touch(markers["grandchild"]),
                "depends_on": [child],
            },
        ],
    )
    try:
        await api.reach(parent, "running", 20)
        await api.reach(other, "completed", 20)
        assert (await api.task(child))["status"] == "blocked"  # only the gated parent is left
        await _cancel_over_amqp(c, parent, "plans changed")
        stopped = await api.reach(parent, "cancelled", 20)
        first = await api.reach(child, "cancelled", 20)
        second = await api.reach(grandchild, "cancelled", 20)
    finally:
        await api.close()
    assert stopped["error"] == {"type": "cancelled", "message": "plans changed"}
    assert first["error"] == {
        "type": "dependency_cancelled",
        "message": f"parent {parent} cancelled: cancelled",
    }
    assert second["error"] == {
        "type": "dependency_cancelled",
        "message": f"parent {child} cancelled: dependency_cancelled",
    }
    _never_ran(first, markers["child"])
    _never_ran(second, markers["grandchild"])


async def test_a_task_waiting_for_a_capability_never_runs_once_cancelled(
    cancel_cluster: Cluster, tmp_path: Path
) -> None:
    c = cancel_cluster
    c.start_worker("plain", "--concurrency", "1", "--shell")  # has no gpu: cannot take it
    api = TrackerApi(c.tracker_url)
    marker = tmp_path / "doomed-ran"
    connection = await aio_pika.connect(c.amqp_url)
    try:
        channel = await connection.channel()
        commands = await channel.declare_queue(exclusive=True)
        await commands.bind(f"{c.namespace}.events", "task.cancel")
        [doomed] = await _submit_batch(
            c, [{"kind": "shell", "payload": _touch(marker), "requires": ["gpu"]}]
        )
        doomed_id = doomed["id"]

        async def waiting() -> bool:
            state = await api.task(doomed_id)
            return state.get("status") == "pending" and "gpu" in (state.get("waiting_for") or "")

        await eventually(waiting, 30, "the gpu task shown waiting for a capable worker")
        await _cancel_over_amqp(c, doomed_id, "no gpu after all")
        # The scheduler broadcast the command before any capable worker exists.
        async with commands.iterator(timeout=20) as stream:
            async for message in stream:
                await message.ack()
                if json.loads(message.body)["id"] == doomed_id:
                    break
        assert (await api.task(doomed_id))["status"] == "pending"  # still queued, unconsumed
        c.start_worker("gpu", "--concurrency", "1", "--shell", "--capability", "gpu")
        async with Client(c.amqp_url, namespace=c.namespace) as client:
            # Same queue, behind the cancelled task: once it ran, the worker took that one.
            [after] = await client.submit_many(
                [SubmitTask(kind="echo", payload="gpu works", requires=["gpu"])], wait=True
            )
            result = await client.result(after, timeout_s=30)
        assert result.status == TaskStatus.COMPLETED and result.worker == "gpu"
        ended = await api.reach(doomed_id, "cancelled", 20)
    finally:
        await api.close()
        await connection.close()
        drop_namespace(c.amqp_url, c.namespace, requirement_sets=[["gpu"]])
    assert ended["error"] == {"type": "cancelled", "message": "no gpu after all"}
    assert not marker.exists(), "the cancelled task's handler ran"


async def test_cancelling_a_task_that_already_ended_is_a_conflict(
    cancel_cluster: Cluster,
) -> None:
    c = cancel_cluster
    c.start_worker("fw", "--concurrency", "1")
    api = TrackerApi(c.tracker_url)
    async with Client(c.amqp_url, namespace=c.namespace) as client:
        task_id = await client.submit("echo", "done", wait=True)
        result = await client.result(task_id, timeout_s=30)
    assert result.status == TaskStatus.COMPLETED
    await api.reach(task_id, "completed", 20)
    answers: list[int] = []

    async def conflict() -> bool:
        # The scheduler hears of the outcome from the tracker (`tasks.ended`, after its
        # commit): until then a request is still answered 202, harmlessly.
        r = await _cancel(c, task_id)
        answers.append(r.status_code)
        if r.status_code == 409:
            assert r.json()["detail"]["error"] == "finished"
        return r.status_code == 409

    await eventually(conflict, 20, "a 409 for the finished task", interval_s=0.1)
    state = await api.task(task_id)
    await api.close()
    assert set(answers) <= {202, 409}
    assert state["status"] == "completed" and state["result"] == "done"  # first result wins
    report(f"cancel of a finished task: {answers.count(202)} request(s) answered 202 before 409")
