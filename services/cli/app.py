"""The ``leveret`` command: one entry point for every service and tool.

Flags override ``LEVERET_*`` environment variables, which override defaults.
Service modules are imported inside their command so that, e.g., ``leveret
submit`` does not load FastAPI.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import typer

from leveret.envfile import apply_env_file
from leveret.roles import Role
from leveret.settings import SchedulerSettings, TrackerSettings, WorkerSettings

app = typer.Typer(
    name="leveret",
    help="A distributed task scheduler on RabbitMQ.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


HOST_HELP = "HTTP bind address [env LEVERET_HOST; 127.0.0.1]"
INSECURE_HELP = "Serve without API tokens on a non-loopback address [env LEVERET_INSECURE]"
ENV_FILE_HELP = "Role env file from broker-setup [env LEVERET_ENV_FILE]"


def _given(**flags: Any) -> dict[str, Any]:
    """Only the flags the user set, so unset ones fall back to env and defaults."""
    return {k: v for k, v in flags.items() if v is not None}


@app.command()
def scheduler(
    port: Annotated[int | None, typer.Option(help="HTTP port [env LEVERET_PORT; 8080]")] = None,
    host: Annotated[str | None, typer.Option(help=HOST_HELP)] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help=INSECURE_HELP)] = False,
    env_file: Annotated[Path | None, typer.Option(help=ENV_FILE_HELP)] = None,
) -> None:
    """Run the scheduler: AMQP intake on leveret.submit and the HTTP submission API."""
    from leveret.scheduler.service import main

    apply_env_file(env_file, Role.SCHEDULER)
    main(SchedulerSettings(**_given(port=port, host=host, insecure=insecure or None)))


@app.command()
def tracker(
    port: Annotated[int | None, typer.Option(help="HTTP port [env LEVERET_PORT; 8081]")] = None,
    host: Annotated[str | None, typer.Option(help=HOST_HELP)] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help=INSECURE_HELP)] = False,
    env_file: Annotated[Path | None, typer.Option(help=ENV_FILE_HELP)] = None,
) -> None:
    """Run the tracker: records every status, watches workers, serves the tracker API."""
    from leveret.tracker.service import main

    apply_env_file(env_file, Role.TRACKER)
    main(TrackerSettings(**_given(port=port, host=host, insecure=insecure or None)))


@app.command()
def worker(
    concurrency: Annotated[int | None, typer.Option(help="Tasks run at once (prefetch)")] = None,
    pool: Annotated[str | None, typer.Option(help="Pool (work queue) to serve")] = None,
    handlers: Annotated[
        list[str] | None, typer.Option(help="Module with @task handlers (repeatable)")
    ] = None,
    shell: Annotated[bool, typer.Option("--shell", help="Allow the `shell` kind")] = False,
    worker_id: Annotated[str | None, typer.Option(help="Worker id (connection name)")] = None,
    heartbeat_interval_s: Annotated[float | None, typer.Option()] = None,
    capability: Annotated[
        list[str] | None, typer.Option(help="A tag tasks can require, e.g. gpu (repeatable)")
    ] = None,
    limit: Annotated[
        list[str] | None,
        typer.Option(help="Cluster-wide limit, kind:running=N,rate=R (repeatable)"),
    ] = None,
    env_file: Annotated[Path | None, typer.Option(help=ENV_FILE_HELP)] = None,
) -> None:
    """Run a worker that serves one pool."""
    from leveret.worker.service import main

    apply_env_file(env_file, Role.WORKER)
    flags = _given(
        concurrency=concurrency,
        pool=pool,
        handlers=handlers or None,
        worker_id=worker_id,
        heartbeat_interval_s=heartbeat_interval_s,
        capabilities=capability or None,
        limits=limit or None,
    )
    if shell:
        flags["shell_enabled"] = True
    main(WorkerSettings(**flags))


@app.command()
def submit(
    kind: Annotated[str | None, typer.Argument(help="Task kind; omit to read JSON lines")] = None,
    payload: Annotated[str | None, typer.Argument(help="JSON, or a plain string")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for and print the result")] = False,
    task_id: Annotated[str | None, typer.Option("--id", help="Idempotency key")] = None,
    pool: Annotated[str | None, typer.Option(help="Pool to run it in")] = None,
    timeout_s: Annotated[float | None, typer.Option(help="Attempt timeout, seconds")] = None,
    priority: Annotated[int | None, typer.Option(help="0 (lowest) … 9 (highest); 4")] = None,
    requires: Annotated[
        list[str] | None,
        typer.Option("--requires", help="A capability the worker must have (repeatable)"),
    ] = None,
    wait_timeout_s: Annotated[float, typer.Option(help="How long --wait waits")] = 300.0,
) -> None:
    """Submit a task over AMQP (or one JSON task per line from stdin) and print its id."""
    from leveret.cli.submit import submit_command

    code = asyncio.run(
        submit_command(
            kind,
            payload,
            wait=wait,
            task_id=task_id,
            pool=pool,
            timeout_s=timeout_s,
            priority=priority,
            requires=requires or None,
            wait_timeout_s=wait_timeout_s,
        )
    )
    raise typer.Exit(code)


@app.command("broker-setup")
def broker_setup(
    admin_url: Annotated[
        str, typer.Option(help="Management API with an administrator, http://user:pass@host:15672/")
    ],
    vhost: Annotated[str, typer.Option(help="Virtual host (made if missing)")] = "/",
    env_file: Annotated[
        Path | None, typer.Option(help="Write the role URLs here (mode 600)")
    ] = None,
    namespace: Annotated[
        str, typer.Option(envvar="LEVERET_NAMESPACE", help="Namespace the permissions cover")
    ] = "leveret",
    amqp_url: Annotated[
        str | None, typer.Option(help="Where services connect; amqp://<admin host>:5672")
    ] = None,
    rotate: Annotated[bool, typer.Option("--rotate", help="New passwords for every user")] = False,
    fencer: Annotated[
        bool, typer.Option(help="Make the administrator user the tracker fences with")
    ] = True,
    role_files: Annotated[
        bool,
        typer.Option(
            "--role-files", help="Also write <dir>/<role>/<env file name>: each role's lines only"
        ),
    ] = False,
) -> None:
    """Create one RabbitMQ user per role with least-privilege permissions (idempotent)."""
    from leveret.cli import brokersetup

    host = urlsplit(admin_url).hostname or "127.0.0.1"
    plan = brokersetup.Plan(
        admin_url=admin_url,
        vhost=vhost,
        namespace=namespace,
        amqp_url=amqp_url or f"amqp://{host}:5672",
        env_file=env_file,
        rotate=rotate,
        fencer=fencer,
        role_files=role_files,
    )
    raise typer.Exit(brokersetup.broker_setup(plan))


@app.command()
def status(
    tracker_url: Annotated[
        str, typer.Option(envvar="LEVERET_TRACKER_URL", help="Tracker API base URL")
    ] = "http://127.0.0.1:8081",
    as_json: Annotated[bool, typer.Option("--json", help="Print raw JSON")] = False,
) -> None:
    """Show counts by status, workers and recent tasks (from the tracker API)."""
    from leveret.cli.status import show_status

    raise typer.Exit(show_status(tracker_url, as_json=as_json))


@app.command()
def demo(
    workers: Annotated[int, typer.Option(help="Worker processes")] = 3,
    tasks: Annotated[int, typer.Option(help="Sample tasks to submit")] = 200,
    concurrency: Annotated[int, typer.Option(help="Concurrency per worker")] = 8,
) -> None:
    """Start a scheduler, a tracker and N workers, run sample tasks, print statistics."""
    from leveret.cli.demo import run_demo

    raise typer.Exit(run_demo(workers=workers, tasks=tasks, concurrency=concurrency))


@app.command()
def bench(
    tasks: Annotated[int, typer.Option(help="Tasks per measured path")] = 5000,
    workers: Annotated[int, typer.Option(help="Worker processes")] = 2,
    concurrency: Annotated[int, typer.Option(help="Concurrency per worker")] = 32,
    out: Annotated[Path, typer.Option(help="Markdown file the figures are appended to")] = Path(
        "docs/benchmarks.md"
    ),
    paths: Annotated[
        str,
        typer.Option(
            help="Comma-separated: raw,amqp,http,raw-light,light,peers (peers: Celery and "
            "Dramatiq by deploy/bench/peers.py in .venv-peers, made on first use)"
        ),
    ] = "raw,amqp,http,raw-light,light,peers",
    backlog: Annotated[
        int,
        typer.Option(
            help="Also queue this many tasks with no worker and compare the scheduler's and "
            "tracker's memory at 10k and at this many (0: skip; the goal is 1000000)"
        ),
    ] = 0,
) -> None:
    """Measure raw aio-pika against leveret end to end; append the figures to docs."""
    from leveret.cli.bench import run_bench

    chosen = tuple(p.strip() for p in paths.split(",") if p.strip())
    code = run_bench(
        tasks=tasks,
        workers=workers,
        concurrency=concurrency,
        out=out,
        paths=chosen,
        backlog=backlog,
    )
    raise typer.Exit(code)


@app.command()
def schema(
    out: Annotated[Path, typer.Option(help="Directory for the JSON Schemas")] = Path("docs/schema"),
) -> None:
    """Write the wire contract's JSON Schemas (one file per message)."""
    from leveret.contracts import PUBLISHED_MODELS

    out.mkdir(parents=True, exist_ok=True)
    for stem, model in PUBLISHED_MODELS.items():
        text = json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n"
        (out / f"{stem}.json").write_text(text)
    typer.echo(f"wrote {len(PUBLISHED_MODELS)} schemas to {out}")


def main() -> None:
    """Console-script entry point."""
    sys.exit(app())
