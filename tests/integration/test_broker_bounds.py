"""What producers can pile up in the broker is bounded, and a full queue says so: a
publish to a full intake is nacked (the producer's confirm fails), never dropped."""

from __future__ import annotations

import pytest
from helpers import drop_namespace, ready_messages

from leveret.amqp import connect, open_channel
from leveret.client import Client
from leveret.errors import PublishError
from leveret.topology import Topology

pytestmark = pytest.mark.broker


@pytest.mark.parametrize(
    "bound", [{"intake_max_messages": 5}, {"intake_max_bytes": 5 * 150}], ids=["count", "bytes"]
)
async def test_a_full_intake_nacks_what_a_producer_publishes(
    amqp_url: str, namespace: str, bound: dict[str, int]
) -> None:
    topology = Topology(namespace, **bound)
    connection = await connect(amqp_url, f"test-intake-bound-{namespace}")
    try:
        async with connection:
            await topology.declare(await open_channel(connection))
            async with Client(amqp_url, namespace=namespace) as client:
                accepted = 0
                with pytest.raises(PublishError, match=r"Basic\.Nack"):
                    for i in range(50):  # no scheduler: nothing drains the intake
                        await client.submit("echo", "x" * 100, id=f"t{i}")
                        accepted += 1
                # A quorum queue applies its bound just after an enqueue: one more may fit.
                assert 4 <= accepted <= 6
            # Nothing was dropped: every confirmed submission waits in the intake.
            assert await ready_messages(amqp_url, topology.intake.name) == accepted
    finally:
        drop_namespace(amqp_url, namespace)
