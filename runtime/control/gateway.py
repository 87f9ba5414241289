"""The HTTP gateway: the Mystic-compatible v4 API.

Stateless apart from a ``RunIndex`` it tails from the event log, so any number of gateway
processes can serve the same runs. A POST is admitted and recorded by ``runtime.control.submit``
(one append: a ``RunSubmitted`` carrying its admission), then waits in the index (sync: for a
terminal state; async: until the run is placed). Reads never touch NATS: they come from the
index, queue positions included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from functools import partial
from typing import Any

import anyio
import msgspec
import nats.errors
from anyio.abc import TaskStatus
from nats.aio.client import Client
from nats.aio.msg import Msg
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from runtime import health
from runtime.control.admission import Admission
from runtime.control.http_front import Front
from runtime.control.http_input import (
    HTTPError,
    error,
    error_response,
    on_http_exception,
    on_unexpected,
)
from runtime.control.listing import RunListing
from runtime.control.logfeed import LogFeed
from runtime.control.ops_api import OpsApi
from runtime.control.ratelimit import RateLimiter
from runtime.control.readiness import Readiness, SchedulerWatch
from runtime.control.runs_api import RunsApi
from runtime.control.scaling_api import ScalingApi
from runtime.control.streamquota import StreamQuota
from runtime.control.submissions import SubmissionService
from runtime.control.submit import Refused, Submitter
from runtime.control.views import RunViews, find_run, forget_loop
from runtime.infra.catalog import Catalog
from runtime.infra.clock import SYSTEM_CLOCK, Clock
from runtime.infra.config import Config
from runtime.infra.eventlog import EventLog, LogSettings
from runtime.infra.fleet import HEARTBEAT_SUBJECT, Fleet, decode_heartbeat
from runtime.infra.guard import Guard
from runtime.infra.projection import RunIndex
from runtime.infra.runlogs import LogStore
from runtime.infra.streamsetup import require_all

log = logging.getLogger("jetrun.gateway")

_encoder = msgspec.json.Encoder()


class Gateway(RunsApi):
    def __init__(
        self,
        nc: Client,
        config: Config,
        *,
        clock: Clock = SYSTEM_CLOCK,
        log_settings: LogSettings | None = None,
        feed: LogFeed | None = None,
        index: RunIndex | None = None,
    ) -> None:
        """``feed``: a log tail shared with other readers in this process (``jetrun up``);
        by default the gateway has its own. ``index``: a run index shared with the scheduler
        beside it (``jetrun up``: each event applied once), which then forgets ended runs
        (once their views are stored and listed); by default the gateway has its own and
        forgets ended runs ``keep_ended_s`` after they ended."""
        self.nc = nc
        self.config = config
        self.clock = clock
        settings = dataclasses.replace(
            log_settings or LogSettings(),
            append_deadline_s=config.settings.request_deadline_s,
        )
        self.log = EventLog(nc, settings)
        self.index = index if index is not None else RunIndex()
        self._forgets = index is None
        self.views = RunViews(self.log.js, replicas=settings.replicas)
        self.listing = RunListing(
            self.index, self.views.history, partial(find_run, self.log, self.views)
        )
        self.catalog = Catalog(self.log.js, replicas=settings.replicas)
        self.logs = LogStore(self.log.js, settings)
        self.fleet = Fleet(clock.monotonic, config.settings.node_loss_timeout_s)
        self.limiter = RateLimiter(
            config.settings.rate_limit_per_s, config.settings.rate_limit_burst
        )
        self.admission = Admission.for_config(
            self.log.js,
            config,
            replicas=settings.replicas,
            lookup=self.index.get,
            deadline_s=config.settings.request_deadline_s,
        )
        self.submitter = Submitter(
            self.log, self.index, self.catalog, self.admission, config, clock, self._stored
        )
        self.submissions = SubmissionService(
            nc,
            authenticate=config.team_for_token,
            parse=self.parse_body,
            submit=self._submit,
            view=self.view,
        )
        self.ready = False
        self.guard = Guard("gateway")
        self.scheduler = SchedulerWatch(clock.monotonic, config.settings.node_loss_timeout_s)
        self.readiness = Readiness(
            nc, self.log.js, self.scheduler, replayed=lambda: self.ready, replicas=settings.replicas
        )
        self.telemetry = health.gateway_telemetry(self)
        self.paths: set[str] = set()
        self.scaling_api = ScalingApi(self)
        self.ops = OpsApi(self)
        self.streams = StreamQuota(
            self.log.js, config.settings.max_streams_per_team, replicas=settings.replicas
        )
        self.feed = feed or LogFeed(self.log, self.views)
        self.feed.confirm_appends(self.log)  # its tail shows what it appends
        self.feed.join_guarded(self.index, self.guard)

    # --- lifecycle ---------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Create the streams if needed, replay the log into the index, then follow it."""
        parts = (self.log, self.catalog, self.admission, self.readiness, self.logs, self.views)
        await require_all(self.streams, *parts)
        position = await self.feed.start()
        guard = self.guard.wrap
        beats = await self.nc.subscribe(
            f"{HEARTBEAT_SUBJECT}.*", cb=guard("agent heartbeat handler", self._on_heartbeat)
        )
        scheduler_beats = await self.scheduler.subscribe(self.nc, self.guard)
        await self.scaling_api.start()
        try:
            deadline = self.config.settings.replay_deadline_s
            await self.index.catch_up(position.target, timeout=deadline)
            async with anyio.create_task_group() as tg:
                await tg.start(self.submissions.run)  # jetrun.submit: NATS submissions
                if self._forgets:
                    keep = self.config.settings.keep_ended_s
                    tg.start_soon(forget_loop, self.index, self.clock, keep)
                tg.start_soon(self.streams.renew_loop)  # slots of this gateway's open streams
                self.ready = True
                task_status.started()
                await self.guard.watch()  # until cancelled, or a callback failed
        finally:
            self.ready = False
            with anyio.CancelScope(shield=True):
                await self.scaling_api.stop()
                await self.feed.leave()
                for sub in (beats, scheduler_beats):
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            self.fleet.observe(decode_heartbeat(msg.subject, msg.data))
        except msgspec.MsgspecError:
            log.warning("undecodable heartbeat on %s", msg.subject)

    def app(self) -> Front:
        """The HTTP API: Starlette's routes behind the gateway's one front layer."""
        ops = self.ops
        routes = [
            Route("/v4/runs", self.create_run, methods=["POST"]),
            Route("/v4/runs", self.list_runs, methods=["GET"]),
            Route("/v4/runs/stream", self.stream_run, methods=["POST"]),
            Route("/v4/runs/{run_id}", self.get_run, methods=["GET"]),
            Route("/v4/runs/{run_id}/cancel", self.cancel_run, methods=["POST"]),
            Route("/v4/runs/{run_id}/logs", self.run_logs, methods=["GET"]),
            Route("/v4/pipelines/{pointer:path}/scaling", self.scaling_api.get, methods=["GET"]),
            Route(
                "/v4/pipelines/{pointer:path}/scaling", self.scaling_api.patch, methods=["PATCH"]
            ),
            Route(
                "/v4/pipelines/{pointer:path}/scaling/history",
                self.scaling_api.history,
                methods=["GET"],
            ),
            Route("/healthz", ops.healthz, methods=["GET"]),
            Route("/readyz", ops.readyz, methods=["GET"]),
            Route("/openapi.json", ops.openapi, methods=["GET"]),
            Route("/docs", ops.docs, methods=["GET"]),
            Route("/metrics", ops.metrics, methods=["GET"]),
            Route("/dashboard", ops.dashboard_page, methods=["GET"]),
            Route("/v4/dashboard", ops.dashboard, methods=["GET"]),
        ]
        self.paths = {route.path for route in routes}
        handlers: dict[Any, Any] = {
            HTTPError: self._on_error,
            Refused: self._on_error,
            HTTPException: on_http_exception,
            nats.errors.Error: self._on_nats_error,
            TimeoutError: self._on_nats_error,
            Exception: on_unexpected,
        }
        return Front(
            Starlette(routes=routes, exception_handlers=handlers),
            create=self.create_run,
            get=self.get_run,
            errors=handlers,
            ready=lambda: self.ready,
            latency=self.telemetry.http,
        )

    async def _on_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPError | Refused)
        return error_response(exc)

    async def _on_nats_error(self, request: Request, exc: Exception) -> Response:
        """NATS stayed unreachable for the request's deadline: nothing was recorded."""
        log.warning("%s %s: NATS unavailable: %r", request.method, request.url.path, exc)
        unavailable = error(503, "event_log_unavailable", "the event log is unavailable; retry")
        return await self._on_error(request, unavailable)
