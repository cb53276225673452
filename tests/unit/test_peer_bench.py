"""The peer comparison script (deploy/bench/), checked without Celery or Dramatiq.

`leveret bench` runs deploy/bench/peers.py on an interpreter of its own and reads the
JSON object on the last line of its stdout, so these tests hold the parts that contract
rests on: exact pins, no import of leveret, the command line and the keys of a result.
The script's module is loaded from its file; its pure parts need only psutil.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "deploy" / "bench"


@pytest.fixture(scope="module")
def peers() -> ModuleType:
    spec = importlib.util.spec_from_file_location("peers_under_test", BENCH / "peers.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_every_requirement_is_pinned_exactly() -> None:
    lines = [
        line.strip()
        for line in (BENCH / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    pins = dict(line.split("==", 1) for line in lines)
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][0-9A-Za-z.]*", line) for line in lines)
    assert {"celery", "kombu", "dramatiq", "redis", "pika", "psutil"} <= pins.keys()


def test_no_peer_module_imports_leveret() -> None:
    for path in BENCH.glob("*.py"):
        tree = ast.parse(path.read_text())
        names = [
            alias.name for n in ast.walk(tree) if isinstance(n, ast.Import) for alias in n.names
        ]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [name for name in names if name.split(".")[0] == "leveret"], path.name


def test_the_command_line_defaults_to_every_path_and_refuses_unknown_ones(
    peers: ModuleType,
) -> None:
    args = peers.parse_args([])
    assert args.paths == list(peers.PATHS)
    assert args.tasks == 3000
    assert args.amqp_url == "amqp://guest:guest@127.0.0.1:5672/"
    assert peers.parse_args(["--paths", "celery-fast, dramatiq-light"]).paths == [
        "celery-fast",
        "dramatiq-light",
    ]
    with pytest.raises(SystemExit):
        peers.parse_args(["--paths", "celery-slow"])


def test_a_setup_runs_on_its_own_vhost_with_the_same_credentials(peers: ModuleType) -> None:
    broker = peers.Broker("amqp://bench:s%40cret@rabbit:5673/", "http://rabbit:15672/")
    assert broker.url_for("leveret-peers-x/1") == (
        "amqp://bench:s%40cret@rabbit:5673/leveret-peers-x%2F1"
    )
    assert (broker.user, broker.password) == ("bench", "s@cret")


def test_a_result_carries_the_keys_the_readme_documents(peers: ModuleType) -> None:
    measured = peers.Measured(tasks=200, seconds=2.0, latencies_s=[i / 1000 for i in range(1, 201)])
    result = peers.Result(
        "celery-fast-light", measured, {"main": 0.1, "child-1": 0.3}, {"main": 1, "child-1": 2}
    )
    out = result.as_json()
    assert set(out) == {
        "setup",
        "mode",
        "tasks",
        "seconds",
        "send_seconds",
        "tasks_per_s",
        "latency_ms",
        "cpu_s",
        "cpu_s_per_1000",
        "peak_rss_bytes",
        "notes",
    }
    assert out["mode"] == "light"
    assert out["tasks_per_s"] == 100.0
    assert out["cpu_s_per_1000"] == 2.0
    assert set(out["latency_ms"]) == {"p50", "p95", "p99"}
    assert 99 <= out["latency_ms"]["p50"] <= 102
    documented = (BENCH / "README.md").read_text()
    assert all(f"`results.*.{key}`" in documented for key in out)
