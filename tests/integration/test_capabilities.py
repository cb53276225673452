"""Capability routing on real workers: a task with `requires` runs only on a worker that
has every tag; one that no live worker can run waits, visibly and without spinning,
and runs as soon as such a worker appears."""

from __future__ import annotations

from collections import Counter

import aio_pika
import httpx
import pytest
from helpers import TrackerApi, drop_namespace, eventually, report

from leveret.cli.procs import Cluster
from leveret.client import Client
from leveret.contracts import SubmitTask
from leveret.topology import Topology

pytestmark = pytest.mark.broker

GPU, EU, TPU = "gpu", "region-eu", "tpu"


async def _finished(api: TrackerApi, ids: list[str]) -> list[dict]:
    async def done() -> bool:
        counts = (await api.stats())["counts"]
        return counts["completed"] + counts["failed"] >= len(ids)

    await eventually(done, 120, f"{len(ids)} tasks to finish", interval_s=0.1)
    return await api.tasks_in_full(ids)


async def test_tasks_run_only_on_workers_with_every_required_capability(
    cluster: Cluster, amqp_url: str
) -> None:
    cluster.start_tracker()
    cluster.start_scheduler()
    cluster.start_worker("plain", "--concurrency", "4")
    cluster.start_worker("gpu", "--concurrency", "4", "--capability", GPU)
    cluster.start_worker("gpu-eu", "--concurrency", "4", "--capability", GPU, "--capability", EU)
    tasks = (
        [{"kind": "sleep", "payload": 0.02, "requires": [GPU]} for _ in range(30)]
        + [{"kind": "sleep", "payload": 0.02, "requires": [EU, GPU, EU]} for _ in range(10)]
        + [{"kind": "sleep", "payload": 0.02} for _ in range(30)]
    )
    async with httpx.AsyncClient(base_url=cluster.scheduler_url) as http:
        r = await http.post("/tasks/batch", json={"tasks": tasks})
    assert r.status_code == 202, r.text
    ids = [t["id"] for t in r.json()["tasks"]]
    api = TrackerApi(cluster.tracker_url)
    states = await _finished(api, ids)
    await api.close()
    assert [s["status"] for s in states] == ["completed"] * len(ids)
    gpu, both, plain = states[:30], states[30:40], states[40:]
    assert {s["worker"] for s in gpu} <= {"gpu", "gpu-eu"}
    assert {s["worker"] for s in both} == {"gpu-eu"}
    assert both[0]["requires"] == [GPU, EU] and plain[0]["requires"] == []
    assert all(s["waiting_for"] is None for s in states)
    shares = {
        "gpu": dict(Counter(s["worker"] for s in gpu)),
        "gpu+region-eu": dict(Counter(s["worker"] for s in both)),
        "none": dict(Counter(s["worker"] for s in plain)),
    }
    report(f"capabilities: where tasks ran, by requirement: {shares}")
    drop_namespace(amqp_url, cluster.namespace, requirement_sets=[[GPU], [GPU, EU]])


async def test_a_task_no_live_worker_can_run_waits_visibly_then_runs(
    cluster: Cluster, amqp_url: str
) -> None:
    cluster.start_tracker()
    scheduler = cluster.start_scheduler()
    cluster.start_worker("plain", "--concurrency", "2", "--capability", GPU)
    api = TrackerApi(cluster.tracker_url)
    async with httpx.AsyncClient(base_url=cluster.scheduler_url) as http:
        r = await http.post("/tasks", json={"kind": "echo", "payload": "h", "requires": [TPU]})
        assert r.status_code == 202, r.text
        over_http = r.json()["id"]
    async with Client(cluster.amqp_url, namespace=cluster.namespace) as client:
        [over_amqp, marker] = await client.submit_many(
            [SubmitTask(kind="echo", payload="a", requires=[TPU, GPU]), SubmitTask(kind="echo")]
        )

    async def waiting(task_id: str) -> bool:
        task = await api.task(task_id)
        return task.get("status") == "pending" and TPU in (task.get("waiting_for") or "")

    await eventually(lambda: waiting(over_http), 30, "the tpu task shown waiting")
    await eventually(lambda: waiting(over_amqp), 30, "the tpu+gpu task shown waiting")
    await eventually(
        lambda: _status_is(api, marker, "completed"), 30, "a task submitted after them to run"
    )
    # Never spins: no worker ever took them; they wait in their queues, unconsumed.
    for task_id in (over_http, over_amqp):
        assert (await api.task(task_id))["attempts"] == []
    topology = Topology(cluster.namespace)
    for requires in ([TPU], [GPU, TPU]):
        ready, consumers = await _depth(amqp_url, topology.requirement("default", requires).name)
        assert (ready, consumers) == (1, 0)

    # The record of the set outlives the scheduler: a worker that starts while it is
    # down still finds the queue.
    assert scheduler.stop() == 0
    cluster.start_worker("tpu", "--concurrency", "2", "--capability", TPU, "--capability", GPU)
    for task_id in (over_http, over_amqp):
        await eventually(lambda t=task_id: _status_is(api, t, "completed"), 30, f"{task_id} to run")
        task = await api.task(task_id)
        assert task["worker"] == "tpu" and task["waiting_for"] is None
        assert [a["worker"] for a in task["attempts"]] == ["tpu"]
    await api.close()
    drop_namespace(amqp_url, cluster.namespace, requirement_sets=[[TPU], [GPU, TPU]])


async def _status_is(api: TrackerApi, task_id: str, status: str) -> bool:
    return (await api.task(task_id)).get("status") == status


async def _depth(amqp_url: str, queue: str) -> tuple[int, int]:
    """Messages ready in a queue and its consumers, as the broker counts them."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        result = declared.declaration_result
        return result.message_count, result.consumer_count
