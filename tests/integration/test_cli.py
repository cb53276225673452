"""The `leveret` command as a user runs it: submit (args and stdin), status."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from leveret.cli.procs import Cluster

pytestmark = pytest.mark.broker


def leveret(cluster: Cluster, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**cluster.env(), "COLUMNS": "160", "LEVERET_TRACKER_URL": cluster.tracker_url}
    return subprocess.run(
        [sys.executable, "-m", "leveret.cli", *args],
        input=stdin,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.getcwd(),
    )


def test_submit_wait_stdin_and_status(cluster: Cluster) -> None:
    cluster.start_tracker()
    cluster.start_scheduler()
    cluster.start_worker("cli-w", "--concurrency", "2")

    done = leveret(cluster, "submit", "echo", '{"a": 1}', "--wait")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["status"], result["result"]) == ("completed", {"a": 1})

    plain = leveret(cluster, "submit", "echo", "just words", "--wait", "--id", "cli-1")
    assert json.loads(plain.stdout)["result"] == "just words"

    failed = leveret(cluster, "submit", "fail", "nope", "--wait")
    assert failed.returncode == 1
    assert json.loads(failed.stdout)["error"]["type"] == "requested_failure"

    lines = "\n".join(json.dumps({"kind": "echo", "payload": i}) for i in range(3))
    many = leveret(cluster, "submit", "--wait", stdin=lines)
    assert many.returncode == 0, many.stderr
    assert sorted(json.loads(line)["result"] for line in many.stdout.splitlines()) == [0, 1, 2]

    bad = leveret(cluster, "submit", stdin='{"payload": "no kind"}\n')
    assert bad.returncode == 2
    assert "stdin line 1" in bad.stderr

    status = leveret(cluster, "status")
    assert status.returncode == 0, status.stderr
    for needle in ("Tasks by status", "completed", "Workers", "cli-w", "alive", "Recent tasks"):
        assert needle in status.stdout, status.stdout
    raw = json.loads(leveret(cluster, "status", "--json").stdout)
    assert raw["stats"]["counts"]["completed"] >= 5

    unreachable = leveret(cluster, "status", "--tracker-url", "http://127.0.0.1:9")
    assert unreachable.returncode == 2
