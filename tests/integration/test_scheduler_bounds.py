"""The scheduler's bounds on a real broker, real processes: pools are an allowlist and
requirement sets are capped (neither makes a queue it refuses, and both are remembered
across a restart), request bodies are refused by size before they are read, and a
cancellation the store refuses for good is answered clearly, not with a 500."""

from __future__ import annotations

import json
import socket
import sqlite3
import time
from typing import Any

import aio_pika
import httpx
import pytest
from helpers import drop_namespace, eventually
from test_backbone import PikaProducer

from leveret.cli.procs import Cluster
from leveret.scheduler.store import SubmissionStore

pytestmark = pytest.mark.broker

MAX_SETS = 2
MAX_BYTES = 1000
JSON = {"content-type": "application/json"}


async def queue_exists(url: str, name: str) -> bool:
    """Whether the broker has a queue of this name (a passive declare)."""
    connection = await aio_pika.connect(
        url, client_properties={"connection_name": f"test-queue-probe-{name}"}
    )
    async with connection:
        channel = await connection.channel()
        try:
            await channel.declare_queue(name, passive=True)
        except aio_pika.exceptions.ChannelClosed:
            return False
        return True


def post(c: Cluster, **task: Any) -> httpx.Response:
    return httpx.post(f"{c.scheduler_url}/tasks", json={"kind": "echo", **task}, timeout=10)


def error_of(r: httpx.Response) -> tuple[int, str, str]:
    detail = r.json()["detail"]
    return r.status_code, detail["error"], detail["message"]


async def test_pools_are_an_allowlist_and_requirement_sets_are_capped(cluster: Cluster) -> None:
    cluster.extra_env["LEVERET_MAX_REQUIREMENT_SETS"] = str(MAX_SETS)
    cluster.start_scheduler()
    work = f"{cluster.namespace}.work"

    # An unknown pool: refused over HTTP, naming it and the allowed ones ...
    status, code, message = error_of(post(cluster, pool="nowhere"))
    assert (status, code) == (422, "unknown_pool")
    assert "'nowhere'" in message and "default" in message
    # ... and over AMQP: a `rejected` result and the dead-lettered original.
    producer = PikaProducer(cluster.amqp_url, cluster.namespace)
    try:
        producer.publish(b'{"kind": "echo"}', correlation_id="lost", routing_key="nowhere")
        result = producer.collect({"lost"})["lost"]["body"]
        assert (result["status"], result["error"]["type"]) == ("rejected", "unknown_pool")
        method, props, _ = producer.channel.basic_get(f"{cluster.namespace}.rejected", True)
        assert method is not None and props.headers["x-leveret-error-type"] == "unknown_pool"
    finally:
        producer.close()
    assert not await queue_exists(cluster.amqp_url, f"{work}.nowhere")

    # A pool becomes allowed when a worker of it announces itself.
    assert error_of(post(cluster, pool="gpu"))[1] == "unknown_pool"
    worker = cluster.start_worker("gpu-1", "--pool", "gpu")

    async def gpu_allowed() -> bool:
        async with httpx.AsyncClient(base_url=cluster.scheduler_url, timeout=5) as http:
            health = (await http.get("/healthz")).json()
        return "gpu" in health["pools"]

    await eventually(gpu_allowed, 20, "the scheduler to learn pool gpu")
    assert post(cluster, pool="gpu").status_code == 202

    # Requirement sets: up to the cap, then only the sets already in use.
    assert post(cluster, requires=["a"]).status_code == 202
    assert post(cluster, requires=["b"]).status_code == 202
    status, code, message = error_of(post(cluster, requires=["c"]))
    assert (status, code) == (422, "too_many_requirement_sets") and str(MAX_SETS) in message
    assert post(cluster, requires=["a"]).status_code == 202
    assert not await queue_exists(cluster.amqp_url, f"{work}.default.req.c")

    # A restart, with no worker left to announce anything: both are remembered.
    worker.stop()
    next(s for s in cluster.services if s.name == "scheduler").stop()
    cluster.start_scheduler()
    assert post(cluster, pool="gpu").status_code == 202
    assert error_of(post(cluster, requires=["c"]))[1] == "too_many_requirement_sets"
    assert post(cluster, requires=["b"]).status_code == 202
    assert error_of(post(cluster, pool="nowhere"))[1] == "unknown_pool"
    drop_namespace(cluster.amqp_url, cluster.namespace, ("default", "gpu"), [["a"], ["b"], ["c"]])


