"""``jetrun up``: an embedded nats-server, the gateway and the scheduler in this process, and
local agents in child processes (``--agents``; one below 8 cores: ``runtime.up_agents``); the
autoscaler beside the scheduler starts more local agents (``LocalProvider``) when they have no
room for a replica, and stops them when idle.

Startup either reaches the banner, printed once every local agent's pipelines are ready, or stops
with one line and a non-zero exit (``StartupError``): a port in use, a store that cannot be
written, a pipeline module that does not import, a pipeline whose startup step fails. Shutdown
(Ctrl-C, SIGTERM) is bounded at every step by ``shutdown_grace_s``, also when NATS is gone. The
nats-server and the agents die with this process, even when it is SIGKILLed
(``runtime.infra.lifetime``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import signal
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
from nats.aio.client import Client

from runtime.control.gateway import Gateway
from runtime.control.gateway_pool import extra_gateways, gateway_command, until_served
from runtime.control.readiness import Readiness, SchedulerWatch
from runtime.control.scaler import Scaler
from runtime.control.scheduler import Scheduler
from runtime.health import add_scheduler, health_app, scheduler_checks, serve_health
from runtime.infra.config import Config
from runtime.infra.eventlog import LogSettings
from runtime.infra.metrics import Exposition
from runtime.infra.nats_auth import AGENTS_DIR, Credentials
from runtime.infra.nats_conn import close, connect
from runtime.infra.natsserver import NatsServer, NatsServerFailed, NatsServerNotFound
from runtime.infra.projection import RunIndex
from runtime.provision import provision
from runtime.services import serve_http
from runtime.up_agents import serve_agents
from runtime.up_children import _provider, _webhooks, agent_env, recorder_command
from runtime.up_ready import StartupError

log = logging.getLogger("jetrun")

STORE_CHECK_S = 1.0
STORE_FAILING_S = 3.0  # the store refused writes this long: worth a nats-server restart
STORE_RESTART_EVERY_S = 30.0
STORE_FREE_MIN = 8 << 20  # only with this much room on the store's disk
GATEWAYS_WITHIN_S = 60.0  # the gateway processes serve the HTTP port within this, or no banner


@dataclass(frozen=True)
class UpOptions:
    data_dir: Path
    config: Config
    host: str
    port: int
    nats_url: str | None
    nats_port: int
    modules: list[str]
    slots: int  # CPU slots of each local agent
    agents: int = 1  # local agent processes (``runtime.up_agents.default_agents``)
    boot_delay_s: float = 0.0  # simulated boot time of an agent the autoscaler adds
    node_slots: int | None = None  # CPU slots of such an agent (default: ``slots``)
    # CPU dispatches every agent holds waiting for a slot (None: as many as its slots)
    queue_depth: int | None = None
    nats_sync: str | None = None  # the embedded nats-server's sync_interval (None: its default)
    gateways: int = 1  # gateway processes on the HTTP port (this one and gateways - 1 more)
    # with gateways > 1: all of them are ``jetrun gateway`` processes and this one serves no
    # connection (its event loop, the scheduler's, is left to the scheduler)
    dedicated_gateways: bool = False
    # this process's /metrics, /healthz, /readyz (None: none, or any free port where it serves
    # no HTTP, so that the scheduler's metrics are somewhere)
    health_port: int | None = None
    health_host: str = "127.0.0.1"
    config_path: str | None = None  # what extra gateways and the webhook deliverer read
    credentials_dir: Path | None = None  # with nats_url: role seeds (none: anonymous)
    nats_monitor_port: int | None = None  # the embedded nats-server's /varz, /connz (loopback)

    def credentials(self, role: str) -> Credentials | None:
        """Embedded NATS: the seeds it made in ``<data dir>/credentials``."""
        directory = self.credentials_dir
        if self.nats_url is None:
            directory = self.data_dir / "credentials"
        return Credentials.from_dir(directory, role) if directory is not None else None


def bind(host: str, port: int, what: str, *, reuse_port: bool = False) -> socket.socket:
    """A socket bound to ``host:port`` (address reuse as servers do: a port in TIME_WAIT is
    free, one somebody listens on is not). Raises ``StartupError``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:  # the extra gateways listen on it too
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise StartupError(
            f"{what} port {port} on {host} is not available: {err.strerror}"
        ) from None
    return sock


@contextlib.asynccontextmanager
async def step(what: str) -> AsyncIterator[None]:
    """Turn any failure inside into a one-line ``StartupError`` naming ``what``."""
    try:
        yield
    except StartupError:
        raise
    except Exception as err:
        raise StartupError(f"{what} failed: {_describe(err)}") from err


def _describe(err: BaseException) -> str:
    while isinstance(err, BaseExceptionGroup) and len(err.exceptions) == 1:
        err = err.exceptions[0]
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


