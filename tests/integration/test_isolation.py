"""The suite's own isolation: each run gets a vhost of its own, with or without the
management API, and leaves none behind."""

from __future__ import annotations

import socket
import uuid
from urllib.parse import urlsplit

import pytest
from vhosts import _rabbitmqctl, create_vhost, delete_vhost, vhost_exists

pytestmark = pytest.mark.broker


def _closed_port() -> int:
    """A local port nothing listens on: a broker whose management API is off."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_this_run_has_a_vhost_of_its_own(amqp_url: str) -> None:
    vhost = urlsplit(amqp_url).path.lstrip("/")
    assert vhost.startswith("leveret-test-"), f"the tests share the vhost {vhost!r}"


def test_a_vhost_is_made_and_removed_without_the_management_api(base_amqp_url: str) -> None:
    if _rabbitmqctl(base_amqp_url) is None:
        pytest.skip("the broker is not local or rabbitmqctl is not installed")
    vhost = f"leveret-test-noapi-{uuid.uuid4().hex[:8]}"
    no_api = _closed_port()
    try:
        assert create_vhost(base_amqp_url, vhost, api_port=no_api) == "rabbitmqctl"
        assert vhost_exists(base_amqp_url, vhost)
        assert delete_vhost(base_amqp_url, vhost, api_port=no_api)
        assert not vhost_exists(base_amqp_url, vhost)
    finally:
        delete_vhost(base_amqp_url, vhost)
