"""A per-team cap on the streaming responses one gateway process holds open.

A followed log (``GET /v4/runs/{id}/logs?follow=1``) or a streamed run (``POST
/v4/runs/stream``) keeps its connection busy until the run ends, and a busy connection is never
evicted by the connection cap (``runtime.infra.http_server``). Without a share per team, one tenant
could open a stream per connection the gateway has, on a run that waits, and every other team's
requests would be refused. ``settings.max_streams_per_team`` streams may be open per team and
gateway process; past that a request is answered ``429 too_many_streams`` (``Retry-After``),
before anything is recorded.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from contracts.api import ErrorDetail
from runtime.control.http_input import HTTPError

Release = Callable[[], None]


class StreamQuota:
    def __init__(self, per_team: int) -> None:
        self.per_team = per_team
        self.open: Counter[str] = Counter()

    def acquire(self, team: str) -> Release:
        """Count one more open stream for ``team``; 429 over its share. Call the returned
        function exactly once (``hold`` does it when the response ends)."""
        if self.open[team] >= self.per_team:
            message = (
                f"team {team} already holds {self.open[team]} open streams on this gateway "
                f"(the limit is {self.per_team}); close one, or poll instead"
            )
            detail = ErrorDetail(code="too_many_streams", message=message)
            raise HTTPError(429, detail, {"Retry-After": "5"})
        self.open[team] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.open[team] -= 1
                if self.open[team] <= 0:
                    del self.open[team]

        return release


class Held(Response):
    """``response``, and ``release`` once it has ended (finished, failed or disconnected)."""

    def __init__(self, response: Response, release: Release) -> None:  # no super().__init__
        self.response, self.release = response, release
        self.status_code = response.status_code

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.response(scope, receive, send)
        finally:
            self.release()
