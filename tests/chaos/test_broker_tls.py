"""Services and the client reach the broker over ``amqps://``: a private node with a TLS
listener that demands client certificates, a CA made in the test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from broker_node import BrokerNode, broker_available, pick_ports
from certs import Pki, make_pki

from leveret.amqp import connect
from leveret.cli.procs import Cluster
from leveret.client import Client
from leveret.errors import BrokerError
from leveret.tls import AmqpTls

pytestmark = [pytest.mark.broker, pytest.mark.chaos]


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[BrokerNode, str, Pki]]:
    """A private node (no management plugin) with a TLS listener; its amqps URL."""
    if not broker_available():
        if os.environ.get("CI"):
            pytest.fail("rabbitmq-server not installed: no private node")
        pytest.skip("rabbitmq-server not installed: no private node")
    pki = make_pki(tmp_path / "pki")
    [tls_port] = pick_ports(1)
    node = BrokerNode(
        management=False,
        extra_config=[
            f"listeners.ssl.default = 127.0.0.1:{tls_port}",
            f"ssl_options.cacertfile = {pki.ca}",
            f"ssl_options.certfile = {pki.cert}",
            f"ssl_options.keyfile = {pki.key}",
            "ssl_options.verify = verify_peer",
            "ssl_options.fail_if_no_peer_cert = true",
        ],
    )
    try:
        node.start()
        yield node, f"amqps://guest:guest@127.0.0.1:{tls_port}/", pki
    finally:
        node.cleanup()


async def test_services_and_client_run_over_amqps(
    tls_broker: tuple[BrokerNode, str, Pki], tmp_path: Path
) -> None:
    _node, url, pki = tls_broker
    tls = AmqpTls(pki.ca, pki.cert, pki.key)
    with pytest.raises(BrokerError):  # the broker's CA is not trusted
        await connect(url, "no-ca", connect_timeout_s=1)
    with pytest.raises(BrokerError):  # trusted, but no client certificate
        await connect(url, "no-cert", connect_timeout_s=1, tls=AmqpTls(pki.ca))

    cluster = Cluster(
        namespace="tls",
        amqp_url=url,
        workdir=tmp_path / "cluster",
        extra_env={
            "LEVERET_AMQP_CA_FILE": str(pki.ca),
            "LEVERET_AMQP_CERT_FILE": str(pki.cert),
            "LEVERET_AMQP_KEY_FILE": str(pki.key),
        },
    )
    try:
        cluster.start_scheduler()
        cluster.start_tracker()  # sends the replies
        cluster.start_worker("w1")
        async with Client(url, namespace="tls", tls=tls) as client:
            result = await client.run("echo", {"over": "tls"}, timeout_s=30)
        assert result.status == "completed", result
        assert result.result == {"over": "tls"}
    except BaseException:
        for service in cluster.services:
            print(f"----- {service.name} -----\n{service.log()[-3000:]}")
        raise
    finally:
        cluster.stop_all()
