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
import math
from collections.abc import AsyncIterator, Callable
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
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from contracts.api import (
    RunCreate,
    RunList,
)
from contracts.events import AnyEvent, Event, RunCancelRequested
from contracts.run import Run, RunRecord, RunUpdate
from contracts.states import RunState
from runtime import health
from runtime.control.admission import Admission
from runtime.control.http_input import (
    HTTPError,
    error,
    error_response,
    json_response,
    on_http_exception,
    on_unexpected,
    parse_create,
    read_body,
)
from runtime.control.listing import BadQuery, RunListing, parse_query
from runtime.control.logfeed import LogFeed
from runtime.control.logs_api import follow_logs, read_logs, stream_filter, wants_follow
from runtime.control.ops_api import OpsApi
from runtime.control.ratelimit import RateLimiter
from runtime.control.readiness import Readiness, SchedulerWatch
from runtime.control.scaling_api import ScalingApi
from runtime.control.streamquota import Held, StreamQuota
from runtime.control.submissions import SubmissionService
from runtime.control.submit import Refused, Submitter
from runtime.control.views import RunViews, find_run, forget_loop
from runtime.control.warming import UntilReady
from runtime.control.webhook_policy import DestinationRefused, check_callback_url
from runtime.infra.accesslog import AccessLog
from runtime.infra.catalog import Catalog
from runtime.infra.clock import SYSTEM_CLOCK, Clock
from runtime.infra.config import Config, Team, token_digest
from runtime.infra.eventlog import EventLog, LogSettings
from runtime.infra.fleet import HEARTBEAT_SUBJECT, Fleet, decode_heartbeat
from runtime.infra.guard import Guard
from runtime.infra.projection import RunIndex
from runtime.infra.runlogs import LogStore
from runtime.infra.streamsetup import require_all

log = logging.getLogger("jetrun.gateway")

_encoder = msgspec.json.Encoder()


