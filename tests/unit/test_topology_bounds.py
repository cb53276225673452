"""Every stream, and every queue a producer can fill, is declared with a bound."""

from __future__ import annotations

from leveret.contracts import MAX_REQUIRES, RequirementsDeclared
from leveret.topology import REQUIREMENTS_MAX_BYTES, Topology

#: Room for a stream's own framing of one record (AMQP 1.0 sections, chunk header).
FRAMING = 300


def test_streams_and_the_intake_are_bounded() -> None:
    topology = Topology("t")
    streams = [q for q in topology.fixed_queues() if q.arguments["x-queue-type"] == "stream"]
    assert {q.name for q in streams} == {"t.cancellations", "t.requirements"}
    for spec in streams:
        cap = spec.arguments["x-max-length-bytes"]
        # Several segments, so that retention (whole segments) can drop the oldest.
        assert spec.arguments["x-stream-max-segment-size-bytes"] * 8 <= cap
    intake = topology.intake.arguments
    assert intake["x-overflow"] == "reject-publish"  # a nack, never a silent drop
    assert intake["x-max-length"] > 0 and intake["x-max-length-bytes"] > 0
    assert topology.rejected.arguments["x-overflow"] == "drop-head"
    assert Topology("t", intake_max_messages=5).intake.arguments["x-max-length"] == 5


def test_the_requirements_stream_holds_hundreds_of_scheduler_runs() -> None:
    longest = RequirementsDeclared(
        pool="p" * 64, requires=[f"{n:064d}" for n in range(MAX_REQUIRES)]
    )
    one_run = 256 * (len(longest.model_dump_json()) + FRAMING)  # every set, once
    assert REQUIREMENTS_MAX_BYTES // one_run > 500
