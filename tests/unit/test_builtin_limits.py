"""The pure parts of the built-in handlers' limits: which addresses `http` refuses,
what ``LEVERET_HTTP_ALLOW`` lets through, that every resolved address is checked and
the connection goes to a checked one, the fetch deadline, and what a `shell` command's
environment and output keep. End to end: tests/integration/test_handler_safety.py."""

from __future__ import annotations

from ipaddress import ip_address
from typing import Any

import httpcore
import pytest
from pydantic import ValidationError

from leveret.builtin_http import (
    Allow,
    GuardedBackend,
    HttpPolicy,
    IPAddress,
    checked_addresses,
    deadline_s,
    fetch,
    parse_allow,
    parse_payload,
    refusal,
)
from leveret.builtin_shell import SAFE_PATH, Tail, environment
from leveret.errors import TaskFailed
from leveret.settings import WorkerSettings

REFUSED = {
    "127.0.0.1": "loopback",
    "127.8.9.10": "loopback",
    "::1": "loopback",
    "10.1.2.3": "private",
    "172.16.0.1": "private",
    "172.31.255.255": "private",
    "192.168.1.1": "private",
    "fd00::1": "private",
    "fc00::1": "private",
    "169.254.169.254": "link-local",  # cloud metadata
    "fe80::1": "link-local",
    "0.0.0.0": "unspecified",
    "::": "unspecified",
    "224.0.0.1": "multicast",
    "ff02::1": "multicast",
    "100.64.0.1": "shared (CGNAT)",
    "100.127.255.254": "shared (CGNAT)",
    "240.0.0.1": "reserved",
    "255.255.255.255": "reserved",
    "0.1.2.3": "reserved",
    "192.0.2.1": "reserved",  # documentation
    "198.18.0.1": "reserved",  # benchmarking
    # IPv6 forms of IPv4 addresses are judged by the IPv4 address they stand for.
    "::ffff:127.0.0.1": "loopback",
    "::ffff:169.254.169.254": "link-local",
    "::ffff:10.0.0.1": "private",
    "64:ff9b::a9fe:a9fe": "link-local",  # NAT64 of 169.254.169.254
    "2002:7f00:1::": "loopback",  # 6to4 of 127.0.0.1
}
ALLOWED = [
    "93.184.216.34",
    "8.8.8.8",
    "172.32.0.1",
    "100.128.0.1",
    "2606:4700::1111",
    "::ffff:8.8.8.8",
]


@pytest.mark.parametrize(("address", "why"), REFUSED.items())
def test_local_private_and_special_addresses_are_refused(address: str, why: str) -> None:
    assert refusal(ip_address(address)) == why


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_are_not(address: str) -> None:
    assert refusal(ip_address(address)) is None


def test_the_allow_list_takes_cidrs_and_host_names() -> None:
    allow = parse_allow(["127.0.0.1/32", " Internal.Example. ", "10.0.0.0/8", "fd00::/8"])
    assert allow.host("internal.example") and allow.host("INTERNAL.example.")
    assert not allow.host("other.example")
    assert allow.address(ip_address("127.0.0.1"))
    assert allow.address(ip_address("::ffff:127.0.0.1"))  # the mapped form too
    assert not allow.address(ip_address("127.0.0.2"))
    assert allow.address(ip_address("10.200.0.1"))
    assert allow.address(ip_address("fd12::1"))


@pytest.mark.parametrize("entry", ["10.0.0.1/8", "300.1.1.1", "1.2.3.4/33", "not a host", "a/b"])
def test_a_bad_allow_entry_is_named(entry: str) -> None:
    with pytest.raises(ValueError, match=r"not a valid CIDR|neither a host name nor a CIDR"):
        parse_allow([entry])


def test_worker_settings_parse_and_check_the_new_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LEVERET_HTTP_ALLOW", "127.0.0.1/32,internal.example")
    monkeypatch.setenv("LEVERET_HTTP_MAX_BYTES", "4096")
    monkeypatch.setenv("LEVERET_SHELL_ENV", "HOME, LANG")
    settings = WorkerSettings()
    assert settings.http_allow == ["127.0.0.1/32", "internal.example"]
    assert settings.http_max_bytes == 4096
    assert settings.shell_env == ["HOME", "LANG"]
    with pytest.raises(ValidationError, match="neither a host name nor a CIDR"):
        WorkerSettings(http_allow="a b")
    with pytest.raises(ValidationError, match="not environment variable names: A-B"):
        WorkerSettings(shell_env="OK,A-B")


