"""The wire contract: models round-trip through JSON and match the published schemas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import leveret
from leveret.contracts import (
    PUBLISHED_MODELS,
    SubmitTask,
    TaskResult,
    TasksAccepted,
    TaskStatus,
    WorkerHeartbeat,
    WorkerInfo,
    decode_event,
    utcnow,
)

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "docs" / "schema"


@pytest.mark.parametrize("stem", sorted(PUBLISHED_MODELS))
def test_published_schema_matches_the_model(stem: str) -> None:
    path = SCHEMA_DIR / f"{stem}.json"
    assert path.exists(), f"{path} missing: run `leveret schema`"
    published = json.loads(path.read_text())
    assert published == PUBLISHED_MODELS[stem].model_json_schema(), (
        f"{path.name} drifted from the model: run `leveret schema` and review the diff"
    )


def test_no_stray_schema_files() -> None:
    assert {p.stem for p in SCHEMA_DIR.glob("*.json")} == set(PUBLISHED_MODELS)


def test_result_round_trips() -> None:
    result = TaskResult(
        id="a", kind="echo", status=TaskStatus.COMPLETED, result={"x": [1, 2]}, attempt=2
    )
    again = TaskResult.model_validate_json(result.model_dump_json())
    assert again == result


def test_events_are_discriminated_by_type() -> None:
    info = WorkerInfo(
        id="w", host="h", pid=1, pool="default", concurrency=2, kinds=["echo"], version="0"
    )
    beat = WorkerHeartbeat(worker=info, in_flight=["t1"])
    assert decode_event(beat.model_dump_json().encode()) == beat
    accepted = TasksAccepted(tasks=[])
    assert isinstance(decode_event(accepted.model_dump_json().encode()), TasksAccepted)
    assert utcnow().tzinfo is not None


@pytest.mark.parametrize(
    "body",
    [
        {"payload": 1},
        {"kind": ""},
        {"kind": "echo", "id": "has space"},
        {"kind": "echo", "priority": 10},
        {"kind": "echo", "timeout_s": 0},
        {"kind": "echo", "unknown": 1},
        {"kind": "echo", "pool": "UPPER"},
    ],
)
def test_invalid_submissions_are_refused(body: dict) -> None:
    with pytest.raises(ValueError):
        SubmitTask.model_validate(body)


def test_package_all_is_complete_and_sorted() -> None:
    assert leveret.__all__ == sorted(leveret.__all__)
    for name in leveret.__all__:
        assert hasattr(leveret, name), name
