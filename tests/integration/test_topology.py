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
        required = await second.declare_requirement("default", ["tpu", "gpu"])
        assert required.name == f"{namespace}.work.default.req.gpu+tpu"
        again = await topology.declare(channel)
        assert (await again.declare_requirement("default", ["gpu", "tpu"])).name == required.name
        await delete_namespace(channel, topology, ["default"], requirement_sets=[["gpu", "tpu"]])
        check = await connection.channel()
        with pytest.raises(Exception, match="NOT_FOUND"):
            await check.declare_queue(topology.intake.name, passive=True)
        check = await connection.channel()
        with pytest.raises(Exception, match="NOT_FOUND"):
            await check.declare_queue(required.name, passive=True)
