"""API tokens, scopes, the bind check and Host names (leveret.auth), without a server."""

from __future__ import annotations

from pathlib import Path

import pytest

from leveret.auth import (
    Principal,
    Scope,
    Tokens,
    allowed_hosts,
    check_bind,
    load_tokens,
    may_cancel,
    parse_tokens,
    token_id,
)
from leveret.errors import ConfigError
from leveret.settings import TrackerSettings


def test_tokens_from_the_variable_and_the_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# ops\n\nroot-token  admin\nci-token submit, read\n")
    tokens = load_tokens(" a:submit,cancel ; b:read;", path)
    assert len(tokens) == 4
    ci = tokens.find("ci-token")
    assert ci is not None and ci.scopes == {Scope.SUBMIT, Scope.READ}
    assert ci.id == token_id("ci-token") and "ci-token" not in ci.id
    assert tokens.find("ci-toke") is None and tokens.find("") is None
    root = tokens.find("root-token")
    assert root is not None and all(root.allows(s) for s in Scope)
    assert not ci.allows(Scope.CANCEL)


@pytest.mark.parametrize("text", ["a", "a:", "a:write", ":read"])
def test_a_bad_token_entry_stops_the_service(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_tokens(text)


def test_only_the_owner_or_admin_may_cancel() -> None:
    alice = Principal(token_id("alice"), frozenset({Scope.CANCEL}))
    admin = Principal(token_id("root"), frozenset({Scope.ADMIN}))
    assert may_cancel(alice, token_id("alice"))
    assert not may_cancel(alice, token_id("bob"))
    assert not may_cancel(alice, None)  # submitted without a token
    assert may_cancel(admin, token_id("bob"))
    assert may_cancel(None, token_id("bob"))  # no tokens configured


def test_a_public_bind_needs_tokens_or_insecure() -> None:
    none = Tokens({})
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        check_bind(host, none, insecure=False)
    for host in ("0.0.0.0", "::", "10.0.0.5", "example.org"):
        with pytest.raises(ConfigError, match="without authentication"):
            check_bind(host, none, insecure=False)
        check_bind(host, none, insecure=True)
        check_bind(host, Tokens({"t": frozenset({Scope.READ})}), insecure=False)


def test_allowed_hosts_default_to_loopback_and_the_bind_address() -> None:
    assert allowed_hosts([], "127.0.0.1") == {"localhost", "127.0.0.1", "::1"}
    assert allowed_hosts([], "10.0.0.5") == {"localhost", "127.0.0.1", "::1", "10.0.0.5"}
    assert allowed_hosts([], "0.0.0.0") is None
    assert allowed_hosts(["api.example", "[::1]"], "0.0.0.0") == {"api.example", "::1"}
    assert allowed_hosts(["*"], "127.0.0.1") is None


def test_settings_default_to_loopback_and_hide_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEVERET_API_TOKENS", "s3cret:admin")
    monkeypatch.setenv("LEVERET_ALLOWED_HOSTS", "a.example, b.example")
    settings = TrackerSettings()
    assert settings.host == "127.0.0.1"
    assert settings.allowed_hosts == ["a.example", "b.example"]
    assert "s3cret" not in repr(settings)
    with pytest.raises(ValueError, match="LEVERET_TLS_KEY_FILE"):
        TrackerSettings(tls_cert_file=Path("cert.pem"))
