"""Settings, read once at start from ``LEVERET_*`` environment variables (and flags,
which the CLI passes in as keyword arguments). One class per service, composed
of the shared :class:`CommonSettings`. Tests construct them directly."""

from __future__ import annotations

import os
import re
import socket
import uuid
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from leveret.builtin_http import parse_allow
from leveret.builtin_shell import ENV_NAME
from leveret.contracts import MAX_EVENT_BYTES, MAX_RESULT_BYTES, POOL_PATTERN, Pool, Tag
from leveret.roles import RoleUsers
from leveret.tls import AmqpTls
from leveret.topology import DEFAULT_NAMESPACE, Topology

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
MIB = 1024 * 1024
#: The shortest loop-block limit a worker accepts (besides 0, off).
MIN_LOOP_BLOCK_LIMIT_S = 0.1


def default_data_dir() -> Path:
    """Where the embedded SQLite databases live unless a URL says otherwise."""
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "leveret"


def sqlite_url(path: Path) -> str:
    """An aiosqlite URL for a file path."""
    return f"sqlite+aiosqlite:///{path}"


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
#: How long finished tasks are kept by default: 7 days.
DEFAULT_RETENTION_S = 7 * 86400


def parse_duration(value: object) -> object:
    """``7d``, ``36h``, ``90m``, ``3600s`` or plain seconds (``3600``) as seconds."""
    if isinstance(value, str):
        match = _DURATION.match(value.lower())
        if match is None:
            raise ValueError("a duration such as 7d, 36h, 90m, 3600s or 3600 (seconds)")
        return float(match.group(1)) * _UNIT_S[match.group(2)]
    return value


def _split_csv(value: object) -> object:
    """Accept ``a,b`` from the environment as well as a list."""
    if isinstance(value, str):
        return [v for v in (p.strip() for p in value.split(",")) if v]
    return value


class CommonSettings(BaseSettings):
    """What every service needs: the broker, the namespace, logging."""

    model_config = SettingsConfigDict(env_prefix="LEVERET_", extra="ignore")

    amqp_url: str = DEFAULT_AMQP_URL
    namespace: str = Field(default=DEFAULT_NAMESPACE, pattern=r"^[a-z0-9][a-z0-9_.\-]{0,63}$")
    log_json: bool = False
    log_level: str = "INFO"
    data_dir: Path = Field(default_factory=default_data_dir)
    retention: float = Field(
        default=DEFAULT_RETENTION_S,
        ge=0,
        description="How long finished tasks are kept (tracker and scheduler stores), "
        "seconds or 7d/36h/90m; 0 keeps them forever.",
    )

    amqp_ca_file: Path | None = Field(
        default=None,
        description="CA bundle that verifies the broker's certificate (amqps:// URLs); "
        "the system's CAs when unset.",
    )
    amqp_cert_file: Path | None = Field(
        default=None, description="Client certificate for the broker (amqps://), PEM."
    )
    amqp_key_file: Path | None = Field(
        default=None, description="The client certificate's private key, PEM."
    )

    producer_users: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Users holding the producer role (empty: anyone)."
    )
    scheduler_users: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Users holding the scheduler role (empty: anyone)."
    )
    worker_users: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Users holding the worker role (empty: anyone)."
    )
    tracker_users: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Users holding the tracker role (empty: anyone)."
    )

    _parse_retention = field_validator("retention", mode="before")(parse_duration)
    _split_users = field_validator(
        "producer_users", "scheduler_users", "worker_users", "tracker_users", mode="before"
    )(_split_csv)

    @property
    def roles(self) -> RoleUsers:
        """Which users hold which role (see :mod:`leveret.roles`)."""
        return RoleUsers.of(
            producer=self.producer_users,
            scheduler=self.scheduler_users,
            worker=self.worker_users,
            tracker=self.tracker_users,
        )

    @property
    def topology(self) -> Topology:
        """The topology under this namespace."""
        return Topology(self.namespace)

    @property
    def amqp_tls(self) -> AmqpTls:
        """The broker's TLS files (used with ``amqps://`` URLs)."""
        return AmqpTls(self.amqp_ca_file, self.amqp_cert_file, self.amqp_key_file)


