"""The gateway's operator endpoints: liveness, readiness, metrics, the OpenAPI document and its
page, and the dashboard. None of them touches a run; ``/readyz`` asks NATS, the rest read what
the gateway already holds."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.responses import HTMLResponse, Response

from contracts.api import Health
from runtime.control import dashboard, openapi
from runtime.control.http_input import error, json_response
from runtime.infra.metrics import CONTENT_TYPE as metrics_content_type

if TYPE_CHECKING:
    from starlette.requests import Request

    from runtime.control.gateway import Gateway


class OpsApi:
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway

    def is_admin(self, request: Request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and self.gw.config.is_admin(token.strip())

    async def healthz(self, request: Request) -> Response:
        return json_response(Health(status="ok"))

    async def readyz(self, request: Request) -> Response:
        checks = await self.gw.readiness.checks()
        ok = all(checks.values())
        return json_response(
            Health(status="ok" if ok else "unavailable", checks=checks), 200 if ok else 503
        )

    async def metrics(self, request: Request) -> Response:
        """Prometheus metrics: every team's counts, so for admin tokens only."""
        if not self.is_admin(request):
            self.gw._team(request)  # 401 without a known token
            raise error(403, "forbidden", "metrics need an admin token ([admin] tokens)")
        body = await self.gw.telemetry.exposition.render()
        return Response(body, media_type=metrics_content_type)

    async def openapi(self, request: Request) -> Response:
        return json_response(openapi.document())

    async def docs(self, request: Request) -> Response:
        return HTMLResponse(openapi.DOCS_HTML)

    async def dashboard_page(self, request: Request) -> Response:
        return HTMLResponse(dashboard.PAGE_HTML)

    async def dashboard(self, request: Request) -> Response:
        """The team's dashboard; every team's for an admin token."""
        gw = self.gw
        team = None if self.is_admin(request) else gw._team(request).name
        logs = "/v4/runs/{run_id}/logs"
        view = dashboard.snapshot(
            team=team,
            teams=sorted(gw.config.teams),
            index=gw.index,
            listing=gw.listing,
            fleet=gw.fleet,
            runs=gw.telemetry.runs,
            now=gw.clock.now(),
            logs_url=logs if logs in gw.paths else None,
            scaling=[  # a pipeline's scaling history is its own team's (and operators')
                e
                for e in reversed(gw.scaling_api.recent)
                if team is None or (e.pipeline and gw.scaling_api.manages(team, e.pipeline))
            ],
        )
        return json_response(view)
