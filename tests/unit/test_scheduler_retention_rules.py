"""Retention's pure rules: how often the scheduler purges, and what a purged parent means."""

from __future__ import annotations

from leveret.contracts import TaskStatus
from leveret.scheduler.holds import End, ParentOutcome, Wait, decide
from leveret.scheduler.retention import PURGE_EVERY_S, purge_every


def test_purges_come_every_tenth_of_the_retention_at_most_a_minute_apart() -> None:
    assert purge_every(7 * 86400) == PURGE_EVERY_S == 60
    assert purge_every(300) == 30
    assert purge_every(0.2) == 0.1


def test_a_purged_parent_ends_its_dependant_unless_another_was_cancelled() -> None:
    gone = ParentOutcome(None, gone=True)
    expired = decide({"a": gone, "b": ParentOutcome(None)})
    assert isinstance(expired, End)
    assert (expired.status, expired.error_type) == (TaskStatus.FAILED, "dependency_expired")
    cancelled = decide({"a": gone, "b": ParentOutcome(TaskStatus.CANCELLED)})
    assert isinstance(cancelled, End) and cancelled.error_type == "dependency_cancelled"
    assert decide({"a": ParentOutcome(None)}) == Wait()
