"""The worker's size bounds and bounded memory, as pure logic."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from leveret.contracts import (
    MAX_ERROR_TYPE_CHARS,
    MAX_EVENT_BYTES,
    MAX_RESULT_BYTES,
    StartedTask,
    TaskProgress,
    TasksStarted,
    TaskStatus,
    WorkerHeartbeat,
    WorkerInfo,
)
from leveret.handlers import MAX_PROGRESS_MESSAGE_CHARS, clip
from leveret.settings import WorkerSettings
from leveret.worker.cancels import CancelledIds
from leveret.worker.execution import NOT_RETRIED, Outcome, result_message, task_error
from leveret.worker.reports import STARTED_PER_EVENT, bounded_heartbeat

FIELDS = {"id": "t1", "kind": "k", "pool": "default", "attempt": 1, "worker": "w"}


def test_clip_marks_a_cut_and_escapes_lone_surrogates() -> None:
    assert clip("short", 10) == "short"
    cut = clip("x" * 500, 100)
    assert len(cut) == 100 and cut.endswith("… [truncated, 500 characters in all]")
    assert clip("caf\udce9", 100) == "caf\\udce9"
    escaped = clip("\udce9" * 30, 100)  # escaping makes it longer than the limit
    assert len(escaped) == 100 and escaped.encode()


def test_errors_are_held_to_the_protocol_bounds() -> None:
    error = task_error("T" * 1000 + "\udce9", "m" * 20_000)
    assert len(error.type) == MAX_ERROR_TYPE_CHARS
    assert error.message.endswith("[truncated, 20000 characters in all]")
    assert "result_too_large" in NOT_RETRIED


def test_a_result_too_large_fails_within_the_limit() -> None:
    limit = 64 * 1024
    result, body = result_message(FIELDS, Outcome(TaskStatus.COMPLETED, "x" * limit), limit)
    assert result.status == TaskStatus.FAILED and result.error is not None
    assert result.error.type == "result_too_large"
    assert str(limit) in result.error.message and len(body) < limit
    ok, body = result_message(FIELDS, Outcome(TaskStatus.COMPLETED, {"a": 1}), limit)
    assert ok.result == {"a": 1} and body == ok.model_dump_json().encode()
    bad, _ = result_message(FIELDS, Outcome(TaskStatus.COMPLETED, "\udce9"), limit)
    assert bad.error is not None and bad.error.type == "result_not_json"


def test_the_result_limit_setting_stays_within_the_protocol() -> None:
    assert WorkerSettings().max_result_bytes == MAX_RESULT_BYTES
    with pytest.raises(ValidationError):
        WorkerSettings(max_result_bytes=MAX_RESULT_BYTES + 1)
    with pytest.raises(ValidationError):
        WorkerSettings(max_result_bytes=1000)  # too small for the failure itself


def test_events_stay_under_the_event_limit() -> None:
    info = WorkerInfo(
        id="w" * 200, host="h", pid=1, pool="default", concurrency=10_000, kinds=[], version="1"
    )
    ids = [f"{n:0200d}" for n in range(2000)]
    beat = bounded_heartbeat(WorkerHeartbeat(worker=info, in_flight=ids))
    assert len(beat.model_dump_json()) <= MAX_EVENT_BYTES
    assert 100 < len(beat.in_flight) < len(ids) and beat.in_flight == ids[: len(beat.in_flight)]
    small = WorkerHeartbeat(worker=info, in_flight=ids[:3])
    assert bounded_heartbeat(small) is small
    now = datetime.now(UTC)
    started = [StartedTask(id=i, attempt=100, started_at=now) for i in ids[:STARTED_PER_EVENT]]
    notice = TasksStarted(worker="w" * 200, tasks=started)
    assert len(notice.model_dump_json()) < MAX_EVENT_BYTES
    assert TaskProgress.model_fields["message"].metadata[0].max_length == (
        MAX_PROGRESS_MESSAGE_CHARS
    )


def test_cancelled_ids_are_forgotten_by_count_and_by_age() -> None:
    clock = [1_000_000.0]
    ids = CancelledIds(max_ids=3, max_age_s=100, clock=lambda: clock[0])
    at = datetime.fromtimestamp(clock[0], UTC)
    for n in range(5):
        ids.add(f"t{n}", f"reason {n}", at)
    assert len(ids) == 3 and ids.get("t0") is None and ids.get("t4") == "reason 4"
    clock[0] += 101  # past the age: not honoured any more, and dropped on the next add
    assert ids.get("t4") is None
    ids.add("fresh", "r", at + timedelta(days=365))  # a clock ahead counts as now
    assert len(ids) == 1 and ids.get("fresh") == "r"
    clock[0] += 101
    assert ids.get("fresh") is None
