"""Property tests of the submission decoder: any bytes in, a task within every bound of
the protocol or a SubmissionError out, nothing else."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from leveret.contracts import (
    MAX_DELAY_S,
    MAX_PAYLOAD_DEPTH,
    MAX_PAYLOAD_INT,
    MIN_PAYLOAD_INT,
    MIN_RUN_AT,
    SubmitTask,
)
from leveret.errors import SubmissionError
from leveret.scheduler.admission import parse_body

LIMIT = 64 * 1024
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=30,
)
fields = st.sampled_from(
    [
        "kind",
        "payload",
        "id",
        "pool",
        "priority",
        "depends_on",
        "timeout_s",
        "max_retries",
        "requires",
        "delay_s",
        "run_at",
        "extra",
    ]
)
hostile_values = (
    json_values
    | st.sampled_from(["echo", "9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00"])
    | st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat())
    | st.integers(min_value=0, max_value=12).map(lambda n: "[" * (n * 20) + "]" * (n * 20))
)


def _depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


def _number_out_of_bounds(item: object) -> bool:
    if isinstance(item, float):
        return not math.isfinite(item)
    return isinstance(item, int) and not MIN_PAYLOAD_INT <= item <= MAX_PAYLOAD_INT


def _within_bounds(value: object) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif _number_out_of_bounds(item):
            return False
    return True


def check(body: bytes) -> None:
    """The property: a SubmitTask within bounds, or a SubmissionError with a 4xx."""
    try:
        task = parse_body(body, LIMIT)
    except SubmissionError as err:
        assert 400 <= err.status < 500 and err.code and err.message
        return
    assert isinstance(task, SubmitTask)
    assert _depth(task.payload) <= MAX_PAYLOAD_DEPTH
    assert _within_bounds(task.payload)
    if task.run_at is not None:
        now = datetime.now(UTC)
        assert MIN_RUN_AT <= task.run_at <= now + timedelta(seconds=MAX_DELAY_S + 60)
    task.model_dump_json()  # what goes on the wire can be written


@FUZZ
@given(st.binary(max_size=2048))
@example(b'{"kind":"echo","payload":' + b"[" * 5000 + b"]" * 5000 + b"}")
@example(b'{"kind":"echo","payload":"\\ud800"}')
@example(b'{"kind":"echo","payload":1e400}')
@example(b'{"kind":"echo","priority":' + b"9" * 5000 + b"}")
@example(b"\xff\xfe")
def test_any_bytes_decode_to_a_task_or_a_refusal(body: bytes) -> None:
    check(body)


@FUZZ
@given(st.dictionaries(fields, hostile_values, max_size=6))
def test_any_json_object_decodes_to_a_task_or_a_refusal(obj: dict) -> None:
    check(json.dumps(obj, allow_nan=True).encode())


@FUZZ
@given(json_values)
def test_any_payload_decodes_to_a_task_or_a_refusal(payload: object) -> None:
    check(json.dumps({"kind": "echo", "payload": payload}, allow_nan=True).encode())


@pytest.mark.parametrize("depth", [MAX_PAYLOAD_DEPTH, MAX_PAYLOAD_DEPTH + 1])
def test_payload_depth_limit_is_exact(depth: int) -> None:
    body = b'{"kind":"echo","payload":' + b"[" * depth + b"]" * depth + b"}"
    if depth <= MAX_PAYLOAD_DEPTH:
        assert parse_body(body, LIMIT).payload is not None
    else:
        with pytest.raises(SubmissionError) as err:
            parse_body(body, LIMIT)
        assert err.value.code == "too_deep"
