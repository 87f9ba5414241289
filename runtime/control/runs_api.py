"""The v4 run endpoints of the gateway (``POST /v4/runs``, ``GET /v4/runs``, ``GET
/v4/runs/{id}``, ``.../cancel``, ``.../logs``, ``POST /v4/runs/stream``) and what they share:
the bearer token and its rate limit, the body, which runs a team may see, the answer's shape."""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import TYPE_CHECKING

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from contracts.api import RunCreate, RunList
from contracts.events import Event, RunCancelRequested
from contracts.run import Run, RunRecord, RunUpdate
from contracts.states import RunState
from runtime.control.http_input import error, header, json_response, parse_create, read_body
from runtime.control.listing import BadQuery, RunListing, parse_query
from runtime.control.logs_api import follow_logs, read_logs, stream_filter, wants_follow
from runtime.control.ratelimit import RateLimiter
from runtime.control.streamquota import Held, StreamQuota
from runtime.control.submit import Refused, Submitter, Until
from runtime.control.views import RunViews, find_run
from runtime.control.webhook_policy import DestinationRefused, check_callback_url
from runtime.infra.clock import Clock
from runtime.infra.config import Config, Team, token_digest
from runtime.infra.eventlog import EventLog
from runtime.infra.projection import RunIndex
from runtime.infra.runlogs import LogStore

if TYPE_CHECKING:
    from runtime.health import GatewayTelemetry

log = logging.getLogger("jetrun.gateway")

_encoder = msgspec.json.Encoder()


class RunsApi:
    """A base class of ``Gateway``: these handlers use the gateway's state, declared here."""

    config: Config
    clock: Clock
    log: EventLog
    index: RunIndex
    views: RunViews
    listing: RunListing
    logs: LogStore
    limiter: RateLimiter
    submitter: Submitter
    streams: StreamQuota
    telemetry: GatewayTelemetry

    # --- helpers -----------------------------------------------------------------------------

    def _team(self, request: Request) -> Team:
        scheme, _, token = (header(request, b"authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise error(
                401, "unauthorized", "missing bearer token: send Authorization: Bearer <token>"
            )
        digest = token_digest(token.strip())  # hashed once: the lookup and the rate limit
        team = self.config.team_for_digest(digest)
        if team is None:
            raise error(401, "unauthorized", "unknown token")
        request.scope.setdefault("state", {})["team"] = team.name  # for the access log
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
        sync = not create.async_run
        settings = self.config.settings
        until = (_ended, settings.sync_wait_s) if sync else (_placed, settings.settle_s)
        run = await self._submit(team, create, header(request, b"idempotency-key"), until)
        return self._respond(run, sync=sync)

    async def _submit(
        self, team: Team, create: RunCreate, key: str | None, until: Until | None = None
    ) -> RunRecord:
        try:
            return await self.submitter.submit(team, create, key, until)
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
            run = await self._submit(team, create, header(request, b"idempotency-key"))
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


def _ended(run: RunRecord) -> bool:
    return run.is_terminal
