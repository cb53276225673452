"""Small async helpers for tests: poll a condition with a deadline, read the tracker API."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from leveret.cli.procs import Cluster


async def eventually(
    condition: Callable[[], Awaitable[bool]], timeout_s: float, what: str, interval_s: float = 0.05
) -> None:
    """Await `condition` until it holds; raise TimeoutError naming `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(interval_s)


async def ready_messages(url: str, queue: str) -> int:
    """Messages ready in a queue (not delivered to any consumer), as the broker counts them."""
    import aio_pika

    connection = await aio_pika.connect(
        url, client_properties={"connection_name": f"test-queue-probe-{queue}"}
    )
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)


#: The statuses a task that ran (or was cancelled) ends in.
ENDED = ("completed", "failed", "cancelled")


async def submit_task(cluster: Cluster, **task: Any) -> str:
    """POST one task to the cluster's scheduler; it must be accepted. Its id."""
    async with httpx.AsyncClient(base_url=cluster.scheduler_url, timeout=10) as http:
        r = await http.post("/tasks", json=task)
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


class TrackerApi:
    """The tracker's HTTP API, for assertions."""

    def __init__(self, base_url: str) -> None:
        self.http = httpx.AsyncClient(base_url=base_url, timeout=10)

    async def task(self, task_id: str) -> dict[str, Any]:
        r = await self.http.get(f"/tasks/{task_id}")
        return r.json() if r.status_code == 200 else {}

    async def reach(self, task_id: str, status: str, timeout_s: float = 30) -> dict[str, Any]:
        """The task's view once its status is `status` (the last view seen on a timeout)."""
        seen: dict[str, Any] = {}

        async def reached() -> bool:
            seen.clear()
            seen.update(await self.task(task_id))
            return seen.get("status") == status

        try:
            await eventually(reached, timeout_s, f"task {task_id} to be {status}")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc} (last seen: {seen})") from None
        return dict(seen)

    async def ended(self, task_id: str, timeout_s: float = 60) -> dict[str, Any]:
        """The task's full record once it has ended (completed, failed or cancelled)."""
        state: dict[str, Any] = {}

        async def ended() -> bool:
            nonlocal state
            state = await self.task(task_id)
            return state.get("status") in ENDED

        await eventually(ended, timeout_s, f"task {task_id} to end", interval_s=0.1)
        return state

    async def stats(self) -> dict[str, Any]:
        return (await self.http.get("/stats")).json()

    async def workers(self) -> list[dict[str, Any]]:
        return (await self.http.get("/workers")).json()["workers"]

    async def all_tasks(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 1000}
            if cursor:
                params["cursor"] = cursor
            page = (await self.http.get("/tasks", params=params)).json()
            out.extend(page["tasks"])
            cursor = page.get("next_cursor")
            if not cursor:
                return out

    async def tasks_in_full(self, ids: list[str], parallel: int = 16) -> list[dict[str, Any]]:
        """`GET /tasks/{id}` for each id (with the attempt history), a few at a time."""
        gate = asyncio.Semaphore(parallel)

        async def one(task_id: str) -> dict[str, Any]:
            async with gate:
                return await self.task(task_id)

        return list(await asyncio.gather(*(one(i) for i in ids)))

    async def close(self) -> None:
        await self.http.aclose()


#: Figures that tests measured; printed at the end of the run (pytest's terminal summary).
FIGURES: list[str] = []


def report(line: str) -> None:
    """Record a measured figure for the end-of-run summary (and print it for -s)."""
    FIGURES.append(line)
    print(line)


def drop_namespace(
    url: str,
    namespace: str,
    pools: tuple[str, ...] = ("default",),
    requirement_sets: list[list[str]] | None = None,
) -> None:
    """Delete a test's queues and exchanges right away: deleting a vhost that holds
    hundreds of quorum queues at once can stall a small broker for minutes."""
    import pika

    from leveret.topology import Band, Topology

    topology = Topology(namespace)
    queues = [q.name for q in topology.fixed_queues()]
    queues += [topology.work(p, b).name for p in pools for b in Band]
    queues += [topology.requirement(p, r).name for p in pools for r in requirement_sets or []]
    params = pika.URLParameters(url)
    params.client_properties = {"connection_name": f"test-cleanup-{namespace}"}
    try:
        connection = pika.BlockingConnection(params)
    except pika.exceptions.AMQPError:
        return
    try:
        channel = connection.channel()
        for name in queues:
            channel.queue_delete(name)
        for name in topology.exchange_names():
            channel.exchange_delete(name)
    finally:
        connection.close()


@contextmanager
def own_cluster(amqp_url: str, workdir: Path) -> Iterator[Cluster]:
    """A Cluster in a namespace of its own, for fixtures wider than one test: its
    services are stopped and its namespace dropped at the end."""
    cluster = Cluster(namespace=f"t{uuid.uuid4().hex[:10]}", amqp_url=amqp_url, workdir=workdir)
    try:
        yield cluster
    finally:
        cluster.stop_all()
        drop_namespace(amqp_url, cluster.namespace)
