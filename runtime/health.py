"""What each service exposes over HTTP about itself: ``/metrics``, ``/healthz``, ``/readyz``.

The gateway serves these on its API port; the scheduler and each agent on a small port of their
own (``--health-port``). ``*_exposition`` functions wire a service's collectors together.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import uvicorn
from anyio.abc import TaskStatus
from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from contracts.api import Health
from runtime.infra.metrics import (
    CONTENT_TYPE,
    Exposition,
    FleetMetrics,
    NodeLosses,
    RunMetrics,
    http_histogram,
    refusals_counter,
)

if TYPE_CHECKING:
    from runtime.control.gateway import Gateway
    from runtime.control.scheduler import Scheduler
    from runtime.node.agent import Agent

log = logging.getLogger("jetrun.health")
Checks = Callable[[], dict[str, bool]]


def metrics_endpoint(exposition: Exposition) -> Callable[[Request], Any]:
    async def metrics(request: Request) -> Response:
        return Response(await exposition.render(), media_type=CONTENT_TYPE)

    return metrics


def health_response(checks: dict[str, bool]) -> Response:
    ok = all(checks.values())
    body = Health(status="ok" if ok else "unavailable", checks=checks)
    return Response(msgspec.json.encode(body), 200 if ok else 503, media_type="application/json")


def health_app(exposition: Exposition, checks: Checks) -> Starlette:
    async def healthz(request: Request) -> Response:
        return health_response({})

    async def readyz(request: Request) -> Response:
        return health_response(checks())

    return Starlette(
        routes=[
            Route("/metrics", metrics_endpoint(exposition), methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
        ]
    )


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the process owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


async def serve_health(
    app: Starlette,
    host: str,
    port: int,
    *,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``host:port`` (0: any free port) until cancelled; ``task_status``
    gets the port. Binding fails loudly (OSError naming the address)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise OSError(f"cannot serve /metrics on {host}:{port}: {err}") from err
    sock.listen(128)
    sock.setblocking(False)
    bound = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        lifespan="off",
        access_log=False,
        log_level="warning",
        log_config=None,  # its records go through jetrun's formatter (text or JSON)
        loop="none",
        http="httptools",
    )
    server = _Server(config)
    log.info("metrics and health on http://%s:%d", host, bound)
    task_status.started(bound)
    try:
        await server.serve(sockets=[sock])
    finally:
        sock.close()


# --- wiring ------------------------------------------------------------------------------------


@dataclass
class GatewayTelemetry:
    exposition: Exposition
    runs: RunMetrics
    refusals: Counter
    http: Histogram


def gateway_telemetry(gateway: Gateway) -> GatewayTelemetry:
    """Runs, queues, fleet, index lag, admission refusals by team, HTTP latency by route. Phase
    histograms are the scheduler's (``add_scheduler``)."""
    exposition = Exposition()
    runs = RunMetrics(gateway.index, caught_up=lambda: gateway.ready, phases=False)
    exposition.register(runs, refresh=lambda: runs.refresh_lag(gateway.log))
    exposition.register(FleetMetrics(gateway.fleet, runs))
    telemetry = GatewayTelemetry(exposition, runs, refusals_counter(), http_histogram())
    exposition.register(telemetry.refusals)
    exposition.register(telemetry.http)
    return telemetry


def add_scheduler(
    exposition: Exposition, scheduler: Scheduler, *, alongside: GatewayTelemetry | None = None
) -> None:
    """The scheduler's metrics. ``alongside`` a gateway in the same process (``jetrun up``),
    the gateway's run metrics (the same log) take the phase histograms instead."""
    if alongside is not None:
        alongside.runs.phases = True
    else:
        metrics = RunMetrics(scheduler.index, caught_up=lambda: scheduler.caught_up, phases=True)
        exposition.register(metrics, refresh=lambda: metrics.refresh_lag(scheduler.log))
        exposition.register(FleetMetrics(scheduler.fleet, metrics))
    exposition.register(NodeLosses(lambda: scheduler.statistics().lost_agents))
    from runtime.control.checkpoint_metrics import CheckpointMetrics  # (agents import this file)

    checkpoint = CheckpointMetrics(scheduler.views, scheduler.log)
    exposition.register(checkpoint, refresh=checkpoint.refresh)


def scheduler_checks(scheduler: Scheduler) -> Checks:
    return lambda: {
        "nats_connected": scheduler.nc.is_connected,
        "event_log_replayed": scheduler.caught_up,
    }


class AgentMetrics(Collector):
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterable[Metric]:
        slots = GaugeMetricFamily("jetrun_agent_slots", "Slots of this agent", labels=["kind"])
        for accelerator in self.agent.accelerators:
            slots.add_metric([accelerator.kind], accelerator.slots)
        waiting = self.agent.runner.cpu.statistics().tasks_waiting
        attempts = GaugeMetricFamily("jetrun_agent_attempts", "Attempts running on this agent")
        attempts.add_metric([], max(len(self.agent.attempts) - waiting, 0))
        queued = GaugeMetricFamily(
            "jetrun_agent_attempts_waiting", "Attempts dispatched here waiting for a CPU slot"
        )
        queued.add_metric([], waiting)
        pipelines = GaugeMetricFamily(
            "jetrun_agent_pipelines", "Pipelines of this agent", labels=["pipeline", "status"]
        )
        for pointer, pool in sorted(self.agent.pools.items()):
            pipelines.add_metric([pointer, pool.status.value], 1)
        draining = GaugeMetricFamily("jetrun_agent_draining", "1 while the agent takes no work")
        draining.add_metric([], int(self.agent.draining))
        yield from (slots, attempts, queued, pipelines, draining)


def agent_exposition(agent: Agent) -> Exposition:
    exposition = Exposition()
    exposition.register(AgentMetrics(agent))
    exposition.register(agent.cold_starts)
    return exposition


def agent_checks(agent: Agent) -> Checks:
    return lambda: {
        "nats_connected": agent.nc.is_connected,
        "serving": agent.serving,
        "not_draining": not agent.draining,
    }
