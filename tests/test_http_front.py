"""The gateway's front layer (``runtime.control.http_front``) on its own: no NATS, handlers that
raise what the gateway's raise. It must answer every failure in the JSON error shape (never a
bare 500), write one access line per request and observe its latency under the route template,
for the requests it dispatches itself and for those Starlette routes alike. Every test runs
twice: through ASGI (httpx's ASGI transport) and through the gateway's HTTP protocol on a real
loopback socket, which answers the two hot endpoints directly (``runtime.infra.http_cycles``)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import nats.errors
import pytest
from prometheus_client import CollectorRegistry, Histogram
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from runtime.control.http_front import Front
from runtime.control.http_input import (
    HTTPError,
    error,
    error_response,
    json_response,
    on_http_exception,
    on_unexpected,
)
from runtime.infra.config import Settings
from runtime.infra.http_server import protocol_for
from tests.http_serving import serving as on_loopback

pytestmark = pytest.mark.anyio


class App:
    def __init__(self) -> None:
        self.ready = True
        self.fail: Exception | None = None
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "http_seconds", "latency", ["route", "method", "status"], registry=self.registry
        )

    async def create(self, request: Request) -> Response:
        if self.fail is not None:
            raise self.fail
        request.state.team = "acme"
        return json_response({"created": (await request.body()).decode()}, 202)

    async def get(self, request: Request) -> Response:
        if self.fail is not None:
            raise self.fail
        return json_response({"id": request.path_params["run_id"]})

    async def other(self, request: Request) -> Response:
        if self.fail is not None:
            raise self.fail
        return json_response({"other": True})

    async def nats_down(self, request: Request, exc: Exception) -> Response:
        return error_response(error(503, "event_log_unavailable", "down"))

    async def broken(self, request: Request, exc: Exception) -> Response:
        raise RuntimeError("an error handler that fails")

    def front(self) -> Front:
        async def refused(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, HTTPError)
            return error_response(exc)

        handlers: dict[Any, Any] = {
            HTTPError: refused,
            HTTPException: on_http_exception,
            nats.errors.Error: self.nats_down,
            KeyError: self.broken,
            Exception: on_unexpected,
        }
        routes = [
            Route("/v4/runs", self.create, methods=["POST"]),
            Route("/v4/runs/{run_id}", self.get, methods=["GET"]),
            Route("/v4/other", self.other, methods=["GET"]),
        ]
        return Front(
            Starlette(routes=routes, exception_handlers=handlers),
            create=self.create,
            get=self.get,
            errors=handlers,
            ready=lambda: self.ready,
            latency=self.latency,
        )

    def count(self, route: str, method: str, status: str) -> float:
        labels = {"route": route, "method": method, "status": status}
        return self.registry.get_sample_value("http_seconds_count", labels) or 0.0


@pytest.fixture
async def app() -> App:
    return App()


@pytest.fixture(params=["asgi", "direct"])
async def http(app: App, request: pytest.FixtureRequest) -> AsyncIterator[httpx.AsyncClient]:
    front = app.front()
    if request.param == "asgi":
        transport = httpx.ASGITransport(app=front, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            yield client
        return
    async with serving(front) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        yield client


@contextlib.asynccontextmanager
async def serving(front: Front) -> AsyncIterator[str]:
    """``front`` served on loopback by the gateway's protocol, as ``jetrun`` serves it."""
    async with on_loopback(front, protocol_for(Settings(), direct=front)) as port:
        yield f"http://127.0.0.1:{port}"


def access_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "jetrun.access"]


