"""What a handler produces is held to the protocol's sizes by a real worker: a result
too big fails its attempt (not retried), long or unencodable error text is cut and
escaped, a long progress message is cut, and the worker goes on working."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from leveret.cli.procs import Cluster
from leveret.client import Client
from leveret.contracts import (
    MAX_ERROR_MESSAGE_CHARS,
    MAX_RESULT_BYTES,
    TaskProgress,
    TaskResult,
    TaskStatus,
)

pytestmark = pytest.mark.broker

TESTS_DIR = str(Path(__file__).resolve().parents[1])


@pytest.fixture
async def client(cluster: Cluster) -> Client:
    cluster.extra_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (TESTS_DIR, os.environ.get("PYTHONPATH")) if p
    )
    cluster.start_tracker()  # it sends the replies the client waits for
    cluster.start_scheduler()
    cluster.start_worker("bw", "--concurrency", "2", "--handlers", "oversized_handlers")
    async with Client(cluster.amqp_url, namespace=cluster.namespace) as c:
        yield c


def failed_with(result: TaskResult, error_type: str) -> str:
    assert result.status == TaskStatus.FAILED, result
    assert result.error is not None and result.error.type == error_type, result.error
    return result.error.message


async def test_what_a_handler_produces_is_held_to_the_protocol_sizes(client: Client) -> None:
    huge = await client.run("huge_result", timeout_s=30)
    message = failed_with(huge, "result_too_large")
    assert f"over the limit of {MAX_RESULT_BYTES} bytes" in message
    assert huge.attempt == 1  # not retried, though its kind allows 3 retries

    long = failed_with(await client.run("long_error", 100_000, timeout_s=30), "ValueError")
    assert len(long) == MAX_ERROR_MESSAGE_CHARS
    assert long.endswith("… [truncated, 100000 characters in all]")

    # Text JSON cannot carry (lone surrogates) is escaped in an error, refused in a result.
    escaped = failed_with(await client.run("surrogate_error", timeout_s=30), "FileNotFoundError")
    assert escaped == "no such file: 'caf\\udce9.txt'"
    failed_with(await client.run("surrogate_result", timeout_s=30), "result_not_json")

    seen: list[TaskProgress] = []
    noisy = await client.run("noisy_progress", timeout_s=30, on_progress=seen.append)
    assert noisy.result == "done"
    assert seen and seen[-1].message is not None
    assert len(seen[-1].message) == 1000
    assert seen[-1].message.endswith("… [truncated, 5001 characters in all]")

    # The worker is fine, and has both slots: two tasks run at once and complete.
    ids = [await client.submit("echo", n, wait=True) for n in range(2)]
    assert [(await client.result(i, timeout_s=20)).result for i in ids] == [0, 1]
