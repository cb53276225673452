"""The tracker HTTP API over a SQLite store, in-process (no broker, no server)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from leveret.contracts import TaskError, TaskResult
from leveret.settings import TrackerSettings, sqlite_url
from leveret.tracker.api import create_app
from leveret.tracker.store import TrackerStore


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[TrackerStore]:
    opened = await TrackerStore.open(sqlite_url(tmp_path / "tracker.db"))
    yield opened
    await opened.close()


def client(store: TrackerStore, tmp_path: Path, consuming: bool) -> httpx.AsyncClient:
    settings = TrackerSettings(database_url=sqlite_url(tmp_path / "tracker.db"))
    app = create_app(store, settings, consuming=lambda: consuming)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tracker")


async def test_healthz_is_503_when_not_consuming(store: TrackerStore, tmp_path: Path) -> None:
    async with client(store, tmp_path, consuming=False) as http:
        response = await http.get("/healthz")
    assert response.status_code == 503
    assert response.json()["problems"] == ["not consuming"]
    async with client(store, tmp_path, consuming=True) as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}


async def test_task_view_and_list_validation(store: TrackerStore, tmp_path: Path) -> None:
    failed = TaskResult(
        id="f1", kind="echo", status="failed", error=TaskError(type="boom", message="no")
    )
    await store.apply([failed])
    async with client(store, tmp_path, consuming=True) as http:
        task = (await http.get("/tasks/f1")).json()
        assert task["status"] == "failed"
        assert task["error"] == {"type": "boom", "message": "no"}
        assert task["attempts"] == [] and task["result"] is None
        listed = (await http.get("/tasks", params={"kind": "echo"})).json()
        assert [t["id"] for t in listed["tasks"]] == ["f1"]
        assert "result" not in listed["tasks"][0]
        bad_cursor = await http.get("/tasks", params={"cursor": "zzz"})
        assert bad_cursor.status_code == 422 and "invalid cursor" in bad_cursor.json()["detail"]
        assert (await http.get("/tasks", params={"limit": 1001})).status_code == 422
        assert (await http.get("/tasks", params={"limit": 0})).status_code == 422
        assert (await http.get("/workers")).json() == {"workers": []}