async def test_direct_routes_answer_log_and_observe(
    app: App, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "jetrun.access")
    created = await http.post("/v4/runs", content=b"body")
    assert (created.status_code, created.json()) == (202, {"created": "body"})
    got = await http.get("/v4/runs/run_1")
    assert (got.status_code, got.json()) == (200, {"id": "run_1"})
    assert (await http.get("/v4/other")).status_code == 200
    assert app.count("/v4/runs", "POST", "202") == 1
    assert app.count("/v4/runs/{run_id}", "GET", "200") == 1
    assert app.count("/v4/other", "GET", "200") == 1
    post, get, other = access_lines(caplog)
    assert post.getMessage() == "POST /v4/runs 202"
    fields = {k: getattr(post, k) for k in ("method", "path", "status", "team")}
    assert fields == {"method": "POST", "path": "/v4/runs", "status": 202, "team": "acme"}
    assert post.client.startswith("127.0.0.1:")  # type: ignore[attr-defined]
    assert post.duration_ms >= 0  # type: ignore[attr-defined]
    assert get.getMessage() == "GET /v4/runs/run_1 200" and get.team is None  # type: ignore[attr-defined]
    assert other.getMessage() == "GET /v4/other 200"


@pytest.mark.parametrize("path", ["/v4/runs", "/v4/runs/run_1", "/v4/other"])
async def test_every_failure_is_a_json_error(
    app: App, http: httpx.AsyncClient, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    method = "POST" if path == "/v4/runs" else "GET"
    app.fail = error(429, "rate_limited", "slow down")
    app.fail.headers["Retry-After"] = "2"
    limited = await http.request(method, path)
    assert limited.status_code == 429 and limited.headers["retry-after"] == "2"
    assert limited.json()["detail"]["code"] == "rate_limited"

    app.fail = nats.errors.NoServersError()
    down = await http.request(method, path)
    assert (down.status_code, down.json()["detail"]["code"]) == (503, "event_log_unavailable")

    app.fail = ZeroDivisionError("a bug")
    bug = await http.request(method, path)
    assert bug.status_code == 500
    assert bug.json()["detail"]["code"] == "internal_error"
    assert any(r.levelno == logging.ERROR and r.exc_info for r in caplog.records)
    statuses = [r.status for r in access_lines(caplog)]  # type: ignore[attr-defined]
    assert statuses == [429, 503, 500]
    route = {"/v4/runs/run_1": "/v4/runs/{run_id}"}.get(path, path)
    assert [app.count(route, method, s) for s in ("429", "503", "500")] == [1, 1, 1]


async def test_api_says_starting_until_ready(app: App, http: httpx.AsyncClient) -> None:
    app.ready = False
    for method, path in (("POST", "/v4/runs"), ("GET", "/v4/runs/x"), ("GET", "/v4/other")):
        answer = await http.request(method, path)
        assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
        assert answer.json()["detail"]["code"] == "starting"
    assert app.count("unmatched", "POST", "503") == 1
    assert (await http.get("/nope")).status_code == 404  # not the API: not held back
    app.ready = True
    assert (await http.post("/v4/runs")).status_code == 202


async def test_what_the_direct_dispatch_leaves_to_the_router(
    app: App, http: httpx.AsyncClient
) -> None:
    wrong = await http.put("/v4/runs")
    assert wrong.status_code == 405 and wrong.json()["detail"]["code"] == "method_not_allowed"
    deeper = await http.get("/v4/runs/a/b")
    assert deeper.status_code == 404 and deeper.json()["detail"]["code"] == "not_found"
    assert (await http.get("/v4/runs/")).status_code in (307, 404)  # Starlette's own answer
    head = await http.head("/v4/runs/run_2")  # Starlette answers HEAD for a GET route
    assert head.status_code == 200
    assert app.count("/v4/runs/{run_id}", "HEAD", "200") == 1
    odd = ("PROPFIND", "MKCOL", "LOCK", "UNLOCK", "PURGE")  # methods HTTP parsers know
    for i, method in enumerate(odd):  # odd methods and paths make no new label values
        assert (await http.request(method, f"/no/such/{i}")).status_code == 404
    assert app.count("unmatched", "other", "404") == 5


async def test_an_error_handler_that_fails_is_answered_as_a_bug(
    app: App, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    app.fail = KeyError("x")
    for method, path in (("POST", "/v4/runs"), ("GET", "/v4/runs/run_1")):
        answer = await http.request(method, path)
        assert answer.status_code == 500
        assert answer.json()["detail"]["code"] == "internal_error"
    assert app.count("/v4/runs", "POST", "500") == 1