def _resolver(answers: dict[str, list[str]]) -> Any:
    async def resolve(host: str, port: int) -> list[IPAddress]:
        return [ip_address(a) for a in answers[host]]

    return resolve


async def test_every_resolved_address_is_checked() -> None:
    """A name with one public and one private address (as a rebinding DNS might
    answer) is refused; so are local names, before any lookup."""
    resolve = _resolver({"mixed.example": ["93.184.216.34", "10.0.0.5"]})
    with pytest.raises(TaskFailed, match=r"resolves to 10\.0\.0\.5\) is a private") as caught:
        await checked_addresses("mixed.example", 80, Allow(), resolve)
    assert caught.value.type == "http_forbidden_address"
    for name in ("localhost", "LOCALHOST.", "api.localhost", "ip6-localhost"):
        with pytest.raises(TaskFailed, match="local host name"):
            await checked_addresses(name, 80, Allow(), resolve)  # no lookup: not in answers
    allowed = Allow(networks=(parse_allow(["10.0.0.0/24"]).networks))
    found = await checked_addresses("mixed.example", 80, allowed, resolve)
    assert [str(a) for a in found] == ["93.184.216.34", "10.0.0.5"]


class _Recorder(httpcore.AsyncNetworkBackend):
    """An inner backend that records where it was asked to connect, and refuses."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def connect_tcp(self, host: str, port: int, *args: Any, **options: Any) -> Any:
        self.asked.append(host)
        raise httpcore.ConnectError("refused")


async def test_the_connection_goes_to_the_checked_address_not_a_new_lookup() -> None:
    """The backend connects to the addresses it checked (an IP, never the name again),
    trying each in turn; an allowed host name is connected to by name, unchecked."""
    inner = _Recorder()
    resolve = _resolver({"two.example": ["93.184.216.34", "8.8.8.8"]})
    backend = GuardedBackend(parse_allow(["intranet.example"]), resolve, inner)
    with pytest.raises(httpcore.ConnectError):
        await backend.connect_tcp("two.example", 443, timeout=1)
    assert inner.asked == ["93.184.216.34", "8.8.8.8"]
    with pytest.raises(httpcore.ConnectError):
        await backend.connect_tcp("intranet.example", 80)
    assert inner.asked[-1] == "intranet.example"
    with pytest.raises(TaskFailed, match="Unix socket"):
        await backend.connect_unix_socket("/var/run/docker.sock")


def test_payloads_and_the_deadline() -> None:
    assert parse_payload("https://example.com/") == ("https://example.com/", None)
    assert parse_payload({"url": "http://a.example/", "timeout_s": 2}) == ("http://a.example/", 2.0)
    for bad in ("ftp://x/", {"href": "http://x/"}, {"url": "http://x/", "timeout_s": 0}, 3):
        with pytest.raises(TaskFailed) as caught:
            parse_payload(bad)  # type: ignore[arg-type]
        assert caught.value.type == "bad_payload"
    assert deadline_s(None, None) == 30.0
    assert deadline_s(5.0, None) == 5.0
    assert deadline_s(None, 10.0) == pytest.approx(9.75)  # ends before the attempt's timeout
    assert deadline_s(None, 1.0) == pytest.approx(0.9)
    assert deadline_s(3.0, 10.0) == 3.0
    assert deadline_s(60.0, 10.0) == pytest.approx(9.75)  # the payload cannot exceed the task


async def test_an_unparsable_url_is_a_bad_payload_not_retried() -> None:
    policy = HttpPolicy()
    with pytest.raises(TaskFailed) as caught:
        await fetch("http://[::1", policy, 1.0)
    assert caught.value.type == "bad_payload"


def test_a_commands_environment_is_path_and_what_is_named() -> None:
    worker_env = {
        "LEVERET_AMQP_URL": "amqp://worker:secret@broker/",
        "HOME": "/home/w",
        "PATH": "/opt/evil:/usr/bin",
    }
    assert environment([], worker_env) == {"PATH": SAFE_PATH}
    assert environment(["HOME", "MISSING"], worker_env) == {"PATH": SAFE_PATH, "HOME": "/home/w"}
    assert environment(["PATH"], worker_env) == {"PATH": "/opt/evil:/usr/bin"}  # if named


def test_output_keeps_its_tail_and_marks_the_cut() -> None:
    tail = Tail(limit=8)
    tail.add(b"hello ")
    assert tail.text() == "hello "
    tail.add(b"world, again")
    assert tail.text() == "[truncated: the first 10 of 18 bytes dropped]\nd, again"
    assert len(tail.kept) == 8
