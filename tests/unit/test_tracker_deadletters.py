"""Reading why a work message was dead-lettered, and the failure it is recorded with."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from leveret.topology import WORK_DELIVERY_LIMIT
from leveret.tracker.deadletters import dead_letter_error, death_of

WHEN = datetime(2024, 5, 1, tzinfo=UTC)


def x_death(reason: str, count: int = 1) -> dict[str, object]:
    """An ``x-death`` entry as aio-pika decodes it (RabbitMQ 3.10 writes count=1)."""
    return {"count": count, "reason": reason, "queue": "leveret.work.default", "time": WHEN,
            "exchange": "leveret.work", "routing-keys": ["default"]}  # fmt: skip


def test_delivery_limit_entry_wins_and_its_count_is_used() -> None:
    headers = {"x-death": [x_death("rejected"), x_death("delivery_limit", 7)]}
    assert death_of(headers) == ("delivery_limit", 7)


def test_rabbitmq_count_of_one_means_at_least_the_limit_plus_one_deliveries() -> None:
    # What RabbitMQ 3.10 really sends: count counts dead-letterings, and the dead-letter
    # queue restarts x-delivery-count at 0.
    headers = {"x-death": [x_death("delivery_limit")], "x-delivery-count": 0}
    assert death_of(headers) == ("delivery_limit", WORK_DELIVERY_LIMIT + 1)


def test_fallbacks_delivery_count_header_then_unknown() -> None:
    assert death_of({"x-delivery-count": 5}) == (None, 5)
    assert death_of({"x-first-death-reason": b"rejected"}) == ("rejected", None)
    assert death_of({}) == (None, None)
    assert death_of(None) == (None, None)
    assert death_of({"x-death": "garbage", "x-delivery-count": "x"}) == (None, None)


def test_other_reasons_keep_their_own_count() -> None:
    assert death_of({"x-death": [x_death("expired")]}) == ("expired", 1)
    assert death_of({"x-death": [x_death("rejected")]}) == ("rejected", 1)


@pytest.mark.parametrize(
    ("reason", "count", "why", "expected"),
    [
        ("delivery_limit", 4, None,
         ("poison", "worker crashed 4 times running it (delivery limit reached)")),
        (None, None, None,
         ("poison", "workers crashed running it until the delivery limit was reached")),
        ("rejected", 1, "payload is not JSON",
         ("invalid_message", "a worker rejected the message: payload is not JSON")),
        ("rejected", 1, None, ("invalid_message", "a worker rejected the message")),
        ("maxlen", 1, None, ("dead_lettered", "the broker dead-lettered it (maxlen)")),
    ],
)  # fmt: skip
def test_dead_letter_error(
    reason: str | None, count: int | None, why: str | None, expected: tuple[str, str]
) -> None:
    error = dead_letter_error(reason, count, why)
    assert (error.type, error.message) == expected
