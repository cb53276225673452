"""``leveret broker-setup`` against the real local broker: per-role users in a fresh
vhost, twice (idempotent), then a task end to end with each service on its role's
user, and a producer refused where it may not publish."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import aio_pika
import httpx
import pytest
from aiormq.exceptions import ChannelAccessRefused

from leveret.cli.procs import Cluster
from leveret.client import Client
from leveret.envfile import read_env_file
from leveret.topology import Topology

ADMIN = "http://guest:guest@127.0.0.1:15672/"
API = "http://127.0.0.1:15672/api"


@pytest.fixture
def fresh(base_amqp_url: str, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A vhost and namespace nobody uses; the vhost and the users made are deleted after."""
    ns = f"s{uuid.uuid4().hex[:8]}"
    vhost = f"leveret-test-setup-{ns}"
    yield vhost, ns
    auth = ("guest", "guest")
    httpx.delete(f"{API}/vhosts/{quote(vhost, safe='')}", auth=auth)
    for role in ("producer", "scheduler", "worker", "tracker", "fencer"):
        httpx.delete(f"{API}/users/{ns}-{role}", auth=auth)


def setup(vhost: str, ns: str, env_file: Path) -> None:
    args = ["broker-setup", "--admin-url", ADMIN, "--vhost", vhost, "--env-file", str(env_file)]
    args.append("--role-files")
    done = subprocess.run(
        [sys.executable, "-m", "leveret.cli", *args, "--namespace", ns],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


async def test_role_users_run_a_task_and_a_producer_cannot_publish_results(
    fresh: tuple[str, str], tmp_path: Path
) -> None:
    vhost, ns = fresh
    env_file = tmp_path / "roles.env"
    setup(vhost, ns, env_file)
    first = read_env_file(env_file)
    setup(vhost, ns, env_file)
    assert read_env_file(env_file) == first  # idempotent: same users, same passwords
    assert oct(env_file.stat().st_mode & 0o777) == "0o600"
    assert first["LEVERET_WORKER_USERS"] == f"{ns}-worker"

    cluster = Cluster(namespace=ns, amqp_url=first["LEVERET_SCHEDULER_AMQP_URL"], workdir=tmp_path)
    cluster.extra_env["LEVERET_ENV_FILE"] = str(env_file)
    try:
        cluster.start_scheduler()
        cluster.start_tracker()
        own = env_file.parent / "worker" / env_file.name  # --role-files: the worker's lines only
        others = [v for k, v in first.items() if k.endswith("_URL") and "_WORKER_" not in k]
        assert not set(others) & set(read_env_file(own).values())
        assert oct(own.stat().st_mode & 0o777) == "0o600"
        cluster.start_worker("w-role", env={"LEVERET_ENV_FILE": str(own)})
        async with Client(first["LEVERET_PRODUCER_AMQP_URL"], namespace=ns) as client:
            task_id = await client.submit("echo", "hi", wait=True)
            assert (await client.result(task_id, timeout_s=30)).result == "hi"

        producer = await aio_pika.connect(first["LEVERET_PRODUCER_AMQP_URL"])
        async with producer:
            channel = await producer.channel()
            results = await channel.get_exchange(Topology(ns).results_exchange, ensure=False)
            with pytest.raises(ChannelAccessRefused):
                await results.publish(aio_pika.Message(b"{}"), "completed.default.echo")
    finally:
        cluster.stop_all(timeout_s=15)
