"""Which lost sessions let a worker keep its registration id (pure logic)."""

from __future__ import annotations

import pytest

from leveret.worker.session import provably_not_fenced


@pytest.mark.parametrize(
    ("reasons", "keeps_id"),
    [
        # a broker restart: a close frame that names its reason
        (
            ["(320, \"CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'"],
            True,
        ),
        # the tracker's fence
        (["[Errno 320] CONNECTION_FORCED - leveret-fenced: no heartbeat for 4 s"], False),
        # a reset, a missed AMQP heartbeat, nothing at all: the fence may have been swallowed
        (["[Errno 104] Connection reset by peer"], False),
        (["Server connection unreachable: heartbeat timeout"], False),
        ([], False),
        # one proof is not enough when another reason proves nothing
        (
            ["[Errno 320] CONNECTION_FORCED - shutdown", "[Errno 104] Connection reset by peer"],
            False,
        ),
    ],
)
def test_only_a_broker_close_frame_that_is_not_a_fence_keeps_the_id(
    reasons: list[str], keeps_id: bool
) -> None:
    assert provably_not_fenced(reasons) is keeps_id