async def serve_up(opts: UpOptions) -> None:
    """Everything on one machine until SIGINT or SIGTERM. Raises ``StartupError`` when it
    cannot start and ``AgentExited`` when the agent stops by itself."""
    http = bind(opts.host, opts.port, "HTTP", reuse_port=opts.gateways > 1)
    if serves_http(opts):
        http.listen(2048)
    # else the port stays bound (taken, and its number known for --port 0) and the gateway
    # processes listen on it
    opts = dataclasses.replace(opts, port=http.getsockname()[1])  # --port 0: the one we got
    stopping = anyio.Event()
    with contextlib.closing(http), anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sig:
        async with anyio.create_task_group() as watcher:

            async def on_signal() -> None:
                async for _ in sig:
                    stopping.set()
                    return

            watcher.start_soon(on_signal)
            try:
                await _up(opts, http, stopping)
            finally:
                watcher.cancel_scope.cancel()


async def _up(opts: UpOptions, http: socket.socket, stopping: anyio.Event) -> None:
    grace = opts.config.settings.shutdown_grace_s
    async with contextlib.AsyncExitStack() as stack:
        server, nats_url = None, opts.nats_url
        if nats_url is None:
            server = await _start_nats(opts)
            stack.push_async_callback(server.stop, grace)
            nats_url = server.url
        settings = LogSettings()
        async with step(f"connecting to NATS at {nats_url}"):
            admin = await connect(
                nats_url, "jetrun-setup", opts.credentials("admin"), first_connect_s=10.0
            )
            try:
                await provision(admin, opts.config, settings)  # only admin manages streams
            finally:
                await close(admin, grace)
            nc = await connect(
                nats_url, "jetrun-gateway", opts.credentials("gateway"), first_connect_s=10.0
            )
            stack.push_async_callback(close, nc, grace)
            snc = await connect(
                nats_url, "jetrun-scheduler", opts.credentials("scheduler"), first_connect_s=10.0
            )
            stack.push_async_callback(close, snc, grace)
        if serves_http(opts):
            await _serve(opts, http, stopping, nc, snc, nats_url, server)
        else:
            await _schedule(opts, stopping, nc, snc, nats_url, server)


async def _serve(
    opts: UpOptions,
    http: socket.socket,
    stopping: anyio.Event,
    nc: Client,
    snc: Client,
    nats_url: str,
    server: NatsServer | None,
) -> None:
    """This process's gateway serves the HTTP port (with ``gateways - 1`` more processes)."""
    settings = LogSettings()
    # one tail of the log and one run index for both: each event is delivered, decoded and
    # applied once in this process; the scheduler forgets ended runs for both
    index = RunIndex()
    gateway = Gateway(nc, opts.config, log_settings=settings, index=index)
    scheduler = Scheduler(snc, opts.config, log_settings=settings, feed=gateway.feed, index=index)
    scaler = Scaler(scheduler, _provider(opts, nats_url, server))
    async with anyio.create_task_group() as tg:
        add_scheduler(gateway.telemetry.exposition, scheduler, alongside=gateway.telemetry)
        async with step("setting up the event log"):
            await tg.start(gateway.run)
            await tg.start(scheduler.run)
            await tg.start(scaler.run)
        health = health_address(opts)
        if health is not None:
            app = health_app(gateway.telemetry.exposition, scheduler_checks(scheduler))
            async with step("serving /metrics and /healthz"):
                await tg.start(serve_health, app, *health)
        if server is not None:
            tg.start_soon(recover_store, server, gateway.readiness)
        async with anyio.create_task_group() as http_tg:
            server_http = await http_tg.start(serve_http, gateway, opts.host, opts.port, http)
            try:
                async with _children(opts, nats_url, opts.gateways - 1):
                    await serve_agents(
                        opts, scheduler.fleet, scheduler.catalog, nats_url, server, stopping
                    )
            finally:
                if stopping.is_set():
                    print("\njetrun: shutting down", flush=True)
                server_http.should_exit = True  # in-flight requests get the grace period
        tg.cancel_scope.cancel()


