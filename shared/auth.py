"""Who may call the HTTP APIs: bearer tokens with scopes, the bind check, Host headers.

Tokens come from ``LEVERET_API_TOKENS`` (``token:scope,scope;token2:scope``) and
``LEVERET_API_TOKENS_FILE`` (one ``token scope,scope`` per line, ``#`` comments).
A request's ``Authorization: Bearer <token>`` is compared in constant time with
every configured token; a missing or unknown token is a 401, a token without the
route's scope a 403. Without any token configured the API serves everyone, and
may then bind only a loopback address unless told ``--insecure``.

A task belongs to the token that submitted it: the scheduler stores the token's
:func:`token_id` (a digest, never the token) and lets only that token, or one with
``admin``, cancel it. Tokens are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from loguru import logger
from starlette import types as asgi

from leveret.errors import ConfigError
from leveret.settings import ApiSettings


class Scope(StrEnum):
    """What a token may do."""

    SUBMIT = "submit"  # POST /tasks, /tasks/batch
    READ = "read"  # GET tasks, lists, stats, workers
    CANCEL = "cancel"  # DELETE /tasks/{id}, for tasks the token submitted
    ADMIN = "admin"  # everything, including cancelling anyone's task


#: Host names that always mean this machine.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
#: Bind addresses that listen on every interface.
WILDCARDS = ("0.0.0.0", "::", "")


def token_id(token: str) -> str:
    """A token's stored and logged identity: 16 hex digits of its SHA-256."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    id: str  # token_id of its token
    scopes: frozenset[Scope]

    def allows(self, scope: Scope) -> bool:
        """Whether this caller holds `scope` (``admin`` holds every one)."""
        return Scope.ADMIN in self.scopes or scope in self.scopes


def _scopes(text: str, where: str) -> frozenset[Scope]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise ConfigError(f"{where}: a token without scopes")
    try:
        return frozenset(Scope(n) for n in names)
    except ValueError:
        known = ", ".join(s.value for s in Scope)
        raise ConfigError(f"{where}: unknown scope in {text!r} (known: {known})") from None


def parse_tokens(text: str) -> dict[str, frozenset[Scope]]:
    """``token:scope,scope;token2:scope`` as a mapping of token to scopes."""
    tokens: dict[str, frozenset[Scope]] = {}
    for number, entry in enumerate((e.strip() for e in text.split(";")), 1):
        if not entry:
            continue
        token, sep, scopes = entry.partition(":")
        if not sep or not token.strip():
            raise ConfigError(f"LEVERET_API_TOKENS entry {number}: expected token:scope,scope")
        tokens[token.strip()] = _scopes(scopes, f"LEVERET_API_TOKENS entry {number}")
    return tokens


def parse_tokens_file(path: Path) -> dict[str, frozenset[Scope]]:
    """A tokens file: one ``token scope,scope`` per line; blank lines and ``#`` comments."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read LEVERET_API_TOKENS_FILE {path}: {exc}") from exc
    tokens: dict[str, frozenset[Scope]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 1)
        if len(parts) != 2:
            raise ConfigError(f"{path} line {number}: expected `token scope,scope`")
        tokens[parts[0]] = _scopes(parts[1], f"{path} line {number}")
    return tokens


class Tokens:
    """The configured tokens; looked up in constant time."""

    def __init__(self, tokens: Mapping[str, frozenset[Scope]]) -> None:
        self._tokens = [(t.encode(), Principal(token_id(t), s)) for t, s in tokens.items()]

    def __bool__(self) -> bool:
        return bool(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    def find(self, presented: str) -> Principal | None:
        """The caller `presented` names, or None; compares with every token, always."""
        given = presented.encode()
        found = None
        for token, principal in self._tokens:
            if hmac.compare_digest(token, given):
                found = principal
        return found


def is_loopback(host: str) -> bool:
    """Whether binding `host` listens on this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, tokens: Tokens, *, insecure: bool) -> None:
    """Refuse to serve without tokens on anything but loopback, unless `insecure`;
    warn whenever the API serves without authentication."""
    if tokens:
        return
    if not is_loopback(host) and not insecure:
        raise ConfigError(
            f"refusing to serve the API on {host!r} without authentication: set "
            "LEVERET_API_TOKENS (or LEVERET_API_TOKENS_FILE), bind 127.0.0.1, "
            "or pass --insecure (LEVERET_INSECURE=true)"
        )
    logger.warning(
        "the API on {} serves without authentication (no LEVERET_API_TOKENS): anyone "
        "who can reach it may submit, read and cancel",
        host,
    )