class ApiSettings(CommonSettings):
    """What a service with an HTTP API needs: where it listens, who may call it."""

    host: str = Field(
        default="127.0.0.1",
        description="Bind address; anything but loopback needs API tokens or `insecure`.",
    )
    port: int = 8080  # the scheduler's; the tracker's default is 8081
    api_tokens: SecretStr | None = Field(
        default=None,
        description="`token:scope,scope;token2:scope` (submit, read, cancel, admin).",
    )
    api_tokens_file: Path | None = Field(
        default=None, description="A file of tokens, one `token scope,scope` per line."
    )
    insecure: bool = Field(
        default=False, description="Serve without tokens on a non-loopback address."
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Host headers accepted, comma-separated (`*`: any); by default the "
        "loopback names and the bind address, or any when bound to every interface.",
    )
    tls_cert_file: Path | None = Field(default=None, description="Serve HTTPS with this PEM.")
    tls_key_file: Path | None = Field(default=None, description="The HTTPS private key, PEM.")

    _split_hosts = field_validator("allowed_hosts", mode="before")(_split_csv)

    @model_validator(mode="after")
    def _tls_pair(self) -> ApiSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("set both LEVERET_TLS_CERT_FILE and LEVERET_TLS_KEY_FILE, or neither")
        return self


class SchedulerSettings(ApiSettings):
    """``leveret scheduler``: AMQP intake and HTTP submission."""

    port: int = 8080
    scheduler_database_url: str | None = Field(
        default=None,
        description="The scheduler's own store; SQLite in data_dir by default.",
    )
    max_payload_bytes: int = Field(default=MIB, ge=1)
    intake_prefetch: int = Field(
        default=512,
        ge=1,
        description="AMQP back-pressure: submissions held unacked at once.",
    )
    http_rate_per_s: float = Field(
        default=0.0,
        ge=0,
        description="Per-client HTTP submission rate, tasks/s (0: no limit).",
    )
    http_burst: int = Field(default=1000, ge=1, description="Per-client HTTP burst, tasks.")
    http_body_budget_bytes: int = Field(
        default=256 * MIB,
        ge=1,
        description="Bytes of HTTP request bodies held at once, all requests together; "
        "a request past it is answered 503 `busy` with Retry-After, unread.",
    )
    http_body_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="Seconds a request body may take to arrive whole; past it 408.",
    )
    batch_max: int = Field(default=256, ge=1)
    batch_wait_ms: float = Field(
        default=0.0,
        ge=0,
        description="How long admission waits for more submissions after the first; 0: "
        "a batch is what arrived while the previous one was being admitted.",
    )
    kinds: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Extra task kinds to accept besides built-ins and those workers announce.",
    )

    pools: Annotated[list[Pool], NoDecode] = Field(
        default_factory=lambda: ["default"],
        description="Pools tasks may be submitted to, besides those a worker announced; "
        "a task for any other pool is refused (`unknown_pool`).",
    )
    max_requirement_sets: int = Field(
        default=256,
        ge=1,
        description="Distinct `requires` sets (per pool; each has a queue) the scheduler "
        "routes to; a task with a new set beyond it is refused.",
    )

    _split_kinds = field_validator("kinds", "pools", mode="before")(_split_csv)

    @model_validator(mode="after")
    def _default_database(self) -> SchedulerSettings:
        if self.scheduler_database_url is None:
            self.scheduler_database_url = sqlite_url(self.data_dir / "scheduler.db")
        return self


