"""Running jetrun's services as processes: each ``serve_*`` runs until SIGINT or SIGTERM.

``jetrun up`` (all of them on one machine) is ``runtime/up.py``. Shutdown is phased and bounded:
stop taking HTTP requests (open streams get ``shutdown_grace_s``), cancel, close NATS.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
from collections.abc import Awaitable, Callable, Generator
from typing import TYPE_CHECKING

import anyio
import uvicorn
from anyio.abc import TaskStatus

from contracts.names import check_token
from runtime.infra.capture import DEFAULT_MAX_BYTES
from runtime.infra.config import Config, Settings
from runtime.infra.eventlog import LogSettings
from runtime.infra.nats_auth import Credentials
from runtime.infra.nats_conn import close, connect

if TYPE_CHECKING:
    from runtime.control.gateway import Gateway
    from runtime.control.providers import NodeProvider
    from runtime.node.agent import Agent

# Each serve_* imports what its own process runs, when it starts: a gateway does not load the
# scheduler or the agent, a scheduler not the HTTP API, an agent neither (faster starts).

log = logging.getLogger("jetrun")
Address = tuple[str, int]  # host, port of a service's /metrics, /healthz, /readyz
# An agent's default CPU queue depth, per CPU slot: deep enough that for very short attempts the
# scheduler's bound on the wait there (``agent_queue_wait_s``, runtime.control.slots), not the
# depth, decides how many runs wait at the agent (README, "Benchmarks").
QUEUE_PER_SLOT = 16


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: our process owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


async def until_signalled(
    cleanup: Callable[[int], Awaitable[None]] | None = None,
) -> int:
    """Block until SIGINT or SIGTERM; returns the signal number."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            if cleanup is not None:
                await cleanup(signum)
            return int(signum)
    return 0


async def serve_http(
    gateway: Gateway,
    host: str,
    port: int,
    sock: socket.socket | None = None,
    *,
    task_status: TaskStatus[_Server],
) -> None:
    """Serve the gateway's HTTP API on ``host:port`` (or on an already bound ``sock``)."""
    from runtime.infra.http_server import protocol_for

    settings = gateway.config.settings
    app = gateway.app()
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="off",
        access_log=False,
        log_level="warning",
        log_config=None,  # its records go through jetrun's formatter (text or JSON)
        http=protocol_for(settings, direct=app),  # the hot endpoints answered without ASGI
        loop="none",
        timeout_graceful_shutdown=int(max(1, settings.shutdown_grace_s)),
        timeout_keep_alive=int(max(1, settings.http_keepalive_s)),
    )
    server = _Server(config)
    task_status.started(server)
    await server.serve(sockets=[sock] if sock is not None else None)


async def serve_gateway(
    nats_url: str,
    config: Config,
    host: str,
    port: int,
    settings: LogSettings,
    reuse_port: bool = False,
    *,
    credentials: Credentials | None = None,
) -> None:
    """The HTTP API; with ``reuse_port`` on a port shared with other gateways, listened on only
    once this one has caught up with the log; else at once (the API says 503 ``starting`` until
    then)."""
    from runtime.control.gateway import Gateway
    from runtime.control.gateway_pool import listening_socket

    nc = await connect(nats_url, "jetrun-gateway", credentials)
    gateway = Gateway(nc, config, log_settings=settings)
    async with anyio.create_task_group() as tg:
        if reuse_port:  # a shared port: listened on only once caught up
            await tg.start(gateway.run)
        else:  # the port answers (503 starting) while it catches up
            tg.start_soon(gateway.run)
        sock = listening_socket(host, port, reuse_port=True) if reuse_port else None
        async with anyio.create_task_group() as http_tg:
            server = await http_tg.start(serve_http, gateway, host, port, sock)
            log.info("gateway listening on http://%s:%d", host, port)
            await until_signalled()
            server.should_exit = True  # finish in-flight requests, then return
        tg.cancel_scope.cancel()
    await close(nc)


async def serve_scheduler(
    nats_url: str,
    config: Config,
    settings: LogSettings,
    provider: NodeProvider | None = None,
    *,
    health: Address | None = None,
    credentials: Credentials | None = None,
) -> None:
    """The scheduler and, beside it, the autoscaler (adding nodes through ``provider``)."""
    from runtime.control.scaler import Scaler
    from runtime.control.scheduler import Scheduler
    from runtime.health import add_scheduler, health_app, scheduler_checks, serve_health
    from runtime.infra.metrics import Exposition

    nc = await connect(nats_url, "jetrun-scheduler", credentials)
    scheduler = Scheduler(nc, config, log_settings=settings)
    scaler = Scaler(scheduler, provider)
    async with anyio.create_task_group() as tg:
        if health is not None:
            exposition = Exposition()
            add_scheduler(exposition, scheduler)
            app = health_app(exposition, scheduler_checks(scheduler))
            await tg.start(serve_health, app, *health)
        await tg.start(scheduler.run)
        await tg.start(scaler.run)
        log.info("scheduler running")
        await until_signalled()
        tg.cancel_scope.cancel()
    await close(nc)


