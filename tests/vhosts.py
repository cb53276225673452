"""A vhost of the test run's own: made through the management API, else with
`rabbitmqctl` on a local broker; never the default vhost without saying so."""

from __future__ import annotations

import os
import shutil
import subprocess
from urllib.parse import quote, urlsplit, urlunsplit

import httpx

#: Port of the broker's management API (the tests' brokers all use the default).
MANAGEMENT_PORT = 15672


def with_vhost(url: str, vhost: str) -> str:
    """`url` pointed at `vhost`."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + quote(vhost, safe=""), "", ""))


def _rabbitmqctl(url: str) -> str | None:
    """The local `rabbitmqctl`, if the broker is local and the script is installed."""
    if urlsplit(url).hostname not in ("127.0.0.1", "localhost", "::1"):
        return None
    ctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    return ctl if os.path.exists(ctl) else None


def _create_with_api(url: str, vhost: str, api_port: int) -> bool:
    parts = urlsplit(url)
    user, password = parts.username or "guest", parts.password or "guest"
    api = f"http://{parts.hostname}:{api_port}/api"
    try:
        r = httpx.put(f"{api}/vhosts/{quote(vhost, safe='')}", auth=(user, password), timeout=10)
        if r.status_code not in (201, 204):
            return False
        httpx.put(
            f"{api}/permissions/{quote(vhost, safe='')}/{quote(user, safe='')}",
            json={"configure": ".*", "write": ".*", "read": ".*"},
            auth=(user, password),
            timeout=10,
        ).raise_for_status()
        return True
    except httpx.HTTPError:
        return False


def _create_with_ctl(url: str, vhost: str) -> bool:
    ctl = _rabbitmqctl(url)
    if ctl is None:
        return False
    user = urlsplit(url).username or "guest"
    if subprocess.run([ctl, "add_vhost", vhost], capture_output=True).returncode != 0:
        return False
    perms = [ctl, "set_permissions", "-p", vhost, user, ".*", ".*", ".*"]
    return subprocess.run(perms, capture_output=True).returncode == 0


def create_vhost(url: str, vhost: str, api_port: int = MANAGEMENT_PORT) -> str | None:
    """Create `vhost` with full rights for the URL's user; say how (`api`, `rabbitmqctl`),
    or None when neither way works."""
    if _create_with_api(url, vhost, api_port):
        return "api"
    if _create_with_ctl(url, vhost):
        return "rabbitmqctl"
    return None


def delete_vhost(url: str, vhost: str, api_port: int = MANAGEMENT_PORT) -> bool:
    """Delete `vhost` (and everything in it); True when it is gone."""
    parts = urlsplit(url)
    auth = (parts.username or "guest", parts.password or "guest")
    try:
        r = httpx.delete(
            f"http://{parts.hostname}:{api_port}/api/vhosts/{quote(vhost, safe='')}",
            auth=auth,
            timeout=30,
        )
        if r.status_code in (204, 404):
            return True
    except httpx.HTTPError:
        pass
    ctl = _rabbitmqctl(url)
    if ctl is None:
        return False
    return subprocess.run([ctl, "delete_vhost", vhost], capture_output=True).returncode == 0


def vhost_exists(url: str, vhost: str) -> bool:
    """Whether the broker has `vhost`, asked over AMQP (no management API needed)."""
    import pika

    try:
        connection = pika.BlockingConnection(pika.URLParameters(with_vhost(url, vhost)))
    except pika.exceptions.AMQPError:
        return False
    connection.close()
    return True
