"""Pure rules for the tasks the scheduler holds back: due times, cycles, parent outcomes.

No I/O here. A task is *delayed* until its due time (``run_at``, or submission
time + ``delay_s``) and *blocked* until every task in its ``depends_on``
completed. When a parent ends any other way its dependant ends too, without
running: ``failed`` with ``dependency_failed``, or ``cancelled`` with
``dependency_cancelled`` when the parent was cancelled, or ``failed`` with
``dependency_expired`` when the parent's outcome was purged (retention).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from leveret.contracts import SubmitTask, TaskStatus

#: A task due less than this far in the future is dispatched at once, not held.
HOLD_THRESHOLD_S = 0.2


def as_utc(moment: datetime) -> datetime:
    """`moment` in UTC; a naive datetime is taken to be UTC already."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def due_time(task: SubmitTask, submitted_at: datetime) -> datetime | None:
    """When the task may start: its `run_at`, or `submitted_at` + `delay_s`; None if neither."""
    if task.run_at is not None:
        return as_utc(task.run_at)
    if task.delay_s is not None:
        return as_utc(submitted_at) + timedelta(seconds=task.delay_s)
    return None


def is_held(run_at: datetime | None, now: datetime) -> bool:
    """True when a task due at `run_at` must wait in the store rather than go out now."""
    return run_at is not None and (run_at - now).total_seconds() > HOLD_THRESHOLD_S


def find_cycle(graph: Mapping[str, Sequence[str]]) -> list[str] | None:
    """A dependency cycle among the tasks of `graph` (id → parent ids), or None.

    Only edges between ids of `graph` count (other parents were submitted earlier,
    so they cannot depend on these). The cycle is returned as a path that starts
    and ends with the same id: ``["a", "b", "a"]``; a self-dependency is ``["a", "a"]``.
    """
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(graph, white)
    for root in graph:
        if colour[root] != white:
            continue
        # Iterative depth-first search: a deep chain must not hit the recursion limit.
        path: list[str] = [root]
        stack = [iter(graph[root])]
        colour[root] = grey
        while stack:
            parent = next(stack[-1], None)
            if parent is None:
                colour[path.pop()] = black
                stack.pop()
                continue
            state = colour.get(parent)
            if state == grey:
                return [*path[path.index(parent) :], parent]
            if state == white:
                colour[parent] = grey
                path.append(parent)
                stack.append(iter(graph[parent]))
    return None


def describe_cycle(cycle: Sequence[str]) -> str:
    """A cycle as text: ``a → b → a``."""
    return " → ".join(cycle)


@dataclass(frozen=True)
class ParentOutcome:
    """How a parent ended, as the scheduler recorded it (None while it has not)."""

    status: TaskStatus | None
    error_type: str | None = None
    #: The parent's row was purged (it ended longer ago than the retention period).
    gone: bool = False


@dataclass(frozen=True)
class Release:
    """Every parent completed: the task may run."""


@dataclass(frozen=True)
class Wait:
    """Some parent has not ended yet."""


@dataclass(frozen=True)
class End:
    """A parent did not complete: the dependant ends with this status and error."""

    status: TaskStatus
    error_type: str
    message: str


Decision = Release | Wait | End


def decide(parents: Mapping[str, ParentOutcome]) -> Decision:
    """What a blocked task's parents' outcomes mean for it.

    A parent that did not complete ends the dependant at once, even while others
    still run; a cancelled parent wins over a failed one (nobody wanted it to run).
    Parents are examined in id order, so the answer does not depend on arrival order.
    """
    failed: End | None = None
    waiting = False
    for parent_id in sorted(parents):
        outcome = parents[parent_id]
        if outcome.gone:
            failed = failed or End(
                TaskStatus.FAILED,
                "dependency_expired",
                f"parent {parent_id} was purged (it ended longer ago than the retention "
                "period, LEVERET_RETENTION): its outcome is no longer known",
            )
        elif outcome.status is None:
            waiting = True
        elif outcome.status is TaskStatus.CANCELLED:
            what = outcome.error_type or "cancelled"
            return End(
                TaskStatus.CANCELLED,
                "dependency_cancelled",
                f"parent {parent_id} cancelled: {what}",
            )
        elif outcome.status is not TaskStatus.COMPLETED and failed is None:
            what = outcome.error_type or outcome.status.value
            failed = End(
                TaskStatus.FAILED,
                "dependency_failed",
                f"parent {parent_id} {outcome.status.value}: {what}",
            )
    if failed is not None:
        return failed
    return Wait() if waiting else Release()
