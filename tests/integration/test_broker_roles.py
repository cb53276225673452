"""Who may do what on the broker, against real processes: forged worker news does not
hide a hung worker nor get another client's connection closed; forged results and
cancels from a producer's credentials are not acted on."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from datetime import timedelta
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
import httpx
import pytest
from helpers import TrackerApi, eventually, ready_messages

from leveret.cli.procs import Cluster, Service
from leveret.contracts import (
    CancelTask,
    TaskResult,
    WorkerHeartbeat,
    WorkerInfo,
    WorkerStarted,
    utcnow,
)
from leveret.management import vhost_of
from leveret.topology import (
    RK_TASK_CANCEL,
    RK_WORKER_HEARTBEAT,
    RK_WORKER_STARTED,
    Topology,
    result_routing_key,
)

API = "http://127.0.0.1:15672/api"


class Users:
    """RabbitMQ users made for one test in its vhost, deleted at teardown."""

    def __init__(self, amqp_url: str) -> None:
        self.amqp_url = amqp_url
        self.vhost = vhost_of(amqp_url)
        self.made: list[str] = []

    def add(self, role: str) -> str:
        """A new user with every permission in the vhost; its AMQP URL."""
        name = f"t-{role}-{uuid.uuid4().hex[:6]}"
        password = uuid.uuid4().hex
        auth = ("guest", "guest")
        httpx.put(f"{API}/users/{name}", json={"password": password, "tags": ""}, auth=auth)
        self.made.append(name)
        perms = {"configure": ".*", "write": ".*", "read": ".*"}
        r = httpx.put(
            f"{API}/permissions/{quote(self.vhost, safe='')}/{name}", json=perms, auth=auth
        )
        r.raise_for_status()
        parts = urlsplit(self.amqp_url)
        netloc = f"{name}:{password}@{parts.hostname}:{parts.port or 5672}"
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))

    def delete_all(self) -> None:
        for name in self.made:
            httpx.delete(f"{API}/users/{name}", auth=("guest", "guest"))


@pytest.fixture
def users(amqp_url: str) -> Iterator[Users]:
    made = Users(amqp_url)
    yield made
    made.delete_all()


def info(worker_id: str) -> WorkerInfo:
    return WorkerInfo(
        id=worker_id, host="h", pid=1, pool="default", concurrency=1, kinds=[], version="0"
    )


async def _state(api: TrackerApi, worker_id: str) -> str | None:
    return next((w["state"] for w in await api.workers() if w["id"] == worker_id), None)


async def test_forged_worker_news_hides_nobody_and_fences_no_stranger(
    users: Users, cluster: Cluster
) -> None:
    cluster.extra_env["LEVERET_HEARTBEAT_TIMEOUT_S"] = "1"
    tracker = cluster.start_tracker()
    worker = cluster.start_worker("w-real")
    api = TrackerApi(cluster.tracker_url)
    victim = await aio_pika.connect(
        cluster.amqp_url, client_properties={"connection_name": "victim"}
    )
    mallory = await aio_pika.connect(users.add("mallory"))
    try:
        await eventually(lambda: _is(api, "w-real", "alive"), 15, "the worker to be alive")
        os.kill(worker.proc.pid, signal.SIGSTOP)  # hung: no more heartbeats
        events = await (await mallory.channel()).get_exchange(
            Topology(cluster.namespace).events_exchange
        )
        future = utcnow() + timedelta(days=3650)
        forged = WorkerHeartbeat(worker=info("w-real"), at=future)
        await events.publish(
            aio_pika.Message(forged.model_dump_json().encode()), RK_WORKER_HEARTBEAT
        )
        named = WorkerStarted(worker=info("victim"))
        await events.publish(aio_pika.Message(named.model_dump_json().encode()), RK_WORKER_STARTED)

        await eventually(lambda: declared(tracker, "w-real"), 20, "the hung worker to be fenced")
        await eventually(lambda: declared(tracker, "victim"), 20, "the forged one written off")
        assert not victim.is_closed, "the tracker closed a connection that is not a worker's"
    finally:
        os.kill(worker.proc.pid, signal.SIGCONT)
        await victim.close()
        await mallory.close()
        await api.close()


async def declared(tracker: Service, worker_id: str) -> bool:
    return f"worker {worker_id} declared dead" in tracker.log()


async def _is(api: TrackerApi, worker_id: str, state: str) -> bool:
    return await _state(api, worker_id) == state


async def test_forged_result_and_cancel_from_a_producer_are_not_acted_on(
    users: Users, cluster: Cluster
) -> None:
    urls = {role: users.add(role) for role in ("scheduler", "tracker", "worker", "producer")}
    for role in ("scheduler", "tracker", "worker"):
        cluster.extra_env[f"LEVERET_{role.upper()}_USERS"] = urlsplit(urls[role]).username or ""
    cluster.extra_env["LEVERET_POOLS"] = "default,idle"
    cluster.extra_env["LEVERET_MANAGEMENT_URL"] = "http://guest:guest@127.0.0.1:15672"
    cluster.extra_env["LEVERET_AMQP_URL"] = urls["scheduler"]
    cluster.start_scheduler()
    cluster.extra_env["LEVERET_AMQP_URL"] = urls["tracker"]
    cluster.start_tracker()
    api = TrackerApi(cluster.tracker_url)
    topology = Topology(cluster.namespace)
    producer = await aio_pika.connect(urls["producer"])
    try:
        async with httpx.AsyncClient() as http:
            task = {"kind": "echo", "payload": "real", "pool": "idle"}
            r = await http.post(f"{cluster.scheduler_url}/tasks", json=task)
        assert r.status_code == 202, r.text
        task_id = r.json()["id"]
        await api.reach(task_id, "pending")
        channel = await producer.channel()
        forged = TaskResult(
            id=task_id, kind="echo", pool="idle", status="completed", result="forged"
        )
        results = await channel.get_exchange(topology.results_exchange)
        key = result_routing_key("completed", "idle", "echo")
        await results.publish(aio_pika.Message(forged.model_dump_json().encode()), key)
        events = await channel.get_exchange(topology.events_exchange)
        cancel = CancelTask(id=task_id, reason="forged")
        await events.publish(aio_pika.Message(cancel.model_dump_json().encode()), RK_TASK_CANCEL)

        async def set_aside() -> bool:
            return await ready_messages(cluster.amqp_url, topology.rejected.name) >= 1

        # The tracker sets the forged result aside; the forged cancel is the workers' to
        # refuse (the tracker does not take task.cancel): the worker started next reads
        # it from the cancellations stream and must not act on it.
        await eventually(set_aside, 15, "the forged result to be set aside in the rejected queue")
        cluster.start_worker("w-idle", "--pool", "idle", env={"LEVERET_AMQP_URL": urls["worker"]})
        done = await api.reach(task_id, "completed")
        assert done["result"] == "real"
    finally:
        await producer.close()
        await api.close()


async def test_a_submission_with_a_foreign_reply_to_is_rejected_and_nothing_lands_there(
    cluster: Cluster,
) -> None:
    cluster.start_scheduler()
    cluster.start_tracker()
    api = TrackerApi(cluster.tracker_url)
    connection = await aio_pika.connect(cluster.amqp_url)
    try:
        channel = await connection.channel()
        victim = await channel.declare_queue(f"{cluster.namespace}-victim", auto_delete=True)
        submit = await channel.get_exchange(Topology(cluster.namespace).submit_exchange)
        body = b'{"kind": "echo", "id": "reply-elsewhere"}'
        await submit.publish(aio_pika.Message(body, reply_to=victim.name), "default")
        refused = await api.reach("reply-elsewhere", "rejected")
        assert refused["error"]["type"] == "invalid_reply_to"
        assert (
            await channel.declare_queue(victim.name, passive=True)
        ).declaration_result.message_count == 0
    finally:
        await connection.close()
        await api.close()


async def _rejected_reasons(amqp_url: str, queue: str, count: int) -> list[str]:
    """The `x-leveret-error-type` of the first `count` messages set aside in `queue`."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        rejected = await channel.declare_queue(queue, passive=True)
        reasons = []
        for _ in range(count):
            message = await rejected.get(no_ack=True)
            reasons.append(str(message.headers.get("x-leveret-error-type")))
        return reasons
    finally:
        await connection.close()


