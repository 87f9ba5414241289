"""Running jetrun's services as processes: each ``serve_*`` runs until SIGINT or SIGTERM.

``jetrun up`` = an embedded nats-server + gateway + scheduler in this process + one agent in a
child process. Shutdown is phased: stop taking HTTP requests, stop the agent (a clean exit, after
its runs are preempted), cancel the control plane, close NATS, stop the server.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Generator
from pathlib import Path

import anyio
import uvicorn
from anyio.abc import TaskStatus

from runtime.agent import Agent, AgentFenced
from runtime.config import DEMO_TOKEN, Config
from runtime.eventlog import LogSettings
from runtime.fleet import RECALL_SUBJECT
from runtime.gateway import Gateway
from runtime.health import (
    add_scheduler,
    agent_checks,
    agent_exposition,
    health_app,
    scheduler_checks,
    serve_health,
)
from runtime.metrics import Exposition
from runtime.nats_conn import connect
from runtime.natsserver import NatsServer
from runtime.scheduler import Scheduler

log = logging.getLogger("jetrun")
Address = tuple[str, int]  # host, port of a service's /metrics, /healthz, /readyz


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
    gateway: Gateway, host: str, port: int, *, task_status: TaskStatus[_Server]
) -> None:
    config = uvicorn.Config(
        gateway.app(),
        host=host,
        port=port,
        lifespan="off",
        access_log=False,
        log_level="warning",
        http="httptools",
        loop="none",
    )
    server = _Server(config)
    task_status.started(server)
    await server.serve()


async def serve_gateway(
    nats_url: str, config: Config, host: str, port: int, settings: LogSettings
) -> None:
    nc = await connect(nats_url, "jetrun-gateway")
    gateway = Gateway(nc, config, log_settings=settings)
    async with anyio.create_task_group() as tg:
        await tg.start(gateway.run)
        async with anyio.create_task_group() as http_tg:
            server = await http_tg.start(serve_http, gateway, host, port)
            log.info("gateway listening on http://%s:%d", host, port)
            await until_signalled()
            server.should_exit = True  # finish in-flight requests, then return
        tg.cancel_scope.cancel()
    await nc.close()


async def serve_scheduler(
    nats_url: str, config: Config, settings: LogSettings, *, health: Address | None = None
) -> None:
    nc = await connect(nats_url, "jetrun-scheduler")
    scheduler = Scheduler(nc, config, log_settings=settings)
    async with anyio.create_task_group() as tg:
        if health is not None:
            exposition = Exposition()
            add_scheduler(exposition, scheduler)
            app = health_app(exposition, scheduler_checks(scheduler))
            await tg.start(serve_health, app, *health)
        await tg.start(scheduler.run)
        log.info("scheduler running")
        await until_signalled()
        tg.cancel_scope.cancel()
    await nc.close()


async def serve_agent(
    nats_url: str,
    modules: list[str],
    slots: int,
    heartbeat_s: float,
    agent_id: str | None,
    settings: LogSettings,
    *,
    health: Address | None = None,
) -> None:
    nc = await connect(nats_url, "jetrun-agent")
    agent = Agent(
        nc,
        modules=modules,
        cpu_slots=slots,
        agent_id=agent_id,
        heartbeat_interval_s=heartbeat_s,
        log_settings=settings,
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
    await nc.close()
    if fenced:
        raise SystemExit(3)  # a supervisor restarts it under a new id


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


async def recall_agent(nats_url: str, agent_id: str, timeout: float) -> str:
    """Ask one agent to honour a preemption notice now; returns its answer."""
    nc = await connect(nats_url, "jetrun-recall")
    try:
        reply = await nc.request(f"{RECALL_SUBJECT}.{agent_id}", b"", timeout=timeout)
        return reply.data.decode()
    finally:
        await nc.close()


def agent_command(nats_url: str, modules: list[str], slots: int) -> list[str]:
    command = [sys.executable, "-m", "runtime.cli", "agent", "--nats", nats_url]
    command += ["--slots", str(slots), "--health-port", "0"]
    for module in modules:
        command += ["--pipelines", module]
    return command


async def serve_up(
    *,
    data_dir: Path,
    config: Config,
    host: str,
    port: int,
    nats_url: str | None,
    nats_port: int,
    modules: list[str],
    slots: int,
) -> None:
    """Everything on one machine; Ctrl-C stops it all. The data dir keeps the run history."""
    server: NatsServer | None = None
    if nats_url is None:
        server = NatsServer(store_dir=data_dir / "nats", port=nats_port)
        await server.start()
        nats_url = server.url
    settings = LogSettings()
    agent: subprocess.Popen[bytes] | None = None
    try:
        nc = await connect(nats_url, "jetrun-up")
        gateway = Gateway(nc, config, log_settings=settings)
        scheduler = Scheduler(nc, config, log_settings=settings)
        async with anyio.create_task_group() as tg:
            add_scheduler(gateway.telemetry.exposition, scheduler, alongside=gateway.telemetry)
            await tg.start(gateway.run)
            await tg.start(scheduler.run)
            async with anyio.create_task_group() as http_tg:
                http = await http_tg.start(serve_http, gateway, host, port)
                agent = subprocess.Popen(agent_command(nats_url, modules, slots))  # noqa: ASYNC220
                _banner(host, port, nats_url, data_dir if server else None, config)
                await until_signalled()
                print("\njetrun: shutting down", flush=True)
                http.should_exit = True
                _stop_child(agent)
                await anyio.to_thread.run_sync(agent.wait)
            tg.cancel_scope.cancel()
        await nc.close()
    finally:
        if agent is not None and agent.poll() is None:
            agent.kill()
        if server is not None:
            await server.stop()


def _stop_child(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)


_INPUTS = '{"type":"string","value":"my_input_string"},{"type":"integer","value":5}'


def _banner(host: str, port: int, nats_url: str, data_dir: Path | None, config: Config) -> None:
    url = f"http://{host}:{port}"
    token = DEMO_TOKEN if config.team_for_token(DEMO_TOKEN) else "<a token from your config>"
    where = f"embedded nats-server at {nats_url}, data in {data_dir}" if data_dir else nats_url
    print(
        f"""jetrun is up: {url}
  NATS:  {where}
  token: {token}
  try:   curl -X POST '{url}/v4/runs' \\
           --header 'Authorization: Bearer {token}' \\
           --header 'Content-Type: application/json' \\
           --data '{{"pipeline": "demo/echo:v1", "inputs": [{_INPUTS}]}}'
Ctrl-C stops everything.""",
        flush=True,
    )
