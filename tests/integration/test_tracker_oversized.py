"""Oversized messages on the tracker queue, on a real broker: refused unparsed and
unrecorded, dead-lettered to the `rejected` queue, and the tracker keeps recording."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import test_tracker_service as service
from test_tracker_service import Tracker, eventually, task_result

from leveret.contracts import MAX_EVENT_BYTES, MAX_RESULT_BYTES
from leveret.settings import sqlite_url
from leveret.topology import RK_WORKER_STARTED

pytestmark = pytest.mark.broker

# The in-process tracker of test_tracker_service, with its fixtures.
broker = service.broker
channel = service.channel
tracker_settings = service.tracker_settings
tracker = service.tracker


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """SQLite only: the refusal happens before the store is reached."""
    return sqlite_url(tmp_path / "tracker.db")


async def test_oversized_result_and_event_are_dead_lettered_unrecorded(tracker: Tracker) -> None:
    topo = tracker.topology
    big = task_result("huge", result="x" * MAX_RESULT_BYTES).model_dump_json().encode()
    assert len(big) > MAX_RESULT_BYTES
    await tracker.publish(topo.results_exchange, "completed.default.echo", big)
    event = json.dumps({"type": "worker.started", "pad": "y" * MAX_EVENT_BYTES}).encode()
    await tracker.publish(topo.events_exchange, RK_WORKER_STARTED, event)
    await tracker.publish_result(task_result("after"))
    await tracker.task_with("after", "completed")

    rejected = await tracker.channel.declare_queue(topo.rejected.name, passive=True)
    sizes: set[int] = set()

    async def both_dead_lettered() -> bool | None:
        message = await rejected.get(no_ack=True, fail=False)
        if message is not None:
            sizes.add(len(message.body))
        return True if len(sizes) == 2 else None

    await eventually(both_dead_lettered, "both oversized messages in the rejected queue")
    assert sizes == {len(big), len(event)}
    assert (await tracker.http.get("/tasks/huge")).status_code == 404
    assert (await tracker.http.get("/healthz")).status_code == 200
