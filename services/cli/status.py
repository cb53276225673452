"""``leveret status``: counts by status, workers and recent tasks, from the tracker API."""

from __future__ import annotations

import json
import os
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table


def _get(base: str, path: str, **params: Any) -> Any:
    token = os.environ.get("LEVERET_API_TOKEN")  # needs the `read` scope
    headers = {"Authorization": f"Bearer {token}"} if token else None
    response = httpx.get(f"{base.rstrip('/')}{path}", params=params, headers=headers, timeout=10)
    response.raise_for_status()
    return response.json()


def show_status(tracker_url: str, *, as_json: bool = False) -> int:
    """Print the status tables; return 0, or 2 if the tracker cannot be reached."""
    console = Console()
    try:
        stats = _get(tracker_url, "/stats")
        workers = _get(tracker_url, "/workers")["workers"]
        recent = _get(tracker_url, "/tasks", limit=10)["tasks"]
    except httpx.HTTPError as exc:
        console.print(f"[red]cannot reach the tracker at {tracker_url}: {exc}")
        return 2
    if as_json:
        print(json.dumps({"stats": stats, "workers": workers, "recent": recent}, indent=2))
        return 0

    counts = Table(title="Tasks by status")
    counts.add_column("status")
    counts.add_column("count", justify="right")
    for status, n in stats["counts"].items():
        counts.add_row(status, str(n))
    console.print(counts)

    table = Table(title=f"Workers ({len(workers)})")
    for col in ("id", "state", "pool", "capabilities", "busy", "completed", "failed", "last seen"):
        table.add_column(col)
    for w in workers:
        table.add_row(
            str(w["id"]),
            str(w.get("state")),
            str(w.get("pool")),
            ",".join(w.get("capabilities") or []) or "-",
            f"{len(w.get('in_flight') or [])}/{w.get('concurrency')}",
            str(w.get("completed", 0)),
            str(w.get("failed", 0)),
            str(w.get("last_seen")),
        )
    console.print(table)

    tasks = Table(title="Recent tasks")
    for col in ("id", "kind", "status", "worker", "attempt", "error"):
        tasks.add_column(col)
    for t in recent:
        error = t.get("error") or {}
        tasks.add_row(
            str(t["id"]),
            str(t.get("kind")),
            str(t.get("status")),
            str(t.get("worker") or "-"),
            str(t.get("attempt")),
            str(error.get("type") or ""),
        )
    console.print(tasks)
    return 0