class TrackerSettings(ApiSettings):
    """``leveret tracker``: records every status change; serves the tracker API."""

    port: int = 8081
    database_url: str | None = Field(
        default=None, description="SQLAlchemy async URL; SQLite in data_dir by default."
    )
    prefetch: int = Field(default=2000, ge=1)
    batch_max: int = Field(default=1000, ge=1)
    batch_wait_ms: float = Field(
        default=0.0,
        ge=0,
        description="How long the tracker waits for more messages after the first; 0: "
        "a batch is what arrived while the previous one was being written.",
    )
    heartbeat_timeout_s: float = Field(
        default=3.0,
        gt=0,
        description="Silence after which the watchdog fences a worker.",
    )
    management_url: str | None = Field(
        default=None,
        description="RabbitMQ management API, e.g. http://user:pass@host:15672; "
        "derived from amqp_url when unset.",
    )
    worker_retention: float = Field(
        default=3600.0,
        gt=0,
        description="How long a stopped worker, or one fenced or gone, stays listed "
        "(GET /workers) before its registration is dropped; seconds or 1h/90m.",
    )

    _parse_worker_retention = field_validator("worker_retention", mode="before")(parse_duration)

    @model_validator(mode="after")
    def _default_database(self) -> TrackerSettings:
        if self.database_url is None:
            self.database_url = sqlite_url(self.data_dir / "tracker.db")
        return self


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class WorkerSettings(CommonSettings):
    """``leveret worker``: runs tasks of one pool with bounded concurrency."""

    concurrency: int = Field(default=4, ge=1, le=10_000)
    pool: str = Field(default="default", pattern=POOL_PATTERN)
    handlers: Annotated[list[str], NoDecode] = Field(default_factory=list)
    shell_enabled: bool = False
    worker_id: str = Field(default_factory=_default_worker_id, min_length=1, max_length=200)
    heartbeat_interval_s: float = Field(default=1.0, gt=0)
    grace_period_s: float = Field(default=25.0, ge=0)
    started_flush_ms: float = Field(default=200.0, ge=0)
    capabilities: Annotated[list[Tag], NoDecode] = Field(
        default_factory=list, description="Tags tasks can require, e.g. gpu, region-eu."
    )
    limits: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Cluster-wide kind limits, `kind:running=N,rate=R`, `;`-separated in env.",
    )

    max_result_bytes: int = Field(
        default=MAX_RESULT_BYTES,
        ge=MAX_EVENT_BYTES,
        le=MAX_RESULT_BYTES,
        description="Largest result message this worker sends; a bigger one fails its "
        "attempt as `result_too_large`. At most the protocol's limit (1 MiB), at least "
        "64 KiB, so that the failure itself always fits.",
    )
    max_requirement_sets: int = Field(
        default=256,
        ge=1,
        description="Requirement sets of its pool this worker consumes at most (the "
        "scheduler reads the same LEVERET_MAX_REQUIREMENT_SETS as its own cap).",
    )

    loop_block_limit_s: float = Field(
        default=1.0,
        ge=0,
        description="How long the event loop may stay blocked (an async handler calling "
        "blocking code) before the worker fails that attempt with `blocked_event_loop`; "
        "0 disables the check. Keep it well under the tracker's heartbeat timeout.",
    )

    http_allow: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Hosts and CIDRs the `http` kind may reach although they are loopback, "
        "private, link-local or otherwise refused, e.g. `127.0.0.1/32,internal.example`.",
    )
    http_max_bytes: int = Field(
        default=MIB,
        ge=1,
        description="Largest response body the `http` kind reads; a bigger one fails its "
        "attempt as `http_too_large`.",
    )
    shell_env: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Variables of the worker's environment passed to `shell` commands, "
        "which otherwise get only a safe PATH.",
    )

    _split_handlers = field_validator("handlers", "capabilities", mode="before")(_split_csv)
    _split_builtin_lists = field_validator("http_allow", "shell_env", mode="before")(_split_csv)

    @field_validator("http_allow")
    @classmethod
    def _valid_allow(cls, value: list[str]) -> list[str]:
        parse_allow(value)  # raises ValueError naming a bad entry
        return value

    @field_validator("shell_env")
    @classmethod
    def _valid_env_names(cls, value: list[str]) -> list[str]:
        bad = [name for name in value if not ENV_NAME.match(name)]
        if bad:
            raise ValueError(f"not environment variable names: {', '.join(bad)}")
        return value

    @field_validator("loop_block_limit_s")
    @classmethod
    def _sensible_block_limit(cls, value: float) -> float:
        # Below this, ordinary scheduling hiccups would look like a blocked loop.
        if 0 < value < MIN_LOOP_BLOCK_LIMIT_S:
            raise ValueError(f"must be 0 (off) or at least {MIN_LOOP_BLOCK_LIMIT_S} s")
        return value

    @field_validator("limits", mode="before")
    @classmethod
    def _split_limits(cls, value: object) -> object:
        if isinstance(value, str):
            return [v for v in (p.strip() for p in value.split(";")) if v]
        return value
