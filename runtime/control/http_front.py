"""The gateway's one ASGI layer, in front of Starlette.

Every request passes through ``Front`` once, which
- answers 503 ``starting`` (``Retry-After: 1``) on ``/v4/...`` until the gateway has caught up
  with the event log (``runtime.control.warming``); ``/healthz``, ``/readyz`` and ``/metrics``
  answer as usual;
- hands the two endpoints almost every request is for, ``POST /v4/runs`` and
  ``GET /v4/runs/{run_id}``, straight to their handlers, and answers whatever they raise as the
  gateway's exception handlers say (the JSON error shape; a bug is logged and answered 500);
  every other request goes through Starlette (its router, its handlers of the same errors);
- observes the request's duration in the latency histogram (route template, method, status);
- writes the access log line (``runtime.infra.accesslog``).

The gateway's HTTP protocol asks ``route`` before it starts a request: the two direct endpoints,
once ready, it hands to ``Front`` without ASGI (``runtime.infra.http_cycles``: the proxy
headers applied, the answer written in one write); ``__call__`` takes the same two the same way
when they come through ASGI (another server, the tests' ASGI transport).

One layer instead of five nested middlewares (access log, latency, readiness, Starlette's error
and exception middlewares) and the router: each of those wrapped ``send`` and added a coroutine
frame per request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Any

from prometheus_client import Histogram
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import Message, Receive, Scope, Send

from runtime.control.warming import starting_response
from runtime.infra import accesslog
from runtime.infra.http_cycles import Answer, DirectCall

log = logging.getLogger("jetrun.gateway")

Handler = Callable[[Request], Awaitable[Response]]
ErrorHandler = Callable[[Request, Exception], Awaitable[Response]]

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})  # else "other"
UNMATCHED = "unmatched"  # the route label of a request no route took
RUNS = "/v4/runs"
RUN = "/v4/runs/{run_id}"
_RUN_PREFIX = "/v4/runs/"


class Front:
    """``app``: Starlette with every route (``create`` and ``get`` among them, for what the
    direct dispatch does not take: ``HEAD``, a path with a trailing slash, ...); ``errors``: the
    exception handlers by class, looked up along the exception's MRO as Starlette does, one of
    them for ``Exception``."""

    def __init__(
        self,
        app: Starlette,
        *,
        create: Handler,
        get: Handler,
        errors: Mapping[type[BaseException], ErrorHandler],
        ready: Callable[[], bool],
        latency: Histogram,
    ) -> None:
        self.app = app
        self.create, self.get = create, get
        self.errors = dict(errors)
        self.fallback = self.errors[Exception]  # a bug, or an error handler that failed
        self.ready = ready
        self.latency = latency
        self._children: dict[tuple[str, str, int], Any] = {}  # histogram children by labels

    @property
    def routes(self) -> list[BaseRoute]:
        """Every route, those dispatched directly included (the OpenAPI document's check)."""
        return self.app.routes

    def route(self, method: str, path: str) -> DirectCall | None:
        """The direct call for a request to one of the two hot endpoints, once ready."""
        if path == RUNS:
            return self._create if method == "POST" and self.ready() else None
        if method == "GET" and path.startswith(_RUN_PREFIX) and _one_segment(path):
            return self._get if self.ready() else None
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        method: str = scope["method"]
        call = self.route(method, path)
        if call is not None:
            await call(scope, receive, partial(_asgi_answer, scope, receive, send))
            return
        started = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:  # what Starlette answers
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            if not self.ready() and path.startswith("/v4/"):
                response = starting_response()
                status = response.status_code
                await response(scope, receive, send)
            else:
                await self.app(scope, receive, sending)
        finally:
            elapsed = time.perf_counter() - started
            template = getattr(scope.get("route"), "path", None) or UNMATCHED
            self._observe(template, method, status, elapsed)
            accesslog.write(scope, status, elapsed)

    async def _create(self, scope: Scope, receive: Receive, answer: Answer) -> None:
        await self._direct(RUNS, self.create, scope, receive, answer)

    async def _get(self, scope: Scope, receive: Receive, answer: Answer) -> None:
        scope["path_params"] = {"run_id": scope["path"][len(_RUN_PREFIX) :]}
        await self._direct(RUN, self.get, scope, receive, answer)

    async def _direct(
        self, template: str, handler: Handler, scope: Scope, receive: Receive, answer: Answer
    ) -> None:
        started = time.perf_counter()
        status = 500
        try:
            request = Request(scope, receive)
            try:
                response = await handler(request)
            except Exception as exc:
                response = await self._answer(request, exc)
            status = response.status_code
            await answer(response)
        finally:
            elapsed = time.perf_counter() - started
            self._observe(template, scope["method"], status, elapsed)
            accesslog.write(scope, status, elapsed)

    async def _answer(self, request: Request, exc: Exception) -> Response:
        """What the handler for ``exc`` (along its MRO) answers; the handler of ``Exception``
        answers a handler that failed itself."""
        handler = next((h for c in type(exc).__mro__ if (h := self.errors.get(c))), None)
        try:
            return await (handler or self.fallback)(request, exc)
        except Exception as failed:
            return await self.fallback(request, failed)
        finally:
            exc.__traceback__ = None  # a kept exception instance must not grow a traceback

    def _observe(self, template: str, method: str, status: int, elapsed: float) -> None:
        key = (template, method if method in METHODS else "other", status)
        child = self._children.get(key)
        if child is None:  # bounded: the routes x METHODS and "other" x the statuses answered
            child = self._children[key] = self.latency.labels(key[0], key[1], str(status))
        child.observe(elapsed)


async def _asgi_answer(scope: Scope, receive: Receive, send: Send, response: Response) -> None:
    await response(scope, receive, send)


def _one_segment(path: str) -> bool:
    """``/v4/runs/<id>`` with a non-empty id and no further ``/`` (Starlette's ``{run_id}``)."""
    return len(path) > len(_RUN_PREFIX) and "/" not in path[len(_RUN_PREFIX) :]
