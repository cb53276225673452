"""Held tasks, pure logic: due times, cycle detection, what parents' outcomes decide."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from leveret.contracts import SubmitTask, TaskMessage, TaskStatus
from leveret.errors import SubmissionError
from leveret.scheduler.admission import check_graph, submission
from leveret.scheduler.holds import (
    End,
    ParentOutcome,
    Release,
    Wait,
    decide,
    due_time,
    find_cycle,
    is_held,
)
from leveret.scheduler.releaser import POLL_S, sleep_for

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_due_time_from_delay_or_run_at() -> None:
    assert due_time(SubmitTask(kind="echo"), NOW) is None
    assert due_time(SubmitTask(kind="echo", delay_s=2.5), NOW) == NOW + timedelta(seconds=2.5)
    at = datetime(2026, 1, 2, 5, 0, tzinfo=timezone(timedelta(hours=2)))
    assert due_time(SubmitTask(kind="echo", run_at=at), NOW) == datetime(
        2026, 1, 2, 3, 0, tzinfo=UTC
    )


def test_a_naive_run_at_is_utc() -> None:
    task = SubmitTask.model_validate_json('{"kind": "echo", "run_at": "2026-01-02T03:04:06"}')
    assert due_time(task, NOW) == NOW + timedelta(seconds=1)


def test_only_tasks_due_later_than_the_threshold_are_held() -> None:
    assert not is_held(None, NOW)
    assert not is_held(NOW - timedelta(seconds=5), NOW)  # in the past: run now
    assert not is_held(NOW + timedelta(seconds=0.1), NOW)
    assert is_held(NOW + timedelta(seconds=0.5), NOW)


def test_releaser_sleeps_until_the_next_due_time_at_most_one_poll() -> None:
    assert sleep_for(None, NOW) == POLL_S
    assert sleep_for(NOW + timedelta(seconds=30), NOW) == POLL_S
    assert sleep_for(NOW + timedelta(seconds=0.03), NOW) == pytest.approx(0.03)
    assert sleep_for(NOW - timedelta(seconds=1), NOW) == 0.0


@pytest.mark.parametrize(
    ("graph", "cycle"),
    [
        ({"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]}, None),  # a diamond
        ({"a": ["a"]}, ["a", "a"]),
        ({"a": ["b"], "b": ["a"]}, ["a", "b", "a"]),
        ({"x": ["a"], "a": ["b"], "b": ["c"], "c": ["a"]}, ["a", "b", "c", "a"]),
        ({"a": ["earlier"], "b": ["a", "elsewhere"]}, None),  # parents outside the request
    ],
)
def test_find_cycle(graph: dict[str, list[str]], cycle: list[str] | None) -> None:
    assert find_cycle(graph) == cycle


def test_find_cycle_survives_a_long_chain() -> None:
    graph = {f"t{i}": [f"t{i - 1}"] if i else [] for i in range(5000)}
    assert find_cycle(graph) is None
    graph["t0"] = ["t4999"]
    found = find_cycle(graph)
    assert found is not None and len(found) == 5001


def _sub(task_id: str, *parents: str) -> object:
    task = SubmitTask(kind="echo", id=task_id, depends_on=list(parents))
    message = TaskMessage(id=task_id, kind="echo", submitted_at=NOW)
    return submission(task, message)


def test_check_graph_names_the_cycle() -> None:
    with pytest.raises(SubmissionError) as info:
        check_graph([_sub("a", "c"), _sub("b", "a"), _sub("c", "b")])  # type: ignore[list-item]
    assert info.value.code == "dependency_cycle"
    assert info.value.status == 422
    assert "a → c → b → a" in info.value.message
    check_graph([_sub("a"), _sub("b", "a", "a")])  # type: ignore[list-item]


def test_submission_keeps_each_parent_once_in_order() -> None:
    s = _sub("x", "b", "a", "b")
    assert s.depends_on == ("b", "a")  # type: ignore[attr-defined]


def done(status: TaskStatus | None, error: str | None = None) -> ParentOutcome:
    return ParentOutcome(status, error)


def test_decide() -> None:
    assert decide({}) == Release()
    assert decide({"a": done(TaskStatus.COMPLETED), "b": done(TaskStatus.COMPLETED)}) == Release()
    assert decide({"a": done(TaskStatus.COMPLETED), "b": done(None)}) == Wait()
    failed = decide({"a": done(None), "b": done(TaskStatus.FAILED, "timeout")})
    assert failed == End(TaskStatus.FAILED, "dependency_failed", "parent b failed: timeout")
    cancelled = decide({"a": done(TaskStatus.FAILED, "x"), "b": done(TaskStatus.CANCELLED)})
    assert isinstance(cancelled, End)
    assert (cancelled.status, cancelled.error_type) == (
        TaskStatus.CANCELLED,
        "dependency_cancelled",
    )
    assert cancelled.message.startswith("parent b cancelled")
    rejected = decide({"a": done(TaskStatus.REJECTED, "invalid_task")})
    assert rejected == End(
        TaskStatus.FAILED, "dependency_failed", "parent a rejected: invalid_task"
    )
