"""Submission parsing and validation (pure logic, no broker)."""

from __future__ import annotations

import json

import pytest

from leveret.contracts import SubmitTask
from leveret.errors import SubmissionError
from leveret.scheduler.admission import (
    KindCatalog,
    check_payload_size,
    check_supported,
    envelope,
    parse_body,
)


@pytest.mark.parametrize(
    ("body", "code", "status"),
    [
        (b"\xff", "invalid_encoding", 400),
        (b"{", "invalid_json", 400),
        (b"42", "not_an_object", 400),
        (b'{"payload": 1}', "invalid_task", 422),
        (b"x" * 101, "payload_too_large", 413),
    ],
)
def test_parse_body_says_what_is_wrong(body: bytes, code: str, status: int) -> None:
    with pytest.raises(SubmissionError) as info:
        parse_body(body, max_bytes=100)
    assert (info.value.code, info.value.status) == (code, status)
    assert info.value.message


def test_missing_kind_is_named_in_the_message() -> None:
    with pytest.raises(SubmissionError, match="kind"):
        parse_body(b'{"payload": 1}', max_bytes=100)


def test_unknown_kind_lists_known_ones() -> None:
    kinds = KindCatalog(["resize"])
    with pytest.raises(SubmissionError, match="resize") as info:
        check_supported(SubmitTask(kind="nope"), kinds)
    assert info.value.code == "unknown_kind"
    check_supported(SubmitTask(kind="resize"), kinds)
    assert kinds.add(["resize", "thumb"]) == {"thumb"}


def test_requires_is_refused_only_on_a_limited_kind() -> None:
    kinds = KindCatalog()
    check_supported(SubmitTask(kind="echo", requires=["gpu"]), kinds)
    kinds.limited.add("echo")
    check_supported(SubmitTask(kind="echo"), kinds)
    with pytest.raises(SubmissionError, match="cluster-wide limit") as info:
        check_supported(SubmitTask(kind="echo", requires=["gpu"]), kinds)
    assert info.value.code == "unsupported"


def test_envelope_keeps_requirements_in_canonical_form() -> None:
    task = SubmitTask(kind="echo", requires=["region-eu", "gpu", "gpu"])
    assert envelope(task).requires == ["gpu", "region-eu"]
    assert envelope(SubmitTask(kind="echo")).requires == []


def test_envelope_defaults() -> None:
    task = SubmitTask(kind="echo", payload="p")
    msg = envelope(task, default_id="mid", default_pool="gpu", correlation_id="c", reply_to="r")
    assert (msg.id, msg.pool, msg.correlation_id, msg.reply_to) == ("mid", "gpu", "c", "r")
    explicit = envelope(SubmitTask(kind="echo", id="mine", pool="cpu"), default_id="mid")
    assert (explicit.id, explicit.pool) == ("mine", "cpu")
    assert len(envelope(task).id) == 32
    with pytest.raises(SubmissionError):
        envelope(task, default_pool="Not A Pool")


def test_payload_size_of_batch_items() -> None:
    check_payload_size(SubmitTask(kind="echo", payload="x" * 10), 12)
    with pytest.raises(SubmissionError) as info:
        check_payload_size(SubmitTask(kind="echo", payload="x" * 20), 12)
    assert info.value.status == 413
    # the bound is on the payload's JSON size (quotes included): 10 chars + 2 quotes fits 12
    check_payload_size(SubmitTask(kind="echo", payload="x" * 10), len(json.dumps("x" * 10)))
    with pytest.raises(SubmissionError):
        check_payload_size(SubmitTask(kind="echo", payload="x" * 11), len(json.dumps("x" * 10)))