async def test_a_worker_cannot_submit_and_a_producer_cannot_cancel_an_owned_task(
    users: Users, cluster: Cluster
) -> None:
    urls = {role: users.add(role) for role in ("scheduler", "worker", "producer")}
    names = {role: urlsplit(url).username or "" for role, url in urls.items()}
    for role, name in names.items():
        cluster.extra_env[f"LEVERET_{role.upper()}_USERS"] = name
    cluster.extra_env["LEVERET_POOLS"] = "default,idle"
    cluster.extra_env["LEVERET_API_TOKENS"] = "alice-token-0123456789:submit,cancel"
    cluster.extra_env["LEVERET_AMQP_URL"] = urls["scheduler"]
    cluster.start_scheduler()
    topology = Topology(cluster.namespace)
    alice = {"Authorization": "Bearer alice-token-0123456789"}
    worker = await aio_pika.connect(urls["worker"])
    producer = await aio_pika.connect(urls["producer"])
    try:
        async with httpx.AsyncClient(base_url=cluster.scheduler_url) as http:
            task = {"kind": "echo", "payload": "alice's", "pool": "idle"}
            r = await http.post("/tasks", json=task, headers=alice)
            assert r.status_code == 202, r.text
            owned = r.json()["id"]
            body = b'{"kind": "echo", "id": "from-worker"}'
            forged = aio_pika.Message(body, user_id=names["worker"])
            await (await worker.channel()).default_exchange.publish(forged, topology.intake.name)
            cancel = CancelTask(id=owned, reason="not yours").model_dump_json().encode()
            submit = await (await producer.channel()).get_exchange(topology.submit_exchange)
            command = aio_pika.Message(cancel, type="task.cancel", user_id=names["producer"])
            await submit.publish(command, "default")

            async def set_aside() -> bool:
                return await ready_messages(cluster.amqp_url, topology.rejected.name) >= 2

            await eventually(set_aside, 15, "both refusals in the rejected queue")
            reasons = await _rejected_reasons(cluster.amqp_url, topology.rejected.name, 2)
            assert sorted(reasons) == ["forbidden", "not_owner"]
            again = await http.post(
                "/tasks", json={"kind": "echo", "id": "from-worker"}, headers=alice
            )
            assert again.status_code == 202, "the worker's submission was admitted"
            mine = await http.delete(f"/tasks/{owned}", headers=alice)
            assert mine.json()["status"] == "cancelling", "the forged cancel ended the task"
    finally:
        await worker.close()
        await producer.close()
