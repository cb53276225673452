"""``leveret submit``: one task from arguments, or JSON lines from stdin."""

from __future__ import annotations

import json
import sys
from typing import Any

from pydantic import JsonValue, ValidationError

from leveret.client import Client
from leveret.contracts import SubmitTask, TaskStatus
from leveret.errors import LeveretError
from leveret.settings import CommonSettings


def parse_payload(text: str | None) -> JsonValue:
    """A payload argument: JSON if it parses (``0.5``, ``{"a":1}``), else the plain string."""
    if text is None:
        return None
    try:
        value: JsonValue = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value


def _read_lines() -> list[SubmitTask]:
    tasks: list[SubmitTask] = []
    for number, line in enumerate(sys.stdin, 1):
        if not line.strip():
            continue
        try:
            tasks.append(SubmitTask.model_validate_json(line))
        except ValidationError as exc:
            raise LeveretError(f"stdin line {number}: {exc}") from exc
    return tasks


async def submit_command(
    kind: str | None,
    payload: str | None,
    *,
    wait: bool,
    task_id: str | None,
    pool: str | None,
    timeout_s: float | None,
    wait_timeout_s: float,
    priority: int | None = None,
    requires: list[str] | None = None,
) -> int:
    """Submit and print ids (or results with `wait`); the exit code is 1 if any task failed."""
    settings = CommonSettings()
    try:
        if kind is None:
            tasks = _read_lines()
        else:
            tasks = [
                SubmitTask(
                    kind=kind,
                    payload=parse_payload(payload),
                    id=task_id,
                    pool=pool,
                    timeout_s=timeout_s,
                    priority=priority,
                    requires=requires,
                )
            ]
    except (LeveretError, ValidationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        async with Client(
            settings.amqp_url, namespace=settings.namespace, tls=settings.amqp_tls
        ) as client:
            ids = await client.submit_many(tasks, wait=wait)
            if not wait:
                for i in ids:
                    print(i)
                return 0
            worst = 0
            for i in ids:
                result = await client.result(i, wait_timeout_s)
                out: dict[str, Any] = result.model_dump(mode="json")
                print(json.dumps(out))
                if result.status != TaskStatus.COMPLETED:
                    worst = 1
            return worst
    except TimeoutError:
        print(f"error: no result within {wait_timeout_s} s", file=sys.stderr)
        return 3
    except LeveretError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