class Gateway:
    def __init__(
        self,
        nc: Client,
        config: Config,
        *,
        clock: Clock = SYSTEM_CLOCK,
        log_settings: LogSettings | None = None,
        feed: LogFeed | None = None,
    ) -> None:
        """``feed``: a log tail shared with other readers in this process (``jetrun up``);
        by default the gateway has its own."""
        self.nc = nc
        self.config = config
        self.clock = clock
        settings = dataclasses.replace(
            log_settings or LogSettings(),
            append_deadline_s=config.settings.request_deadline_s,
        )
        self.log = EventLog(nc, settings)
        self.index = RunIndex()
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
        tail = self.guard.wrap
        self.feed.join(
            self.index,
            tail("event-log tail", self._on_event),
            tail("event-log tail", self._on_skipped),
        )

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

    async def _on_event(self, seq: int, event: AnyEvent) -> None:
        self.index.apply(seq, event)

    async def _on_skipped(self, seq: int) -> None:
        self.index.skip(seq)

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            self.fleet.observe(decode_heartbeat(msg.subject, msg.data))
        except msgspec.MsgspecError:
            log.warning("undecodable heartbeat on %s", msg.subject)

    def app(self) -> Starlette:
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
        latency = Middleware(health.HttpLatency, histogram=self.telemetry.http)
        access = Middleware(AccessLog)
        warming = Middleware(UntilReady, ready=lambda: self.ready)
        middleware = [access, latency, warming]
        return Starlette(routes=routes, exception_handlers=handlers, middleware=middleware)

    async def _on_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPError | Refused)
        return error_response(exc)

    async def _on_nats_error(self, request: Request, exc: Exception) -> Response:
        """NATS stayed unreachable for the request's deadline: nothing was recorded."""
        log.warning("%s %s: NATS unavailable: %r", request.method, request.url.path, exc)
        unavailable = error(503, "event_log_unavailable", "the event log is unavailable; retry")
        return await self._on_error(request, unavailable)

    # --- helpers -----------------------------------------------------------------------------

    def _team(self, request: Request) -> Team:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise error(
                401, "unauthorized", "missing bearer token: send Authorization: Bearer <token>"
            )
        digest = token_digest(token.strip())  # hashed once: the lookup and the rate limit
        team = self.config.team_for_digest(digest)
        if team is None:
            raise error(401, "unauthorized", "unknown token")
        request.state.team = team.name  # for the access log
        wait = self.limiter.check(digest, self.clock.monotonic())
        if wait > 0:
            limit = self.config.settings.rate_limit_per_s
            limited = error(429, "rate_limited", f"over {limit:g} requests/s for this token")
            limited.headers["Retry-After"] = str(max(1, math.ceil(wait)))
            raise limited
        return team

    async def _parse(self, request: Request) -> RunCreate:
        return self.parse_body(await read_body(request, self.config.settings.max_body_bytes))

    def parse_body(self, body: bytes) -> RunCreate:
        """A run request's body, decoded and checked (HTTP and NATS submissions alike)."""
        create = parse_create(body)
        if create.callback_url is not None:
            try:
                check_callback_url(create.callback_url, self.config.webhooks)
            except DestinationRefused as err:
                raise error(422, "invalid_field", str(err), "callback_url") from None
        return create

    async def _stored(self, run_id: str) -> RunRecord | None:
        """A run this gateway's index does not hold: ended long ago, or too new to be here."""
        return await find_run(self.log, self.views, run_id)

    async def _visible(self, run_id: str, team: Team) -> RunRecord:
        run = self.index.get(run_id) or await self._stored(run_id)
        if run is None or run.team != team.name:
            raise error(404, "run_not_found", f"run {run_id} not found")
        return run

    def view(self, run: RunRecord) -> Run:
        return Run.of(run, self.index.queue_position(run.id))

    def _respond(self, run: RunRecord, *, sync: bool) -> Response:
        if sync and run.state is RunState.no_resources_available:
            return json_response(self.view(run), 503)
        if sync and run.is_terminal:
            return json_response(self.view(run), 200)
        return json_response(self.view(run), 202, {"Location": f"/v4/runs/{run.id}"})

    # --- endpoints ---------------------------------------------------------------------------

    async def create_run(self, request: Request) -> Response:
        team = self._team(request)
        create = await self._parse(request)
        run = await self._submit(team, create, request.headers.get("idempotency-key"))
        sync = not create.async_run
        if sync:
            run = await self._wait(
                run.id, lambda r: r.is_terminal, self.config.settings.sync_wait_s
            )
        else:
            run = await self._wait(run.id, _placed, self.config.settings.settle_s)
        return self._respond(run, sync=sync)

    async def _submit(self, team: Team, create: RunCreate, key: str | None) -> RunRecord:
        try:
            return await self.submitter.submit(team, create, key)
        except Refused as refusal:
            if refusal.status == 429:
                self.telemetry.refusals.labels(team.name).inc()
            raise

    async def _record(self, event: Event) -> int:
        """Append ``event`` (a cancel request: retrying it is safe); 503 if the log stays
        unreachable, which does not claim that nothing was stored."""
        try:
            return (await self.log.append(event)).seq
        except Exception as err:
            log.warning("could not record %s of %s: %r", event.kind, event.run_id, err)
            raise error(
                503,
                "event_log_unavailable",
                f"the event log did not confirm the {event.kind} event; retrying is safe",
            ) from err

    async def _wait(
        self, run_id: str, done: Callable[[RunRecord], bool], timeout: float
    ) -> RunRecord:
        run = await self.index.wait_until(run_id, done, timeout)
        if run is None:  # an ended run this index no longer holds (an idempotent retry)
            run = await self._stored(run_id)
        if run is None:
            raise error(503, "event_log_lagging", f"run {run_id} is not visible here yet")
        return run

    async def get_run(self, request: Request) -> Response:
        team = self._team(request)
        run = await self._visible(request.path_params["run_id"], team)
        return json_response(self.view(run))

    async def list_runs(self, request: Request) -> Response:
        team = self._team(request)
        params = request.query_params
        try:
            query = parse_query({k: params.getlist(k) for k in params})
        except BadQuery as bad:
            raise error(422, "invalid_field", str(bad), bad.field) from None
        runs, cursor = await self.listing.page(team.name, query)
        return json_response(RunList(runs=[self.view(r) for r in runs], next_cursor=cursor))

    async def run_logs(self, request: Request) -> Response:
        """What the run's pipeline printed, per attempt; ``?follow=1`` streams it."""
        team = self._team(request)
        run = await self._visible(request.path_params["run_id"], team)
        stream = stream_filter(request)
        if wants_follow(request):
            release = await self.streams.acquire(team.name)
            current = partial(self.index.get, run.id)
            response = follow_logs(self.logs, request, run.id, current, stream)
            return Held(response, release)
        return json_response(await read_logs(self.logs, run, stream))

    async def cancel_run(self, request: Request) -> Response:
        team = self._team(request)
        run = await self._visible(request.path_params["run_id"], team)
        if run.is_terminal:
            raise error(409, "not_cancellable", f"run {run.id} is already {run.state}")
        seq = await self._record(RunCancelRequested(run_id=run.id, at=self.clock.now()))
        await self.index.wait_for_seq(seq, timeout=10.0)
        run = await self._wait(run.id, lambda r: r.is_terminal, 10.0)
        return json_response(self.view(run), 200 if run.is_terminal else 202)

    async def stream_run(self, request: Request) -> Response:
        """NDJSON: the run once now, then after every change, until it is terminal. Each line
        carries only the outputs new since the previous line (``RunUpdate``), so a run that
        streams n outputs costs O(n) bytes, not O(n^2)."""
        team = self._team(request)
        create = await self._parse(request)
        release = await self.streams.acquire(team.name)  # before the run is recorded
        try:
            run = await self._submit(team, create, request.headers.get("idempotency-key"))
        except BaseException:
            await release()
            raise

        async def lines() -> AsyncIterator[bytes]:
            seen: RunRecord | None = None
            sent = 0  # outputs of the current attempt already sent
            while seen is None or not seen.is_terminal:
                last = seen

                def changed(r: RunRecord, last: RunRecord | None = last) -> bool:
                    return r is not last

                current = await self._wait(run.id, changed, 30.0)
                if current is not last:
                    if last is not None and current.attempt != last.attempt:
                        sent = 0  # requeued: the next attempt's outputs start again at 0
                    sent = min(sent, len(current.outputs))
                    position = self.index.queue_position(current.id)
                    line = RunUpdate.of_update(current, position, sent)
                    sent += len(line.outputs)
                    seen = current
                    yield _encoder.encode(line) + b"\n"

        return Held(StreamingResponse(lines(), media_type="application/x-ndjson"), release)


def _placed(run: RunRecord) -> bool:
    return run.state not in (RunState.created, RunState.routing)
