"""A private RabbitMQ node for tests that must restart or kill the broker.

The shared broker at 127.0.0.1:5672 must never be stopped, so a chaos test that needs a
broker outage starts a node of its own: ``rabbitmq-server`` in the foreground (a child
process of the test, in its own process group), with its own node name, ports, Erlang
cookie, config, plugins file, data and logs, all under one temp dir::

    node = BrokerNode()            # management plugin on by default
    node.start()                   # blocks until AMQP (and the HTTP API) answer
    node.url                       # amqp://guest:guest@127.0.0.1:<port>/
    node.restart()                 # graceful stop + start on the SAME data dir and ports
    node.kill()                    # SIGKILL the whole tree (beam.smp included)
    node.cleanup()                 # stop if running, remove the temp dir

Ports are stable for the node's life, so clients can reconnect to the same URL after a
restart. They are picked *below* the kernel's ephemeral range: a client that keeps
reconnecting to a closed port inside that range can end up connected to itself (TCP
simultaneous open) and then hold the very port the broker wants back.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

import httpx
import psutil

RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
RABBITMQCTL = Path("/usr/lib/rabbitmq/bin/rabbitmqctl")
LOOPBACK = "127.0.0.1"
GUEST = ("guest", "guest")

# Inherited variables that would point the node at the system broker's files or change how
# the start script runs (NOTIFY_SOCKET makes it exec erl directly, without its TERM trap).
_SCRUBBED_ENV = ("ERL_FLAGS", "ERL_AFLAGS", "ERL_ZFLAGS", "ERL_LIBS", "NOTIFY_SOCKET")


class BrokerNodeError(RuntimeError):
    """The private node failed to start or stop; the message carries its log tail."""


def broker_available() -> bool:
    return RABBITMQ_SERVER.exists()


def _ephemeral_low() -> int:
    try:
        low, _high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low)
    except (OSError, ValueError):
        return 32768


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # Like Erlang's listeners: a TIME_WAIT left by a previous run does not count.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LOOPBACK, port))
            s.listen(1)
        except OSError:
            return False
    return True


def pick_ports(count: int, *, avoid: Iterable[int] = ()) -> list[int]:
    """``count`` distinct free loopback ports, below the ephemeral range when possible."""
    taken = set(avoid) | {4369, 5672, 15672, 25672, 35672}
    high = _ephemeral_low()
    low = 10000 if high > 12000 else 1024
    rng = random.SystemRandom()
    ports: list[int] = []
    for _ in range(2000):
        if len(ports) == count:
            return ports
        port = rng.randrange(low, high)
        if port not in taken and _port_is_free(port):
            taken.add(port)
            ports.append(port)
    raise BrokerNodeError(f"no {count} free ports found in {low}..{high}")


def _epmd_names() -> set[str] | None:
    """Node names registered with the local epmd, or None when it does not answer."""
    port = int(os.environ.get("ERL_EPMD_PORT", "4369"))
    try:
        with socket.create_connection((LOOPBACK, port), timeout=2) as s:
            s.sendall(b"\x00\x01n")  # NAMES_REQ
            data = b""
            while chunk := s.recv(4096):
                data += chunk
    except OSError:
        return None
    text = data[4:].decode(errors="replace")  # after epmd's own port
    return {line.split()[1] for line in text.splitlines() if line.startswith("name ")}


def _alive(p: psutil.Process) -> bool:
    try:
        # PID 1 here does not always reap orphans: a zombie holds no port and is done.
        return bool(p.is_running() and p.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _is_epmd(p: psutil.Process) -> bool:
    try:
        return bool(p.name() == "epmd")  # shared by every node on the machine: never ours to kill
    except psutil.NoSuchProcess:
        return False


_LIVE: set[BrokerNode] = set()  # started and not cleaned up yet


@atexit.register
def _cleanup_leftovers() -> None:
    """A node runs in a session of its own: Ctrl-C or an early exit would orphan it."""
    for node in list(_LIVE):
        with contextlib.suppress(Exception):
            node.cleanup()


class BrokerNode:
    """One private RabbitMQ node, owned by the test that made it (see the module doc)."""

    def __init__(
        self,
        *,
        management: bool = True,
        base_dir: Path | str | None = None,
        extra_config: Iterable[str] = (),
        server: Path | str = RABBITMQ_SERVER,
    ) -> None:
        self.management = management
        self.server = Path(server)
        self.extra_config = list(extra_config)
        self.nodename = f"leveret-{uuid.uuid4().hex[:6]}@localhost"
        self._own_dir = base_dir is None
        self.base_dir = Path(
            tempfile.mkdtemp(prefix=f"{self.nodename.split('@')[0]}-")
            if base_dir is None
            else base_dir
        )
        self.base_dir.mkdir(parents=True, exist_ok=True)
        ports = pick_ports(3 if management else 2)
        self.port, self.dist_port = ports[0], ports[1]
        self.management_port: int | None = ports[2] if management else None
        self.last_start_s: float | None = None
        self.last_stop_s: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._known: dict[int, psutil.Process] = {}
        self._starts = 0
        self._offsets: dict[Path, int] = {}
        self._write_files()
        _LIVE.add(self)

    # ----- addresses and files ---------------------------------------------------------

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@{LOOPBACK}:{self.port}/"

    @property
    def management_url(self) -> str:
        """The HTTP API's base, ``http://guest:guest@127.0.0.1:<port>`` (append ``/api/...``).

        In the form ``LEVERET_MANAGEMENT_URL`` takes. Pass it to a tracker on this node:
        left unset, the tracker derives port 15672 from the AMQP URL, i.e. the SHARED
        broker's API, and would look for (and close) connections there.
        """
        if self.management_port is None:
            raise BrokerNodeError(f"{self.nodename} runs without the management plugin")
        return f"http://guest:guest@{LOOPBACK}:{self.management_port}"

    @property
    def marker(self) -> str:
        """An argument on the server's command lines: ``pgrep -f <nodename>`` finds them."""
        return self.nodename

    @property
    def console_log(self) -> Path:
        return self.base_dir / "console.log"

    @property
    def node_log(self) -> Path:
        return self.base_dir / "log" / f"{self.nodename}.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def _write_files(self) -> None:
        conf = [
            f"listeners.tcp.default = {LOOPBACK}:{self.port}",
            "loopback_users = none",
        ]
        plugins = "[]."
        if self.management_port is not None:
            conf += [
                f"management.tcp.port = {self.management_port}",
                f"management.tcp.ip = {LOOPBACK}",
            ]
            plugins = "[rabbitmq_management]."
        conf += self.extra_config
        (self.base_dir / "rabbitmq.conf").write_text("\n".join(conf) + "\n")
        (self.base_dir / "enabled_plugins").write_text(plugins + "\n")
        # Our own (empty) env file, so /etc/rabbitmq/rabbitmq-env.conf (NODENAME=...) is unread.
        (self.base_dir / "rabbitmq-env.conf").write_text("# private test node\n")

    def env(self) -> dict[str, str]:
        """The environment for ``rabbitmq-server`` and the CLI tools on this node."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("RABBITMQ_") and k not in _SCRUBBED_ENV
        }
        base = self.base_dir
        env.update(
            HOME=str(base),  # Erlang cookie: base/.erlang.cookie, made on first start
            ERL_EPMD_ADDRESS=LOOPBACK,  # only used if this node has to start epmd itself
            RABBITMQ_NODENAME=self.nodename,
            RABBITMQ_NODE_IP_ADDRESS=LOOPBACK,
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_CONF_ENV_FILE=str(base / "rabbitmq-env.conf"),
            RABBITMQ_CONFIG_FILE=str(base / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(base / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(base / "enabled_plugins"),
            RABBITMQ_MNESIA_BASE=str(base / "mnesia"),
            RABBITMQ_LOG_BASE=str(base / "log"),
            RABBITMQ_PID_FILE=str(base / "rabbitmq.pid"),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        return env

    def processes(self) -> list[psutil.Process]:
        """The node's live processes: start script, beam.smp and beam's helper processes."""
        return [p for p in self._tree() if not _is_epmd(p)]

    def log_tail(self, lines: int = 60) -> str:
        """The last lines of the node's log and of its console (stdout: boot errors)."""
        parts = []
        for path in (self.node_log, self.console_log):
            try:
                text = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            parts.append(f"----- {path} (last {len(text)} lines) -----\n" + "\n".join(text))
        return "\n".join(parts) or "(no log written)"

    # ----- lifecycle ---------------------------------------------------------------------

    def start(self, timeout_s: float = 60) -> float:
        """Start the node and wait until it serves AMQP (and the HTTP API); return seconds."""
        if self.running:
            raise BrokerNodeError(f"{self.nodename} is already running")
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        self._starts += 1
        with self.console_log.open("ab") as console:
            stamp = time.strftime("%H:%M:%S")
            console.write(f"\n===== leveret: start #{self._starts} at {stamp} =====\n".encode())
            console.flush()
            self._offsets = {self.console_log: console.tell()}
            with contextlib.suppress(OSError):
                self._offsets[self.node_log] = self.node_log.stat().st_size
            self._proc = subprocess.Popen(
                # Extra args go to erl verbatim: a harmless user flag that marks the processes.
                [str(self.server), "-leveret_node", self.marker],
                env=self.env(),
                cwd=self.base_dir,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: signals reach sh and beam
            )
        try:
            self._wait_ready(deadline, timeout_s)
        except BaseException:
            self._kill_tree()
            raise
        self._remember_tree()
        self.last_start_s = time.monotonic() - t0
        return self.last_start_s

    def stop(self, timeout_s: float = 30) -> float:
        """Stop gracefully (SIGTERM to the process group) and wait until the ports are free.

        If the node does not exit in time it is killed and BrokerNodeError is raised.
        """
        if self._proc is None:
            return 0.0
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        proc = self._proc
        tree = self.processes()
        for p in tree:  # a frozen (SIGSTOPped) node could not act on SIGTERM
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGCONT)
        if self.management_port is not None and proc.poll() is None:
            self._detach_stats_handler(min(10.0, timeout_s / 3))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            if not self._wait_gone(tree, deadline):
                raise subprocess.TimeoutExpired(proc.args, timeout_s)
        except subprocess.TimeoutExpired:
            self._kill_tree()
            raise BrokerNodeError(
                f"{self.nodename} did not stop within {timeout_s}s; killed it\n{self.log_tail()}"
            ) from None
        self._proc = None
        self._known.clear()
        self._wait_released(deadline)
        self.last_stop_s = time.monotonic() - t0
        return self.last_stop_s

    def kill(self) -> None:
        """SIGKILL the whole node (start script, beam.smp and its helpers); epmd stays."""
        if self._proc is None:
            return
        self._kill_tree()
        self._wait_released(time.monotonic() + 15)

    def restart(self, timeout_s: float = 60) -> float:
        """Graceful stop, then start on the same data dir and ports; return seconds."""
        t0 = time.monotonic()
        self.stop()
        self.start(timeout_s=timeout_s)
        return time.monotonic() - t0

    def cleanup(self) -> None:
        """Stop if running (kill if that fails), leave no process behind, remove the dir."""
        try:
            self.stop()
        except BrokerNodeError:
            pass  # stop() already killed it
        finally:
            self._kill_tree()
            for p in self._strays():
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
            if self._own_dir:
                shutil.rmtree(self.base_dir, ignore_errors=True)
            _LIVE.discard(self)

    # async variants, so a test's event loop (and the clients on it) keeps running

    async def astart(self, timeout_s: float = 60) -> float:
        return await asyncio.to_thread(self.start, timeout_s)

    async def astop(self, timeout_s: float = 30) -> float:
        return await asyncio.to_thread(self.stop, timeout_s)

    async def akill(self) -> None:
        await asyncio.to_thread(self.kill)

    async def arestart(self, timeout_s: float = 60) -> float:
        return await asyncio.to_thread(self.restart, timeout_s)

    def ctl(self, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``rabbitmqctl -n <node> ARGS`` against this node (with its cookie)."""
        return subprocess.run(
            [str(RABBITMQCTL), "-n", self.nodename, *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<BrokerNode {self.nodename} amqp:{self.port} {state}>"

    def __enter__(self) -> BrokerNode:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    # ----- internals ---------------------------------------------------------------------

    def _wait_ready(self, deadline: float, timeout_s: float) -> None:
        assert self._proc is not None
        stage, last_error = "AMQP", "no attempt yet"
        while True:
            rc = self._proc.poll()
            boot_error = self._boot_error()
            if boot_error is not None or rc is not None:
                if rc is None:  # let it finish writing the error, not its crash dump
                    time.sleep(0.5)
                    boot_error = self._boot_error()
                raise BrokerNodeError(
                    f"{self.nodename} failed to start (exit code {rc}): {boot_error or ''}\n"
                    f"{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise BrokerNodeError(
                    f"{self.nodename} not ready after {timeout_s}s "
                    f"(waiting for {stage}: {last_error})\n{self.log_tail()}"
                )
            try:
                if stage == "AMQP":
                    self._check_amqp()
                    stage = "management API"
                if stage == "management API" and self.management_port is not None:
                    self._check_management()
                return
            except Exception as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            time.sleep(0.2)

    def _boot_error(self) -> str | None:
        """What the server logged after BOOT FAILED in this start, if it did.

        The node's log has it at once; its stdout only when the VM exits, seconds later
        (after writing a crash dump).
        """
        for path in (self.node_log, self.console_log):
            try:
                with path.open("rb") as f:
                    f.seek(self._offsets.get(path, 0))
                    text = f.read().decode(errors="replace")
            except OSError:
                continue
            marker = text.find("BOOT FAILED")
            if marker >= 0:
                return "\n".join(text[marker:].splitlines()[:30])
        return None

    def _check_amqp(self) -> None:
        # A cheap TCP probe first; then a real handshake, login and channel open.
        socket.create_connection((LOOPBACK, self.port), timeout=1).close()
        import pika

        params = pika.ConnectionParameters(
            host=LOOPBACK,
            port=self.port,
            credentials=pika.PlainCredentials(*GUEST),
            connection_attempts=1,
            socket_timeout=2,
            stack_timeout=3,
            blocked_connection_timeout=3,
        )
        conn = pika.BlockingConnection(params)
        try:
            conn.channel()
        finally:
            conn.close()

    def _check_management(self) -> None:
        r = httpx.get(f"{self.management_url}/api/overview", auth=GUEST, timeout=3)
        r.raise_for_status()

    def _detach_stats_handler(self, timeout_s: float) -> None:
        """Save ~5 s per graceful stop with the management plugin on (best effort).

        In 3.10 the management agent's rabbit_event handler makes a gen_server call in its
        terminate/2 that, during shutdown, always times out after 5 s. Removing the handler
        while the node is healthy runs the same terminate/2 at once; only stats collection
        is affected, and the node is about to stop anyway.
        """
        expr = "gen_event:delete_handler(rabbit_event, rabbit_mgmt_db_handler, [])."
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            self.ctl("eval", expr, timeout_s=timeout_s)

    def _tree(self) -> list[psutil.Process]:
        """Every live process of the node: the script's tree, known helpers, marked ones."""
        procs = {pid: p for pid, p in self._known.items() if _alive(p)}
        if self._proc is not None:
            with contextlib.suppress(psutil.NoSuchProcess):
                root = psutil.Process(self._proc.pid)
                procs[root.pid] = root
                for child in root.children(recursive=True):
                    procs[child.pid] = child
        for p in self._strays():
            procs[p.pid] = p
        return [p for p in procs.values() if _alive(p) and p.pid != os.getpid()]

    def _remember_tree(self) -> None:
        # beam's helpers (erl_child_setup, inet_gethost, the disk monitor's sh) call setsid,
        # so a process-group signal misses them and they would outlive a killed beam.
        self._known = {p.pid: p for p in self._tree() if not _is_epmd(p)}

    def _strays(self) -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter(["cmdline"]):
            cmdline = p.info.get("cmdline") or []
            if self.marker in cmdline and p.pid != os.getpid():
                found.append(p)
        return found

    def _kill_tree(self) -> None:
        proc = self._proc
        tree = [p for p in self._tree() if not _is_epmd(p)]
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for p in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        self._wait_gone(tree, time.monotonic() + 10)
        self._proc = None
        self._known.clear()

    @staticmethod
    def _wait_gone(procs: list[psutil.Process], deadline: float) -> bool:
        while True:
            if not any(_alive(p) for p in procs):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    def _wait_released(self, deadline: float) -> None:
        """Wait until the node's ports are free and epmd has forgotten its name."""
        short = self.nodename.split("@")[0]
        ports = [p for p in (self.port, self.dist_port, self.management_port) if p]
        while True:
            busy = [p for p in ports if not _port_is_free(p)]
            names = _epmd_names() or set()
            if not busy and short not in names:
                return
            if time.monotonic() > deadline:
                raise BrokerNodeError(
                    f"{self.nodename} stopped but still holds ports {busy} "
                    f"or its epmd name ({short in names})"
                )
            time.sleep(0.1)