def raw_request(port: int, head: str, body: bytes = b"") -> bytes:
    """Send a request's head and (part of) a body, then read what the server answers
    within a few seconds, without ever finishing the body."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head.encode() + b"\r\n\r\n" + body)
        return read_answer(sock)


def read_answer(sock: socket.socket) -> bytes:
    """What the server answers on `sock`, up to the end of one response."""
    answer = b""
    while not _whole(answer):
        chunk = sock.recv(65536)
        if not chunk:
            break
        answer += chunk
    return answer


def _whole(answer: bytes) -> bool:
    head, sep, body = answer.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.lower().split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return True


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def test_bodies_are_refused_by_size_before_they_are_read(cluster: Cluster) -> None:
    cluster.extra_env["LEVERET_MAX_PAYLOAD_BYTES"] = str(MAX_BYTES)
    scheduler = cluster.start_scheduler()
    port = cluster.scheduler_port
    json_head = "Host: 127.0.0.1\r\nContent-Type: application/json"
    # A declared length over the limit: answered at once, the body never sent.
    for path, length in (("/tasks", MAX_BYTES + 1), ("/tasks/batch", 10**9)):
        head = f"POST {path} HTTP/1.1\r\n{json_head}\r\nContent-Length: {length}"
        answer = raw_request(port, head, b'{"kind": ')
        assert status_of(answer) == 413, answer
        assert b"payload_too_large" in answer, answer
    # Chunked, no length: refused once what arrived passes the limit, the body unfinished.
    chunk = b"x" * (MAX_BYTES + 10)
    head = f"POST /tasks HTTP/1.1\r\n{json_head}\r\nTransfer-Encoding: chunked"
    answer = raw_request(port, head, f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
    assert status_of(answer) == 413 and b"payload_too_large" in answer, answer
    # A chunked body within the limit is read whole and admitted.
    ok = httpx.post(
        f"{cluster.scheduler_url}/tasks",
        content=iter([b'{"kind": "echo", ', b'"payload": "chunked"}']),
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert ok.status_code == 202, ok.text
    assert scheduler.alive()


async def test_bodies_held_at_once_have_a_budget(cluster: Cluster) -> None:
    """Two slow clients that declared a body each and send it slowly hold the whole
    budget: a third request is answered 503 `busy` at once, and is admitted again once
    they are gone."""
    cluster.extra_env["LEVERET_MAX_PAYLOAD_BYTES"] = str(100_000)
    cluster.extra_env["LEVERET_HTTP_BODY_BUDGET_BYTES"] = str(200_000)
    cluster.start_scheduler()
    head = (
        "POST /tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "Content-Length: 100000\r\n\r\n"
    )
    slow = [socket.create_connection(("127.0.0.1", cluster.scheduler_port)) for _ in range(2)]
    for sock in slow:
        sock.sendall(head.encode() + b'{"kind": "echo", "payload": "')
    try:
        async with httpx.AsyncClient(base_url=cluster.scheduler_url, timeout=10) as http:

            async def third_is_busy() -> bool:
                r = await http.post("/tasks", json={"kind": "echo"})
                return r.status_code == 503

            await eventually(third_is_busy, 10, "the budget to be held by the slow clients")
            r = await http.post("/tasks", json={"kind": "echo"})
            assert (r.status_code, r.json()["detail"]["error"]) == (503, "busy")
            assert r.headers["retry-after"] == "1"
            for sock in slow:
                sock.close()
            slow = []

            async def admitted() -> bool:
                r = await http.post("/tasks", json={"kind": "echo", "id": "after"})
                return r.status_code in (200, 202)

            await eventually(admitted, 10, "room once the slow clients left")
    finally:
        for sock in slow:
            sock.close()


def test_a_cancellation_the_store_refuses_is_answered_without_a_500(cluster: Cluster) -> None:
    scheduler = cluster.start_scheduler()
    held = post(cluster, delay_s=3600)
    assert held.status_code == 202 and held.json()["status"] == "delayed"
    task_id = held.json()["id"]
    # The database now refuses every update of a submission: a lasting StoreError.
    db = sqlite3.connect(cluster.workdir / "data" / "scheduler.db")
    with db:
        db.execute(
            "CREATE TRIGGER refuse BEFORE UPDATE ON submissions "
            "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
        )
    db.close()
    r = httpx.delete(f"{cluster.scheduler_url}/tasks/{task_id}", timeout=10)
    assert r.status_code == 422, r.text
    assert r.json()["detail"]["error"] == "unprocessable"
    assert task_id in r.json()["detail"]["message"]
    assert "refused by the test" in r.json()["detail"]["message"]
    assert scheduler.alive()


async def test_the_store_remembers_pools_and_requirement_sets(database_url: str) -> None:
    store = await SubmissionStore.open(database_url)
    try:
        await store.add_pools(["gpu", "gpu"])
        await store.add_pools(["gpu", "batch"])  # again: no error, no second row
        await store.add_requirement_sets(["default.req.a", "gpu.req.a+b"])
        await store.add_requirement_sets(["default.req.a"])
        assert await store.known_pools() == {"gpu", "batch"}
        assert await store.known_requirement_sets() == {"default.req.a", "gpu.req.a+b"}
    finally:
        await store.close()


async def test_a_stalled_body_times_out_and_holds_only_what_it_sent(cluster: Cluster) -> None:
    """Chunked bodies reserve the budget as their bytes arrive, so two stalled batches do
    not keep a third request out; each is answered 408 `body_timeout` at its deadline,
    and what they held is free again."""
    cluster.extra_env["LEVERET_MAX_PAYLOAD_BYTES"] = str(100_000)
    cluster.extra_env["LEVERET_HTTP_BODY_BUDGET_BYTES"] = str(200_000)
    cluster.extra_env["LEVERET_HTTP_BODY_TIMEOUT_S"] = "1"
    cluster.start_scheduler()
    head = (
        "POST /tasks/batch HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    )
    start = b'{"tasks": ['
    stalled = [socket.create_connection(("127.0.0.1", cluster.scheduler_port), timeout=10)]
    stalled.append(socket.create_connection(("127.0.0.1", cluster.scheduler_port), timeout=10))
    began = time.monotonic()
    for sock in stalled:
        sock.sendall(head.encode() + f"{len(start):x}\r\n".encode() + start + b"\r\n")
    # The stalled pair holds 2 x 64 KiB: a request declaring 90 000 bytes does not fit, a
    # small one does (each chunked batch reserved its 6.4 MB limit before).
    big = json.dumps({"kind": "echo", "payload": "x" * 89_900})
    try:
        async with httpx.AsyncClient(base_url=cluster.scheduler_url, timeout=10) as http:
            small = await http.post("/tasks", json={"kind": "echo"})
            assert small.status_code == 202, small.text
            r = await http.post("/tasks", content=big, headers=JSON)
            assert (r.status_code, r.json()["detail"]["error"]) == (503, "busy"), r.text
            for sock in stalled:
                answer = read_answer(sock)
                assert status_of(answer) == 408 and b"body_timeout" in answer, answer
            assert time.monotonic() - began < 5
            r = await http.post("/tasks", content=big, headers=JSON)
            assert r.status_code == 202, r.text
    finally:
        for sock in stalled:
            sock.close()
