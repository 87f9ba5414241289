"""While a gateway catches up with the event log its HTTP port already answers: the API says
503 ``starting`` (with ``Retry-After``), and /healthz, /readyz and /metrics answer as usual, so a
load balancer sees a process that is up and not yet ready instead of a closed port."""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from runtime.control.http_input import error, error_response


class UntilReady:
    """ASGI middleware: 503 for ``/v4/...`` until ``ready()``."""

    def __init__(self, app: ASGIApp, ready: Callable[[], bool]) -> None:
        self.app = app
        self.ready = ready

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v4/") and not self.ready():
            refusal = error(503, "starting", "this gateway is catching up with the event log")
            response = error_response(refusal)
            response.headers["Retry-After"] = "1"
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
