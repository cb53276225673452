"""Self-test of the private broker node (``broker_node.BrokerNode``, fixture ``private_broker``)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid

import aio_pika
import httpx
import psutil
import pytest
from broker_node import RABBITMQ_SERVER, BrokerNode, BrokerNodeError, broker_available
from helpers import eventually
from pamqp.commands import Basic

pytestmark = pytest.mark.chaos

N = 10


def _require_server() -> None:
    if not broker_available():
        reason = f"{RABBITMQ_SERVER} not installed (Debian's rabbitmq-server): no private node"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


async def _publish(url: str, queue: str, n: int) -> None:
    conn = await aio_pika.connect(url)
    async with conn:
        channel = await conn.channel(publisher_confirms=True)
        await channel.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})
        for i in range(n):
            message = aio_pika.Message(
                body=f"m{i}".encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT
            )
            confirmation = await channel.default_exchange.publish(message, routing_key=queue)
            assert isinstance(confirmation, Basic.Ack)  # confirmed, so on disk


async def _count(url: str, queue: str) -> int:
    conn = await aio_pika.connect(url)
    async with conn:
        channel = await conn.channel()
        q = await channel.declare_queue(queue, passive=True)
        assert q.declaration_result.message_count is not None
        return q.declaration_result.message_count


async def _has_count(url: str, queue: str, want: int) -> None:
    """Wait until the queue holds `want` (a recovering quorum queue may lag a moment)."""

    async def holds() -> bool:
        return await _count(url, queue) == want

    await eventually(holds, 15, f"{want} messages in {queue}", interval_s=0.2)


async def _drain(url: str, queue: str) -> list[str]:
    conn = await aio_pika.connect(url)
    bodies = []
    async with conn:
        channel = await conn.channel()
        q = await channel.declare_queue(queue, passive=True)
        while (message := await q.get(fail=False, timeout=5)) is not None:
            bodies.append(message.body.decode())
            await message.ack()
    return bodies


async def test_persistent_messages_survive_restart_and_kill(private_broker: BrokerNode) -> None:
    node = private_broker
    url, queue = node.url, f"chaos-self-{uuid.uuid4().hex[:8]}"
    print(f"\n{node.nodename}: start {node.last_start_s:.1f}s (amqp :{node.port})")

    await _publish(url, queue, N)
    assert await _count(url, queue) == N

    took = await node.arestart()
    print(f"restart {took:.1f}s (stop {node.last_stop_s:.1f}s + start {node.last_start_s:.1f}s)")
    assert node.url == url  # same port: clients reconnect to the same URL
    await _has_count(url, queue, N)
    async with httpx.AsyncClient(base_url=node.management_url, timeout=5) as http:
        r = (await http.get(f"/api/queues/%2F/{queue}")).raise_for_status()
    assert (r.json()["type"], r.json()["durable"]) == ("quorum", True)

    t0 = time.monotonic()
    await node.akill()
    print(f"kill {time.monotonic() - t0:.1f}s")
    assert not node.running
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", node.port), timeout=1).close()

    took = await node.astart()
    print(f"start after kill {took:.1f}s")
    await _has_count(url, queue, N)
    assert await _drain(url, queue) == [f"m{i}" for i in range(N)]


def test_cleanup_leaves_no_process_port_or_dir() -> None:
    _require_server()
    node = BrokerNode(management=False)
    try:
        took = node.start()
        print(f"\n{node.nodename} without management: start {took:.1f}s")
        procs = node.processes()
        names = {p.name() for p in procs}
        assert {"beam.smp", "erl_child_setup"} <= names, names
        assert subprocess.run(["pgrep", "-f", node.nodename], capture_output=True).stdout
        with pytest.raises(BrokerNodeError):
            _ = node.management_url
    finally:
        node.cleanup()
    pgrep = subprocess.run(["pgrep", "-af", node.nodename], capture_output=True, text=True)
    assert pgrep.returncode == 1, pgrep.stdout
    alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, alive
    assert not node.base_dir.exists()
    for port in (node.port, node.dist_port):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))


def test_failed_start_raises_with_the_log_tail() -> None:
    _require_server()
    node = BrokerNode(management=False)
    blocker = socket.socket()
    try:
        blocker.bind(("127.0.0.1", node.port))  # the node's AMQP port, taken
        t0 = time.monotonic()
        with pytest.raises(BrokerNodeError, match="could_not_start_listener"):
            node.start(timeout_s=45)
        print(f"\nfailed start noticed after {time.monotonic() - t0:.1f}s")
        assert not node.running
        assert not subprocess.run(["pgrep", "-f", node.nodename], capture_output=True).stdout
    finally:
        blocker.close()
        node.cleanup()
