"""Fixtures for chaos tests: a private RabbitMQ node a test may stop, kill and restart."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from broker_node import RABBITMQ_SERVER, BrokerNode, broker_available


@pytest.fixture
def private_broker(request: pytest.FixtureRequest) -> Iterator[BrokerNode]:
    """A started private node (management on), stopped and removed at teardown.

    Never the shared broker: kill or restart it at will. Its URLs: ``.url`` and
    ``.management_url``. Skipped without ``rabbitmq-server`` unless ``CI`` is set.
    """
    if not broker_available():
        reason = f"{RABBITMQ_SERVER} not installed (Debian's rabbitmq-server): no private node"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    node = BrokerNode()
    try:
        node.start()
        yield node
    finally:
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(f"----- private broker {node.nodename} -----\n{node.log_tail(80)}")
        node.cleanup()