async def _schedule(
    opts: UpOptions,
    stopping: anyio.Event,
    nc: Client,
    snc: Client,
    nats_url: str,
    server: NatsServer | None,
) -> None:
    """Dedicated gateways serve the HTTP port: this process runs the scheduler alone, with
    its own tail of the log and run index, and no gateway (nothing here reads a run list, a
    team's limits or the API's metrics: each event costs only what the scheduler does with
    it). ``nc`` (the gateway role) serves the store's readiness probe."""
    settings = LogSettings()
    # the views, the run history and the checkpoint: the recorder's (a child, below)
    scheduler = Scheduler(snc, opts.config, log_settings=settings, keeps=False)
    scaler = Scaler(scheduler, _provider(opts, nats_url, server))
    exposition = Exposition()
    add_scheduler(exposition, scheduler)
    watch = SchedulerWatch(time.monotonic, opts.config.settings.node_loss_timeout_s)
    readiness = Readiness(
        nc, nc.jetstream(), watch, replayed=lambda: scheduler.caught_up, replicas=settings.replicas
    )
    async with anyio.create_task_group() as tg:
        async with step("setting up the event log"):
            await readiness.require()
            await tg.start(scheduler.run)
            await tg.start(scaler.run)
        health = health_address(opts)
        if health is not None:
            app = health_app(exposition, scheduler_checks(scheduler))
            async with step("serving /metrics and /healthz"):
                await tg.start(serve_health, app, *health)
        if server is not None:
            tg.start_soon(recover_store, server, readiness)
        try:
            async with _children(opts, nats_url, opts.gateways), _recorder(opts, nats_url):
                async with step("starting the gateway processes"):
                    await until_served(opts.host, opts.port, GATEWAYS_WITHIN_S)
                await serve_agents(
                    opts, scheduler.fleet, scheduler.catalog, nats_url, server, stopping
                )
        finally:
            if stopping.is_set():
                print("\njetrun: shutting down", flush=True)
        tg.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def _recorder(opts: UpOptions, nats_url: str) -> AsyncIterator[None]:
    """``jetrun recorder`` (``runtime.control.recorder``) as a child process, started again if
    it exits: it stores what the scheduler here does not keep."""
    grace = opts.config.settings.shutdown_grace_s
    command = recorder_command(nats_url, opts.config_path)
    env = agent_env(nats_url, opts.credentials("scheduler"))
    async with extra_gateways(1, command, grace + 5.0, env=env, what="recorder"):
        yield


@contextlib.asynccontextmanager
async def _children(opts: UpOptions, nats_url: str, gateways: int) -> AsyncIterator[None]:
    """``gateways`` gateway processes on the HTTP port and the webhook deliverer."""
    grace = opts.config.settings.shutdown_grace_s
    command = gateway_command(nats_url, opts.host, opts.port, opts.config_path)
    env = agent_env(nats_url, opts.credentials("gateway"))
    async with extra_gateways(gateways, command, grace + 5.0, env=env), _webhooks(opts, nats_url):
        yield


def serves_http(opts: UpOptions) -> bool:
    """Whether this process's own gateway serves the HTTP port."""
    return opts.gateways == 1 or not opts.dedicated_gateways


def health_address(opts: UpOptions) -> tuple[str, int] | None:
    """Where this process serves its /metrics, /healthz and /readyz: ``health_port`` if
    given; else nowhere while it serves the HTTP port (which has /metrics), and any free port
    where it does not (dedicated gateways), so that the scheduler's metrics are served."""
    if opts.health_port is not None:
        return opts.health_host, opts.health_port
    return None if serves_http(opts) else (opts.health_host, 0)


async def recover_store(server: NatsServer, readiness: Readiness) -> None:
    """Restart the embedded nats-server when its store has refused writes for
    ``STORE_FAILING_S`` while its disk has room (again): nats-server keeps failing a stream
    that met a write error (a full disk) until it restarts. Every connection reconnects by
    itself, so writes resume with no jetrun restart. At most one restart per
    ``STORE_RESTART_EVERY_S``."""
    failing_since: float | None = None
    restarted_at = float("-inf")
    down = False
    while True:
        await anyio.sleep(STORE_CHECK_S)
        now = anyio.current_time()
        if down and now - restarted_at >= STORE_RESTART_EVERY_S:
            restarted_at = now  # our restart failed: try again now and then
            down = not await _restart(server)
            continue
        checks = await readiness.checks()
        if checks["store_writable"] or not checks["nats_connected"]:
            failing_since = None
            continue
        failing_since = now if failing_since is None else failing_since
        if (
            now - failing_since < STORE_FAILING_S
            or now - restarted_at < STORE_RESTART_EVERY_S
            or shutil.disk_usage(server.store_dir).free < STORE_FREE_MIN
        ):
            continue
        log.warning("the store refuses writes but its disk has room: restarting nats-server")
        restarted_at, failing_since = now, None
        down = not await _restart(server)


async def _restart(server: NatsServer) -> bool:
    await server.stop()
    try:
        await server.start()
    except NatsServerFailed as err:
        log.error("the embedded nats-server did not restart: %s", err)
        return False
    return True


async def _start_nats(opts: UpOptions) -> NatsServer:
    if opts.nats_port:
        bind("127.0.0.1", opts.nats_port, "NATS").close()
    # agents of an earlier start died with it: their identities go (each start mints its own)
    shutil.rmtree(opts.data_dir / "credentials" / AGENTS_DIR, ignore_errors=True)
    server = NatsServer(
        store_dir=opts.data_dir / "nats",
        port=opts.nats_port,
        sync=opts.nats_sync,
        credentials_dir=opts.data_dir / "credentials",
        monitor_port=opts.nats_monitor_port,
    )
    try:
        await server.start()
    except (NatsServerFailed, NatsServerNotFound, OSError) as err:
        await server.stop()
        raise StartupError(f"nats-server did not start: {_describe(err)}") from None
    return server
