"""CPU per request of the gateway's HTTP layer alone, in one process: no NATS, no sockets.

    python benchmarks/bench_http.py [--requests 20000] [--rounds 3] [--connections 1] [--asgi]
                                    [--tree DIR]

The gateway's protocol (``runtime.infra.http_server.protocol_for``) under uvicorn's config as
``jetrun up`` builds it (proxy headers on, the front layer ``runtime.control.http_front.Front``
with its latency histogram and access log, written through jetrun's text formatter to
/dev/null) is fed whole requests on keep-alive connections through a transport that keeps
what is written; each request is awaited until its answer was written. Handlers shaped like the
gateway's hot ones (bearer token, body read and decoded, a JSON answer) but answering from
memory. Prints CPU microseconds per request (``time.process_time``) for ``POST /v4/runs`` (a
body of 62 bytes), ``GET /v4/runs/{id}`` and ``GET /healthz`` (the Starlette router's way),
through the direct routes and through ASGI, interleaved, the least and the median over the
rounds. CPU time is what load on the machine changes least; the least is what it changes least.
``--connections N``: N connections, each given its next request in the same loop iteration (as
under load: many answers per iteration, the access lines of an iteration written together);
``--only TEXT``: only the requests whose name has it (``POST``); ``--asgi``: only through ASGI
(the protocol not told of the front layer's direct routes);
``--tree DIR``: import jetrun from another checkout (an A/B against an older tree, with
``--asgi`` where that tree has no direct routes).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import uvicorn
import uvloop
from prometheus_client import CollectorRegistry, Histogram
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from uvicorn.server import ServerState

ROOT = Path(__file__).resolve().parent.parent
if "--tree" in sys.argv:
    ROOT = Path(sys.argv[sys.argv.index("--tree") + 1]).resolve()
sys.path.insert(0, str(ROOT))

from runtime.control.http_front import Front  # noqa: E402
from runtime.control.http_input import (  # noqa: E402
    error_response,
    json_response,
    on_unexpected,
    read_body,
)
from runtime.infra import logsetup  # noqa: E402
from runtime.infra.config import Settings  # noqa: E402
from runtime.infra.http_server import protocol_for  # noqa: E402

BODY = b'{"pipeline": "demo/noop:v1", "inputs": [], "async_run": true}\n'
HEAD = b"Host: 127.0.0.1:8000\r\nAuthorization: Bearer bench\r\nUser-Agent: bench\r\n"
REQUESTS = {
    "POST /v4/runs": b"POST /v4/runs HTTP/1.1\r\n"
    + HEAD
    + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(BODY)
    + BODY,
    "GET /v4/runs/{id}": b"GET /v4/runs/run_0123456789abcdef HTTP/1.1\r\n" + HEAD + b"\r\n",
    "GET /healthz": b"GET /healthz HTTP/1.1\r\n" + HEAD + b"\r\n",
}
VIEW = {"id": "run_0123456789abcdef", "state": "completed", "pipeline": "demo/noop:v1"}


class Create(msgspec.Struct):
    pipeline: str
    inputs: list[Any]
    async_run: bool = False


def team_of(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or token != "bench":
        raise KeyError("token")
    request.state.team = "bench"
    return "bench"


async def create(request: Request) -> Response:
    team_of(request)
    msgspec.json.decode(await read_body(request, 1 << 20), type=Create)
    return json_response(VIEW, 202, {"Location": "/v4/runs/run_0123456789abcdef"})


async def get(request: Request) -> Response:
    team_of(request)
    return json_response({**VIEW, "id": request.path_params["run_id"]})


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


class Transport(asyncio.Transport):
    """Keeps what is written: the waiting request's answer."""

    def __init__(self) -> None:
        super().__init__()
        self.answer: asyncio.Future[bytes] | None = None
        self.closing = False

    def write(self, data: Any) -> None:
        if self.answer is not None and not self.answer.done():
            self.answer.set_result(bytes(data))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 40000)}.get(
            name, default
        )

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def front() -> Front:
    latency = Histogram("h", "h", ["route", "method", "status"], registry=CollectorRegistry())

    async def refused(request: Request, exc: Exception) -> Response:
        return error_response(exc)  # type: ignore[arg-type]

    routes = [
        Route("/v4/runs", create, methods=["POST"]),
        Route("/v4/runs/{run_id}", get, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
    ]
    errors: dict[Any, Any] = {Exception: on_unexpected, KeyError: refused}
    app = Starlette(routes=routes, exception_handlers=errors)
    return Front(app, create=create, get=get, errors=errors, ready=lambda: True, latency=latency)


async def measure(request: bytes, n: int, direct: bool, connections: int = 1) -> float:
    """CPU microseconds per request, ``n`` requests on ``connections`` connections, each
    connection's next request fed in the same loop iteration (as many clients at once)."""
    settings = Settings()
    app = front()
    protocol_class = protocol_for(settings, direct=app) if direct else protocol_for(settings)
    config = uvicorn.Config(app, lifespan="off", log_config=None, http=protocol_class)
    config.load()
    state = ServerState()
    pairs = []
    for _ in range(connections):
        protocol = protocol_class(config=config, server_state=state, app_state={})  # type: ignore[call-arg]
        transport = Transport()
        protocol.connection_made(transport)
        pairs.append((protocol, transport))
    loop = asyncio.get_running_loop()
    rounds = max(1, n // connections)
    for i in range(rounds + max(1, 200 // connections)):  # the first ~200 untimed
        if i == max(1, 200 // connections):
            started = time.process_time()
        answers = []
        for protocol, transport in pairs:
            answer = transport.answer = loop.create_future()
            answers.append(answer)
            protocol.data_received(request)
        for answer in answers:
            data = await answer
            if not data.startswith(b"HTTP/1.1 20"):
                raise RuntimeError(data.decode(errors="replace"))
        await asyncio.sleep(0)  # the requests' tasks end
    elapsed = time.process_time() - started
    for protocol, _ in pairs:
        protocol.connection_lost(None)
    return elapsed / (rounds * connections) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--asgi", action="store_true", help="no direct routes")
    parser.add_argument("--tree", default=None, help="import jetrun from this checkout")
    parser.add_argument(
        "--connections", type=int, default=1, help="requests fed per loop iteration"
    )
    parser.add_argument("--only", default="", help="only the requests whose name has this")
    args = parser.parse_args()
    lines = getattr(logsetup, "LineHandler", logging.StreamHandler)  # as configure() makes
    handler = lines(open("/dev/null", "w"))  # noqa: SIM115
    handler.setFormatter(logsetup.TextFormatter())
    handler.addFilter(logsetup.ContextFilter())
    access = logging.getLogger("jetrun.access")
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False
    ways = [("asgi", False)] if args.asgi else [("direct", True), ("asgi", False)]
    figures: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):  # interleaved: a burst of load touches every variant alike
        for name, request in REQUESTS.items():
            if args.only not in name:
                continue
            for way, direct in ways:
                run = measure(request, args.requests, direct, args.connections)
                figure = uvloop.run(run)
                figures.setdefault((name, way), []).append(figure)
    for (name, way), got in figures.items():
        shown = ", ".join(f"{f:.1f}" for f in got)
        print(
            f"{name:18s} {way:6s} min {min(got):5.1f}  median {statistics.median(got):5.1f}"
            f" CPU us/request  ({shown})"
        )


if __name__ == "__main__":
    main()
