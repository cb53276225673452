"""The deployment files (deploy/, .dockerignore) checked without a Docker engine.

The compose files are read with PyYAML and checked against the Compose
Specification's JSON Schema (the copy check-jsonschema vendors), alone and merged
as `docker compose -f compose.yaml -f compose.postgres.yaml` would; when a Compose
v2 CLI is on PATH, `docker compose config -q` checks them as well (it needs no
engine). Nothing here is skipped. The Dockerfile is read line by line.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from jsonschema import Draft202012Validator, validators
from jsonschema.protocols import Validator

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
COMPOSE_POSTGRES = DEPLOY / "compose.postgres.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

# The `leveret` subcommands and the flags a deployment may give them. Written out
# rather than read from leveret.cli, which this test must not import.
SUBCOMMANDS: dict[str, set[str]] = {
    "scheduler": {"--port", "--host", "--insecure", "--env-file"},
    "tracker": {"--port", "--host", "--insecure", "--env-file"},
    "worker": {"--concurrency", "--pool", "--handlers", "--shell", "--env-file"},
    "broker-setup": {
        "--admin-url",
        "--vhost",
        "--env-file",
        "--amqp-url",
        "--namespace",
        "--rotate",
        "--no-fencer",
    },
    "submit": {"--wait"},
    "status": set(),
    "demo": set(),
    "bench": set(),
}
VALUE_FLAGS = {
    "--port",
    "--host",
    "--concurrency",
    "--pool",
    "--handlers",
    "--env-file",
    "--admin-url",
    "--vhost",
    "--amqp-url",
    "--namespace",
}
SETTINGS = {
    "LEVERET_AMQP_URL",
    "LEVERET_DATABASE_URL",
    "LEVERET_DATA_DIR",
    "LEVERET_LOG_JSON",
    "LEVERET_NAMESPACE",
    "LEVERET_MANAGEMENT_URL",
    "LEVERET_API_TOKENS",
    "LEVERET_API_TOKENS_FILE",
    "LEVERET_ALLOWED_HOSTS",
    "LEVERET_TLS_CERT_FILE",
    "LEVERET_TLS_KEY_FILE",
}
# service -> the HTTP port it serves (None: no HTTP API)
LEVERET_SERVICES: dict[str, int | None] = {"scheduler": 8080, "tracker": 8081, "worker": None}
ROLE_ENV_FILE = "/secrets/roles.env"


# --- compose helpers ---------------------------------------------------------------


def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path.name} is not a mapping"
    return data


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _load(COMPOSE)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = compose["services"]
    return services


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _container_ports(service: dict[str, Any]) -> list[int]:
    """Container side of each `ports:` entry (short "[ip:]host:container[/proto]" or long)."""
    ports = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            ports.append(int(entry["target"]))
        else:
            ports.append(int(str(entry).split("/")[0].rsplit(":", 1)[-1]))
    return ports


def _interpolated(value: str) -> str:
    """`value` with each ${VAR…} interpolation replaced by a plain word."""
    return re.sub(r"\$\{[^}]*\}", "secret", value)


def _duration_s(value: str) -> float:
    """A compose duration such as "30s", "1m30s" or "1500ms"."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"bad duration {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


# --- compose.yaml -------------------------------------------------------------------


def test_compose_has_every_service(services: dict[str, dict[str, Any]]) -> None:
    assert {"rabbitmq", "broker-setup", *LEVERET_SERVICES} <= services.keys()
    for name, service in services.items():
        if name not in {"rabbitmq", "broker-setup", *LEVERET_SERVICES}:
            assert service.get("profiles"), f"optional service {name} must sit behind a profile"


def test_rabbitmq_has_management_and_a_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    rabbitmq = services["rabbitmq"]
    assert rabbitmq["image"] == "rabbitmq:3.13-management"
    test = rabbitmq["healthcheck"]["test"]
    test = shlex.split(test) if isinstance(test, str) else test
    assert test[0] in {"CMD", "CMD-SHELL"}
    assert " ".join(test[1:]) == "rabbitmq-diagnostics -q ping"
    assert {5672, 15672} <= set(_container_ports(rabbitmq))


def test_the_broker_has_no_guest_and_is_published_on_loopback_only(
    services: dict[str, dict[str, Any]],
) -> None:
    rabbitmq = services["rabbitmq"]
    env = _environment(rabbitmq)
    assert env["RABBITMQ_DEFAULT_USER"] not in {"", "guest"}
    assert env["RABBITMQ_DEFAULT_PASS"].startswith("${LEVERET_BROKER_ADMIN_PASSWORD:?")
    for entry in rabbitmq["ports"]:
        assert str(entry).startswith("127.0.0.1:"), f"{entry} is published beyond loopback"
    assert "guest" not in json.dumps(services), "no service may use guest"


def test_broker_setup_makes_the_role_users_before_the_services_start(
    services: dict[str, dict[str, Any]],
) -> None:
    setup = services["broker-setup"]
    command = _command(setup)
    assert command[0] == "broker-setup"
    admin = urlsplit(_interpolated(command[command.index("--admin-url") + 1]))
    assert (admin.hostname, admin.port, admin.username) == ("rabbitmq", 15672, "leveret-admin")
    assert command[command.index("--env-file") + 1] == ROLE_ENV_FILE
    assert setup["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    assert setup.get("restart") == "no"
    assert setup["image"] == services["scheduler"]["image"]
    for name in LEVERET_SERVICES:
        spec = services[name]["depends_on"]["broker-setup"]
        assert spec["condition"] == "service_completed_successfully"
        assert f"{name}-secrets:/secrets/{name}" in setup["volumes"]  # --role-files writes there
    assert "--role-files" in command


@pytest.mark.parametrize("name", sorted(LEVERET_SERVICES))
def test_command_is_a_leveret_subcommand(services: dict[str, dict[str, Any]], name: str) -> None:
    command = _command(services[name])
    assert command, f"{name} has no command (the image's default would run a worker)"
    subcommand, args = command[0], command[1:]
    assert subcommand == name
    flags = SUBCOMMANDS[subcommand]
    it = iter(args)
    for arg in it:
        flag = arg.split("=", 1)[0]
        assert flag in flags, f"{name}: {flag!r} is not an option of `leveret {subcommand}`"
        if flag in VALUE_FLAGS and "=" not in arg:
            value = next(it, None)
            assert value is not None and not value.startswith("--"), f"{flag} needs a value"
            if flag in {"--port", "--concurrency"}:
                assert int(value) >= 1


@pytest.mark.parametrize("name", sorted(LEVERET_SERVICES))
def test_environment_uses_leveret_settings(services: dict[str, dict[str, Any]], name: str) -> None:
    env = _environment(services[name])
    assert set(env) <= SETTINGS, f"{name}: unknown settings {sorted(set(env) - SETTINGS)}"
    assert "LEVERET_AMQP_URL" not in env, "its role's URL comes from the role env file"
    command = _command(services[name])
    assert command[command.index("--env-file") + 1] == ROLE_ENV_FILE
    # only its role's env file (broker-setup --role-files), never every role's
    assert f"{name}-secrets:/secrets:ro" in services[name]["volumes"]
    assert not [v for v in services[name]["volumes"] if str(v).startswith("broker-secrets:")]
    assert env["LEVERET_LOG_JSON"] == "1"


@pytest.mark.parametrize("name", sorted(LEVERET_SERVICES))
def test_waits_for_a_healthy_broker(services: dict[str, dict[str, Any]], name: str) -> None:
    depends_on = services[name].get("depends_on")
    assert isinstance(depends_on, dict), f"{name}: depends_on needs the long form (conditions)"
    assert depends_on["rabbitmq"]["condition"] == "service_healthy"
    for dependency, spec in depends_on.items():
        assert dependency in services
        if spec.get("condition") == "service_healthy":
            assert "healthcheck" in services[dependency], f"{dependency} has no healthcheck"


@pytest.mark.parametrize("name", sorted(LEVERET_SERVICES))
def test_runs_the_project_image(services: dict[str, dict[str, Any]], name: str) -> None:
    service = services[name]
    build = service["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert context == ROOT, "the Dockerfile COPYs paths relative to the repository root"
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE
    images = {services[other].get("image") for other in LEVERET_SERVICES}
    assert len(images) == 1, "every leveret service runs the one image"
    assert service.get("init") is True, "an init reaps the processes handlers spawn"


def test_worker_scales(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    assert "container_name" not in worker, "a fixed name forbids --scale worker=N"
    assert not worker.get("ports"), "a fixed host port forbids --scale worker=N"
    # Docker's SIGKILL must come after the worker's own grace period has run out.
    from leveret.settings import WorkerSettings

    grace_s = WorkerSettings.model_fields["grace_period_s"].default
    assert _duration_s(worker["stop_grace_period"]) > grace_s


@pytest.mark.parametrize("name", ["scheduler", "tracker"])
def test_http_port_is_published_and_probed(services: dict[str, dict[str, Any]], name: str) -> None:
    service = services[name]
    command = _command(service)
    port = int(command[command.index("--port") + 1]) if "--port" in command else None
    assert port == LEVERET_SERVICES[name]
    assert port in _container_ports(service)
    probe = " ".join(service["healthcheck"]["test"])
    assert f"127.0.0.1:{port}/healthz" in probe


@pytest.mark.parametrize("name", ["scheduler", "tracker"])
def test_apis_listen_on_the_container_network_with_tokens(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    """Bound to every interface (other containers and the published port reach it),
    so the API needs tokens; `--insecure` would serve anyone."""
    command = _command(services[name])
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert "--insecure" not in command
    tokens = _environment(services[name])["LEVERET_API_TOKENS"]
    assert tokens.startswith("${LEVERET_API_TOKENS:?"), "compose must refuse to start without"


def test_tracker_gets_its_management_url_from_broker_setup(
    services: dict[str, dict[str, Any]],
) -> None:
    # broker-setup writes LEVERET_TRACKER_MANAGEMENT_URL (the fencer user) at the
    # management API it was given; nothing in compose hands it guest credentials.
    assert "LEVERET_MANAGEMENT_URL" not in _environment(services["tracker"])
    command = _command(services["broker-setup"])
    assert "--no-fencer" not in command
    assert urlsplit(_interpolated(command[command.index("--admin-url") + 1])).port == 15672


def test_stateful_services_keep_data_in_named_volumes(compose: dict[str, Any]) -> None:
    data_dir = _dockerfile().env()["LEVERET_DATA_DIR"]
    services = compose["services"]
    declared = set(compose.get("volumes") or {})
    for name in ("scheduler", "tracker"):
        mounts = dict(str(v).split(":")[1::-1] for v in services[name].get("volumes", []))
        assert data_dir in mounts, f"{name}: nothing mounted at LEVERET_DATA_DIR={data_dir}"
        assert mounts[data_dir] in declared, f"{name}: {mounts[data_dir]} is no named volume"
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if not source.startswith((".", "/", "~")):
                assert source in declared, f"{name}: volume {source} is not declared"


def test_postgres_override_points_the_tracker_at_postgres(services: dict[str, Any]) -> None:
    override = _load(COMPOSE_POSTGRES)["services"]
    assert set(override) <= set(services)
    postgres = services["postgres"]
    assert postgres["profiles"] == ["postgres"]
    tracker = override["tracker"]
    env = _environment(tracker)
    assert set(env) <= SETTINGS
    url = urlsplit(env["LEVERET_DATABASE_URL"])
    pg_env = _environment(postgres)
    assert url.scheme == "postgresql+asyncpg"
    assert url.hostname == "postgres"
    assert (url.username, url.password) == (pg_env["POSTGRES_USER"], pg_env["POSTGRES_PASSWORD"])
    assert url.path == f"/{pg_env['POSTGRES_DB']}"
    assert tracker["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "healthcheck" in postgres


def _compose_cli() -> list[str] | None:
    """A Compose v2 CLI (`docker compose` or `docker-compose`) if one is installed."""
    candidates = [["docker", "compose"], ["docker-compose"]]
    for cli in candidates:
        if shutil.which(cli[0]) is None:
            continue
        try:
            out = subprocess.run(
                [*cli, "version"], capture_output=True, text=True, timeout=30, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        major = re.search(r"version v?(\d+)\.", out.stdout)
        if out.returncode == 0 and major and int(major.group(1)) >= 2:
            return cli
    return None


@pytest.fixture(scope="module")
def compose_schema() -> Validator:
    """A validator for the Compose Specification's JSON Schema (the draft it names)."""
    source = files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(source.read_text())
    cls = validators.validator_for(schema, default=Draft202012Validator)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def _merge(base: Any, override: Any) -> Any:
    """Compose's merge of an override file: mappings merge key by key, lists add up,
    scalars are replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = _merge(base[key], value) if key in base else value
        return merged
    if isinstance(base, list) and isinstance(override, list):
        return base + [item for item in override if item not in base]
    return override


def _schema_errors(validator: Validator, document: Any) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator.iter_errors(document)
    ]


@pytest.mark.parametrize(
    "paths",
    [[COMPOSE], [COMPOSE_POSTGRES], [COMPOSE, COMPOSE_POSTGRES]],
    ids=["compose", "postgres-override", "compose+postgres"],
)
def test_compose_files_follow_the_compose_specification(
    compose_schema: Validator, paths: list[Path]
) -> None:
    document: Any = {}
    for path in paths:
        document = _merge(document, yaml.safe_load(path.read_text()))
    assert document.get("services"), "no services"
    errors = _schema_errors(compose_schema, document)
    assert not errors, errors


def test_the_compose_schema_check_refuses_a_broken_file(
    compose_schema: Validator, compose: dict[str, Any]
) -> None:
    # The check above proves something only if the schema refuses what Compose refuses.
    broken = json.loads(json.dumps(compose))
    first = next(iter(broken["services"].values()))
    first["restart_policy"] = "always"  # not a service key
    first["volumes"] = 42  # volumes are a list
    errors = _schema_errors(compose_schema, broken)
    assert any("restart_policy" in e for e in errors), errors
    assert any(e.endswith("/volumes: 42 is not of type 'array'") for e in errors), errors


@pytest.mark.parametrize(
    "paths",
    [[COMPOSE], [COMPOSE, COMPOSE_POSTGRES]],
    ids=["compose", "compose+postgres"],
)
def test_a_compose_cli_if_installed_accepts_the_files(paths: list[Path]) -> None:
    # The schema check above runs everywhere; a real CLI, where one is installed, also
    # resolves interpolation, profiles and merges exactly as `docker compose up` will.
    cli = _compose_cli()
    if cli is None:
        return
    args = [a for f in paths for a in ("-f", str(f))]
    out = subprocess.run(
        [*cli, *args, "--profile", "postgres", "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr


# --- Dockerfile ---------------------------------------------------------------------


@dataclass
class Stage:
    """One FROM … stage: its base image, name and instructions."""

    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


@dataclass
class Dockerfile:
    """A Dockerfile parsed into stages (build args substituted in FROM lines)."""

    stages: list[Stage]

    def env(self) -> dict[str, str]:
        """The final stage's ENV."""
        env: dict[str, str] = {}
        for args in self.stages[-1].all("ENV"):
            tokens = shlex.split(args)
            if tokens and "=" not in tokens[0]:  # legacy `ENV KEY value`
                env[tokens[0]] = " ".join(tokens[1:])
            else:
                env.update(t.partition("=")[::2] for t in tokens)
        return env


def _instructions(text: str) -> Iterator[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction; continuation lines joined, comments dropped."""
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        pending = ""
        yield keyword.upper(), args.strip()
    assert not pending, "the Dockerfile ends inside a continued line"


def _parse_dockerfile(text: str) -> Dockerfile:
    build_args: dict[str, str] = {}
    stages: list[Stage] = []
    for keyword, args in _instructions(text):
        if keyword == "ARG" and not stages:
            arg, _, default = args.partition("=")
            build_args[arg] = default
        elif keyword == "FROM":
            words = re.sub(
                r"\$\{?(\w+)\}?", lambda m: build_args.get(m.group(1), m.group(0)), args
            ).split()
            words = [w for w in words if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        else:
            assert stages, f"{keyword} before the first FROM"
            stages[-1].instructions.append((keyword, args))
    return Dockerfile(stages)


def _dockerfile() -> Dockerfile:
    return _parse_dockerfile(DOCKERFILE.read_text())


def _json_list(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"not the exec (JSON) form: {args}"
    return value


def _copy_sources(args: str) -> tuple[dict[str, str], list[str]]:
    """(--flags, sources) of a COPY/ADD instruction, shell or JSON form."""
    tokens = shlex.split(args)
    flags = dict(t[2:].partition("=")[::2] for t in tokens if t.startswith("--"))
    rest = [t for t in tokens if not t.startswith("--")]
    if rest and rest[0].startswith("["):
        rest = _json_list(" ".join(rest))
    return flags, rest[:-1]


def test_dockerfile_is_multi_stage() -> None:
    stages = _dockerfile().stages
    assert len(stages) >= 2
    names = [s.name for s in stages[:-1]]
    final = stages[-1]
    taken_from = set()
    for args in final.all("COPY"):
        taken_from.add(_copy_sources(args)[0].get("from"))
    for args in final.all("RUN"):
        taken_from.update(re.findall(r"--mount=\S*\bfrom=([\w.-]+)", args))
    assert taken_from & set(names), "the runtime stage takes nothing from the build stage"


def test_runtime_is_a_slim_python_the_project_supports() -> None:
    base = _dockerfile().stages[-1].base
    match = re.fullmatch(r"python:(\d+)\.(\d+)-slim(?:-\w+)?", base)
    assert match, f"runtime base {base!r} is not python:X.Y-slim"
    required = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    floor = re.fullmatch(r">=\s*(\d+)\.(\d+)", required)
    assert floor, f"unexpected requires-python {required!r}"
    minimum = (int(floor.group(1)), int(floor.group(2)))
    assert (int(match.group(1)), int(match.group(2))) >= minimum


def test_dockerfile_runs_as_non_root() -> None:
    users = _dockerfile().stages[-1].all("USER")
    assert users, "the runtime stage never sets USER"
    user, _, group = users[-1].partition(":")
    assert user not in {"root", "0"}
    assert group not in {"root", "0"}


def test_dockerfile_entrypoint_is_the_leveret_command() -> None:
    final = _dockerfile().stages[-1]
    (entrypoint,) = final.all("ENTRYPOINT")
    assert _json_list(entrypoint) == ["leveret"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "leveret" in scripts
    command = _json_list(final.all("CMD")[-1])
    assert command[0] in SUBCOMMANDS


def test_dockerfile_exposes_the_http_ports() -> None:
    exposed = {
        int(p.split("/")[0]) for a in _dockerfile().stages[-1].all("EXPOSE") for p in a.split()
    }
    assert {p for p in LEVERET_SERVICES.values() if p} <= exposed


def test_dockerfile_env_uses_leveret_settings() -> None:
    names = {k for k in _dockerfile().env() if k.startswith("LEVERET")}
    assert names <= SETTINGS


def _context_copies() -> list[str]:
    """Every path the Dockerfile COPYs or ADDs from the build context."""
    sources = []
    for stage in _dockerfile().stages:
        for keyword, args in stage.instructions:
            if keyword in {"COPY", "ADD"}:
                flags, paths = _copy_sources(args)
                if "from" not in flags:
                    sources.extend(paths)
    return sources


def test_dockerfile_copies_only_existing_paths() -> None:
    sources = _context_copies()
    assert sources
    patterns = _dockerignore_patterns()
    for source in sources:
        assert not any(c in source for c in "*?["), f"glob in COPY {source}: name the paths"
        path = (ROOT / source).resolve()
        assert path.exists(), f"COPY {source}: no such path in the repository"
        assert path.is_relative_to(ROOT), f"COPY {source} leaves the build context"
        rel = path.relative_to(ROOT).as_posix()
        assert not _ignored(rel, patterns), f"COPY {source}: excluded by .dockerignore"


def test_dockerfile_copies_what_the_wheel_is_built_from() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = ["pyproject.toml", project["project"]["readme"]]
    needed += project["tool"]["setuptools"]["package-dir"].values()
    copied = [Path(s).as_posix().strip("/") for s in _context_copies()]
    for path in needed:
        assert any(path == c or path.startswith(c + "/") for c in copied), f"{path} not copied"


# --- .dockerignore ------------------------------------------------------------------


def _dockerignore_patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's ignore-pattern syntax (Go's filepath.Match plus `**`) as a regex."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[" and "]" in pattern[i:]:
            end = pattern.index("]", i)
            body = pattern[i + 1 : end]
            out += "[" + ("^" + body[1:] if body.startswith(("!", "^")) else body) + "]"
            i = end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves `path` (relative, posix) out of the build context:
    the last pattern matching it or one of its parent directories decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _pattern_regex(pattern.removeprefix("!").strip("/"))
        if any(regex.fullmatch(c) for c in candidates):
            ignored = not negate
    return ignored


def test_ignore_matcher_follows_docker_semantics() -> None:
    assert _ignored("a/__pycache__/x.pyc", ["**/__pycache__"])
    assert _ignored("__pycache__", ["**/__pycache__"])
    assert _ignored(".venv/bin/python", [".venv"])
    assert not _ignored("shared/data.py", ["data"])
    assert not _ignored("x/keep.db", ["**/*.db", "!x/keep.db"])
    assert not _ignored("shared/x.py", ["*.py"])


@pytest.mark.parametrize(
    "path",
    [
        ".git/HEAD",
        ".venv/bin/python",
        ".mypy_cache/3.11/cache.db",
        ".ruff_cache/CACHEDIR.TAG",
        ".pytest_cache/README.md",
        "shared/__pycache__/contracts.cpython-311.pyc",
        "services/worker/__pycache__/runner.cpython-312.pyc",
        "leveret.egg-info/PKG-INFO",
        "build/lib/leveret/__init__.py",
        "dist/leveret-0.1.0-py3-none-any.whl",
        "data/tracker.db",
        "tracker.db",
        "tests/conftest.py",
    ],
)
def test_dockerignore_keeps_local_state_out(path: str) -> None:
    assert _ignored(path, _dockerignore_patterns())


def test_dockerignore_keeps_every_source_file() -> None:
    patterns = _dockerignore_patterns()
    for source in _context_copies():
        root = ROOT / source
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for file in files:
            rel = file.relative_to(ROOT).as_posix()
            if "__pycache__" not in rel:
                assert not _ignored(rel, patterns), f"{rel} is left out of the image"
