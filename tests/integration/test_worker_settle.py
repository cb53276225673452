"""A worker's settle step is shielded from cancellation: once a result publish was
confirmed, the delivery is acked even if its asyncio task is cancelled right then
(a drain or a lost session), so the broker does not hand the finished task to
another worker for a second run. Against a real broker, with a worker in this
process so the test can cancel the delivery at that exact point."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import aio_pika
import pytest
from helpers import drop_namespace, eventually

from leveret.amqp import json_message
from leveret.contracts import TaskMessage, TaskResult, TaskStatus, utcnow
from leveret.handlers import Registry, TaskContext
from leveret.settings import WorkerSettings
from leveret.topology import Band
from leveret.worker.runner import Worker

pytestmark = pytest.mark.broker


@pytest.fixture
def settings(amqp_url: str, namespace: str) -> Iterator[WorkerSettings]:
    yield WorkerSettings(
        amqp_url=amqp_url,
        namespace=namespace,
        concurrency=1,
        worker_id="settle-1",
        heartbeat_interval_s=0.5,
        grace_period_s=5,
    )
    drop_namespace(amqp_url, namespace)


async def test_a_confirmed_result_is_acked_though_its_delivery_is_cancelled(
    settings: WorkerSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs: list[int] = []

    async def echo(ctx: TaskContext, payload: Any) -> Any:
        runs.append(ctx.attempt)
        return payload

    registry = Registry()
    registry.register("echo", echo)
    worker = Worker(settings, registry)
    deliveries = worker.deliveries
    publish_result = deliveries._deliver
    cancelled: list[asyncio.Task[Any]] = []

    async def confirmed_then_cancelled(*args: Any) -> Any:
        """Publish the result (confirmed), then cancel the delivery's job before the
        code that published resumes: a cancellation that reaches the delivery then
        lands between the confirm and the ack."""
        status = await publish_result(*args)
        for held in deliveries.in_flight:
            held.job.cancel()
            cancelled.append(held.job)
        await asyncio.sleep(0)
        return status

    monkeypatch.setattr(deliveries, "_deliver", confirmed_then_cancelled)

    stop, ready = asyncio.Event(), asyncio.Event()
    running = asyncio.create_task(worker.run(stop, ready=ready))
    await asyncio.wait_for(ready.wait(), 30)

    topology = settings.topology
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        channel = await connection.channel()
        results = await channel.declare_queue(exclusive=True)
        await results.bind(topology.results_exchange, "#")
        task = TaskMessage(id="settle-1", kind="echo", payload=7, submitted_at=utcnow())
        work = topology.work(task.pool, Band.NORMAL).name
        await channel.default_exchange.publish(json_message(task, message_id=task.id), work)

        received: list[TaskResult] = []

        async def result_arrived() -> bool:
            message = await results.get(fail=False, no_ack=True)
            if message is not None:
                received.append(TaskResult.model_validate_json(message.body))
            return bool(received) and bool(cancelled) and cancelled[0].done()

        await eventually(result_arrived, 20, "the result, and the cancelled delivery's end")
        assert cancelled[0].cancelled()  # the cancellation went on after the settle
        assert [(r.id, r.status, r.result) for r in received] == [
            ("settle-1", TaskStatus.COMPLETED, 7)
        ]

        stop.set()
        await asyncio.wait_for(running, 30)
        # The worker's connection is closed: an unacked delivery would be back by now.
        queue = await channel.declare_queue(work, passive=True)
        assert queue.declaration_result.message_count == 0
        assert runs == [1]
        assert worker.completed == 1
    finally:
        stop.set()
        await connection.close()
        if not running.done():
            running.cancel()
