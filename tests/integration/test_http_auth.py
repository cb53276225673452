"""Who may call the HTTP APIs: bearer tokens and scopes, task owners, the bind check,
Host headers, content types and HTTPS, on real scheduler and tracker processes."""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from certs import make_pki
from helpers import eventually
from test_backbone import PikaProducer

from leveret.cli.procs import Cluster, free_port, wait_for

pytestmark = pytest.mark.broker

ALICE = "alice-token-0123456789"  # submits and cancels her own tasks
BOB = "bob-token-0123456789"  # submits and cancels his own tasks
READER = "reader-token-0123456789"
ADMIN = "admin-token-0123456789"
TOKENS = f"{ALICE}:submit,cancel;{BOB}:submit,cancel;{READER}:read"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"# operators\n\n{ADMIN} admin\n")
    return path


def test_scheduler_checks_tokens_scopes_and_owners(cluster: Cluster, tokens_file: Path) -> None:
    cluster.extra_env.update(
        {
            "LEVERET_API_TOKENS": TOKENS,
            "LEVERET_API_TOKENS_FILE": str(tokens_file),
            # A burst of 3 tasks per token that cannot refill during the test.
            "LEVERET_HTTP_RATE_PER_S": "0.001",
            "LEVERET_HTTP_BURST": "3",
        }
    )
    scheduler = cluster.start_scheduler()
    url = f"{cluster.scheduler_url}/tasks"
    task = {"kind": "echo", "payload": "hi"}

    assert httpx.get(f"{cluster.scheduler_url}/healthz").status_code == 200
    missing = httpx.post(url, json=task)
    assert missing.status_code == 401, missing.text
    assert missing.headers["www-authenticate"] == "Bearer"
    assert httpx.post(url, json=task, headers=bearer("guess")).status_code == 401
    assert httpx.post(url, json=task, headers=bearer(READER)).status_code == 403
    assert httpx.post(f"{url}/batch", json={"tasks": [task]}, headers=bearer(READER)).is_error

    mine = httpx.post(url, json={**task, "id": "alices"}, headers=bearer(ALICE))
    assert mine.status_code == 202, mine.text
    theirs = httpx.delete(f"{url}/alices", headers=bearer(BOB))
    assert theirs.status_code == 403, theirs.text
    assert httpx.delete(f"{url}/alices", headers=bearer(READER)).status_code == 403
    assert httpx.delete(f"{url}/alices", headers=bearer(ALICE)).status_code == 202

    batch = httpx.post(
        f"{url}/batch", json={"tasks": [{**task, "id": "bobs"}]}, headers=bearer(BOB)
    )
    assert batch.status_code == 202, batch.text
    assert httpx.delete(f"{url}/bobs", headers=bearer(ALICE)).status_code == 403
    assert httpx.delete(f"{url}/bobs", headers=bearer(ADMIN)).status_code == 202

    # An unknown id is a 404 for any token that may cancel, as for no token at all.
    for token in (ALICE, ADMIN):
        unknown = httpx.delete(f"{url}/nobodys", headers=bearer(token))
        assert (unknown.status_code, unknown.json()["detail"]["error"]) == (404, "unknown_task")

    # The rate limit counts per token, whatever X-Client-Id says: alice has used 1 of 3.
    assert httpx.post(f"{url}/batch", json={"tasks": [task] * 2}, headers=bearer(ALICE)).is_success
    spoofed = {**bearer(ALICE), "X-Client-Id": "someone-else"}
    assert httpx.post(url, json=task, headers=spoofed).status_code == 429
    assert httpx.post(url, json=task, headers=bearer(BOB)).status_code == 202

    text = httpx.post(url, content=b'{"kind": "echo"}', headers=bearer(ALICE))
    assert text.status_code == 415, text.text
    rebound = httpx.post(url, json=task, headers={**bearer(ALICE), "Host": "evil.example"})
    assert rebound.status_code == 400, rebound.text
    for token in (ALICE, BOB, READER, ADMIN):
        assert token not in scheduler.log()


async def test_a_task_without_an_owner_is_cancelled_by_admin_only(
    cluster: Cluster, tokens_file: Path
) -> None:
    """A task submitted over AMQP has no owner: a `cancel` token gets 403 (not the 404
    of an unknown id), an `admin` token cancels it."""
    cluster.extra_env.update(
        {"LEVERET_API_TOKENS": TOKENS, "LEVERET_API_TOKENS_FILE": str(tokens_file)}
    )
    cluster.start_scheduler()
    producer = PikaProducer(cluster.amqp_url, cluster.namespace)
    producer.publish(b'{"kind": "echo", "id": "ownerless"}', correlation_id="ownerless")
    producer.connection.close()
    async with httpx.AsyncClient(base_url=cluster.scheduler_url, timeout=10) as http:

        async def accepted() -> bool:
            r = await http.delete("/tasks/ownerless", headers=bearer(ALICE))
            return r.status_code == 403

        await eventually(accepted, 10, "the AMQP submission to be accepted, then refused")
        r = await http.delete("/tasks/ownerless", headers=bearer(ADMIN))
        assert r.status_code == 202, r.text


def test_tracker_serves_https_and_needs_the_read_scope(cluster: Cluster, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    cluster.extra_env.update(
        {
            "LEVERET_API_TOKENS": TOKENS,
            "LEVERET_TLS_CERT_FILE": str(pki.cert),
            "LEVERET_TLS_KEY_FILE": str(pki.key),
        }
    )
    tracker = cluster.spawn("tracker", "tracker", "--port", str(cluster.tracker_port))
    base = f"https://127.0.0.1:{cluster.tracker_port}"
    trusted = ssl.create_default_context(cafile=str(pki.ca))

    def answers() -> bool:
        assert tracker.alive(), tracker.log()
        try:
            return httpx.get(f"{base}/healthz", verify=trusted, timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(answers, 60, "the tracker over HTTPS")
    assert httpx.get(f"{base}/stats", verify=trusted).status_code == 401
    assert httpx.get(f"{base}/stats", verify=trusted, headers=bearer(ALICE)).status_code == 403
    stats = httpx.get(f"{base}/stats", verify=trusted, headers=bearer(READER))
    assert stats.status_code == 200, stats.text
    assert httpx.get(f"{base}/tasks/x", verify=trusted).status_code == 401
    with pytest.raises(httpx.ConnectError):  # an unknown CA is refused
        httpx.get(f"{base}/healthz")


def test_a_public_bind_without_tokens_needs_insecure(cluster: Cluster) -> None:
    refused = subprocess.run(
        [sys.executable, "-m", "leveret.cli", "scheduler", "--host", "0.0.0.0", "--port", "1"],
        env=cluster.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "without authentication" in refused.stdout + refused.stderr

    port = free_port()
    tracker = cluster.spawn(
        "tracker", "tracker", "--host", "0.0.0.0", "--port", str(port), "--insecure"
    )

    def answers() -> bool:
        assert tracker.alive(), tracker.log()
        try:
            return httpx.get(f"http://127.0.0.1:{port}/stats", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(answers, 60, "the tracker on 0.0.0.0 with --insecure")
    assert "without authentication" in tracker.log()
