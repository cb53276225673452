"""The Python client against real services: submit, wait, results by correlation id."""

from __future__ import annotations

import pytest

from leveret.cli.procs import Cluster
from leveret.client import Client
from leveret.contracts import TaskStatus

pytestmark = pytest.mark.broker


async def test_client_runs_tasks_and_gets_results(cluster: Cluster) -> None:
    cluster.start_tracker()  # it sends the one terminal reply a waiting client gets
    cluster.start_scheduler()
    cluster.start_worker("w1", "--concurrency", "4")
    async with Client(cluster.amqp_url, namespace=cluster.namespace) as client:
        result = await client.run("echo", {"a": 1}, timeout_s=30)
        assert result.status == TaskStatus.COMPLETED
        assert result.result == {"a": 1}
        failed = await client.run("fail", "nope", timeout_s=30)
        assert failed.status == TaskStatus.FAILED
        assert failed.error is not None and failed.error.type == "requested_failure"
        slow = await client.submit("sleep", 5, timeout_s=0.2, wait=True)
        timed_out = await client.result(slow, timeout_s=30)
        assert timed_out.status == TaskStatus.FAILED
        assert timed_out.error is not None and timed_out.error.type == "timeout"