def allowed_hosts(configured: Iterable[str], bind: str) -> frozenset[str] | None:
    """The Host names accepted (None: any). By default the loopback names plus the
    bind address; any Host when bound to every interface (callers use many names)."""
    names = {h.strip().lower() for h in configured if h.strip()}
    if "*" in names:
        return None
    if not names:
        if bind in WILDCARDS:
            return None
        names = {*LOOPBACK_NAMES, bind.lower()}
    return frozenset(n.strip("[]") for n in names)


def _host_name(header: str) -> str:
    """The name in a Host header, without its port (IPv6 literals unbracketed)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


class HostCheck:
    """ASGI middleware: 400 for a Host header not in the allowed set (``/healthz``,
    which probes call by address, is exempt). Guards a keyless loopback API against
    DNS rebinding."""

    def __init__(self, app: asgi.ASGIApp, allowed: frozenset[str] | None) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
        if self.allowed is None or scope["type"] != "http" or scope["path"] == "/healthz":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        host = _host_name(headers.get(b"host", b"").decode("latin-1"))
        if host in self.allowed:
            await self.app(scope, receive, send)
            return
        body = b'{"detail":{"error":"bad_host","message":"Host header not allowed"}}'
        await send(
            {
                "type": "http.response.start",
                "status": 400,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _refuse(status: int, code: str, message: str) -> HTTPException:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return HTTPException(status, {"error": code, "message": message}, headers=headers)


def _bearer(request: Request) -> str | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def _check_json(request: Request) -> None:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise _refuse(415, "unsupported_media_type", "the body must be application/json")


class Guard:
    """FastAPI dependencies that admit a request to a route of one scope."""

    def __init__(self, tokens: Tokens) -> None:
        self.tokens = tokens

    def require(
        self, scope: Scope, *, json_body: bool = False
    ) -> Callable[[Request], Awaitable[Principal | None]]:
        """A dependency: the caller (None without tokens configured), stored as
        ``request.state.principal``; 401, 403 or 415 otherwise."""

        async def admit(request: Request) -> Principal | None:
            principal = self.authenticate(request, scope)
            if json_body:
                _check_json(request)
            request.state.principal = principal
            return principal

        return admit

    def authenticate(self, request: Request, scope: Scope) -> Principal | None:
        """The caller, checked for `scope`."""
        if not self.tokens:
            return None
        presented = _bearer(request)
        principal = self.tokens.find(presented) if presented else None
        if principal is None:
            message = "a valid bearer token is required" if presented is None else "unknown token"
            raise _refuse(401, "unauthorized", message)
        if not principal.allows(scope):
            raise _refuse(403, "forbidden", f"this token lacks the {scope.value!r} scope")
        return principal


def may_cancel(principal: Principal | None, owner: str | None) -> bool:
    """Whether `principal` may cancel a task `owner` submitted (without tokens: anyone)."""
    if principal is None:
        return True
    return principal.allows(Scope.ADMIN) or owner == principal.id


def load_tokens(tokens: str | None, tokens_file: Path | None) -> Tokens:
    """The tokens of both settings together."""
    found: dict[str, frozenset[Scope]] = {}
    if tokens:
        found.update(parse_tokens(tokens))
    if tokens_file is not None:
        found.update(parse_tokens_file(tokens_file))
    return Tokens(found)


@dataclass(frozen=True)
class Access:
    """An API's access rules: the token guard for its routes and the Host check."""

    guard: Guard
    hosts: frozenset[str] | None = None

    def protect(self, app: FastAPI) -> None:
        """Add the Host check to `app`."""
        app.add_middleware(HostCheck, allowed=self.hosts)


def open_access() -> Access:
    """No tokens, any Host: for apps built directly (tests)."""
    return Access(Guard(Tokens({})))


def access_from(settings: ApiSettings) -> Access:
    """The access rules of `settings`; raises :class:`ConfigError` when the API must not
    start (unreadable tokens, a non-loopback bind without tokens and not `insecure`)."""
    secret = settings.api_tokens.get_secret_value() if settings.api_tokens else None
    tokens = load_tokens(secret, settings.api_tokens_file)
    check_bind(settings.host, tokens, insecure=settings.insecure)
    if tokens:
        logger.info("API requires bearer tokens ({} configured)", len(tokens))
    return Access(Guard(tokens), allowed_hosts(settings.allowed_hosts, settings.host))