async def serve_recorder(
    nats_url: str, config: Config, settings: LogSettings, *, credentials: Credentials | None = None
) -> None:
    """Run views, the run history and the checkpoint, beside a scheduler that does not keep
    them (``runtime.control.recorder``)."""
    from runtime.control.recorder import Recorder

    nc = await connect(nats_url, "jetrun-recorder", credentials)
    recorder = Recorder(nc, config, log_settings=settings)
    async with anyio.create_task_group() as tg:
        await tg.start(recorder.run)
        log.info("recorder running")
        await until_signalled()
        tg.cancel_scope.cancel()
    await close(nc)


async def serve_agent(
    nats_url: str,
    modules: list[str],
    slots: int,
    heartbeat_s: float,
    agent_id: str | None,
    settings: LogSettings,
    *,
    health: Address | None = None,
    log_max_bytes: int = DEFAULT_MAX_BYTES,
    credentials: Credentials | None = None,
    queue_depth: int | None = None,
) -> None:
    """``queue_depth``: CPU dispatches held waiting for a slot (None: ``QUEUE_PER_SLOT`` per
    slot)."""
    from runtime.health import agent_checks, agent_exposition, health_app, serve_health
    from runtime.node.agent import Agent, AgentFenced
    from runtime.node.replicas import PipelineModuleError

    nc = await connect(nats_url, "jetrun-agent", credentials)
    agent = Agent(
        nc,
        modules=modules,
        cpu_slots=slots,
        cpu_queue=QUEUE_PER_SLOT * slots if queue_depth is None else queue_depth,
        agent_id=agent_id,
        heartbeat_interval_s=heartbeat_s,
        log_settings=settings,
        log_max_bytes=log_max_bytes,
    )
    fenced = False
    try:
        async with anyio.create_task_group() as tg:
            if health is not None:
                app = health_app(agent_exposition(agent), agent_checks(agent))
                await tg.start(serve_health, app, *health)
            await tg.start(agent.run)
            log.info("agent %s running %s", agent.agent_id, ", ".join(sorted(agent.pools)))
            reason = await _signal_or_recall(agent)
            await agent.drain(reason)
            tg.cancel_scope.cancel()
    except* AgentFenced as group:
        fenced = not agent.draining_on_notice
        log.error("%s", group.exceptions[0])
    except* PipelineModuleError as group:
        log.error("%s", group.exceptions[0])
        await close(nc)
        raise SystemExit(2) from None
    await close(nc)
    if fenced:
        raise SystemExit(3)  # a supervisor restarts it (the same id is welcome back)


async def _signal_or_recall(agent: Agent) -> str:
    """Wait for SIGTERM/SIGINT or an explicit recall; say which."""
    reasons: list[str] = []
    async with anyio.create_task_group() as tg:

        async def signalled() -> None:
            await until_signalled()
            reasons.append("SIGTERM/SIGINT: preemption notice")
            tg.cancel_scope.cancel()

        async def recalled() -> None:
            await agent.recalled.wait()
            reasons.append("recalled: preemption notice")
            tg.cancel_scope.cancel()

        tg.start_soon(signalled)
        tg.start_soon(recalled)
    return reasons[0] if reasons else "stopped"


async def setup_streams(
    nats_url: str, config: Config, settings: LogSettings, credentials: Credentials | None
) -> list[str]:
    """The admin step: create or update every stream; returns their names."""
    from runtime.provision import provision

    nc = await connect(nats_url, "jetrun-setup", credentials)
    try:
        return await provision(nc, config, settings)
    finally:
        await nc.close()


async def recall_agent(
    nats_url: str, agent_id: str, timeout: float, credentials: Credentials | None = None
) -> str:
    """Ask one agent to honour a preemption notice now; returns its answer. Raises
    ``ValueError`` for an id that is not an agent id."""
    from runtime.infra.fleet import RECALL_SUBJECT

    check_token(agent_id, "agent id")
    nc = await connect(nats_url, "jetrun-recall", credentials)
    try:
        reply = await nc.request(f"{RECALL_SUBJECT}.{agent_id}", b"", timeout=timeout)
        return reply.data.decode()
    finally:
        await close(nc)


async def apply_retention_at(
    nats_url: str, settings: Settings, credentials: Credentials | None = None
) -> list[tuple[str, float]]:
    """``jetrun admin apply-retention`` (NATS role: admin): one connection, the updates,
    closed."""
    from runtime.control.retention import apply_retention, wanted

    wanted(settings)  # refuse bad settings before connecting
    nc = await connect(nats_url, "jetrun-admin", credentials)
    try:
        return await apply_retention(nc.jetstream(timeout=10.0), settings)
    finally:
        await close(nc)
