"""Topology declaration on a real broker: idempotent, and cleaned up completely."""

from __future__ import annotations

import pytest

from leveret.amqp import connect, open_channel
from leveret.topology import Topology, delete_namespace

pytestmark = pytest.mark.broker


async def test_declaring_twice_succeeds_and_delete_removes_everything(
    amqp_url: str, namespace: str
) -> None:
    topology = Topology(namespace)
    connection = await connect(amqp_url, f"test-topology-{namespace}")
    async with connection:
        channel = await open_channel(connection)
        first = await topology.declare(channel)
        await first.declare_pool("default")
        second = await topology.declare(channel)  # another service starting: same arguments
        queues = await second.declare_pool("default")
        assert {q.name for q in queues.values()} == {
            f"{namespace}.work.default",
            f"{namespace}.work.default.high",
            f"{namespace}.work.default.low",
        }
        await delete_namespace(channel, topology, ["default"])
        check = await connection.channel()
        with pytest.raises(Exception, match="NOT_FOUND"):
            await check.declare_queue(topology.intake.name, passive=True)
