"""The request-head deadline of the gateway's HTTP protocol, per request on a keep-alive
connection: a connection busy with quick requests for longer than the deadline is never cut,
and a later request whose head stalls is answered 408 about one deadline after it began; the
keep-alive deadline likewise: a connection busy for longer than it stays open, one idle for it
is closed (a real uvicorn server on loopback with the gateway's protocol; raw sockets)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

import anyio
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from runtime.infra.config import Settings
from runtime.infra.http_server import protocol_for
from tests.http_serving import serving

pytestmark = pytest.mark.anyio

DEADLINE_S = 0.6
REQUEST = b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n"


async def ok(request: Request) -> Response:
    return Response(b"ok")


@pytest.fixture
async def port() -> AsyncIterator[int]:
    async with served(keepalive_s=30) as port:
        yield port


@contextlib.asynccontextmanager
async def served(keepalive_s: int) -> AsyncIterator[int]:
    settings = Settings(http_header_timeout_s=DEADLINE_S, http_keepalive_s=keepalive_s)
    app = Starlette(routes=[Route("/ok", ok)])
    async with serving(app, protocol_for(settings), timeout_keep_alive=keepalive_s) as port:
        yield port


async def answer(conn: anyio.abc.SocketStream) -> bytes:
    data = b""
    with anyio.fail_after(5):
        while not data.endswith(b"ok") and not data.startswith(b"HTTP/1.1 408"):
            chunk = await conn.receive()
            data += chunk
    return data


async def test_quick_requests_outlive_the_deadline_and_a_stalled_head_does_not(port: int) -> None:
    async with await anyio.connect_tcp("127.0.0.1", port) as conn:
        began = time.monotonic()
        while time.monotonic() - began < 2.5 * DEADLINE_S:  # longer than the deadline, busy
            await conn.send(REQUEST)
            assert (await answer(conn)).startswith(b"HTTP/1.1 200 OK")
            await anyio.sleep(0.05)
        await conn.send(b"GET /ok HTTP/1.1\r\nHo")  # the next head stalls
        stalled = time.monotonic()
        refused = await answer(conn)
        waited = time.monotonic() - stalled
    assert refused.startswith(b"HTTP/1.1 408")
    assert DEADLINE_S - 0.05 <= waited <= DEADLINE_S + 1.0, waited


async def test_an_idle_keep_alive_connection_then_a_stalled_head(port: int) -> None:
    """Idle time between requests is the keep-alive timer's: the head's deadline starts with
    the head's first byte."""
    async with await anyio.connect_tcp("127.0.0.1", port) as conn:
        await conn.send(REQUEST)
        assert (await answer(conn)).startswith(b"HTTP/1.1 200 OK")
        await anyio.sleep(2 * DEADLINE_S)  # idle: no head being read
        await conn.send(REQUEST)
        assert (await answer(conn)).startswith(b"HTTP/1.1 200 OK")
        await conn.send(b"GET /ok HTTP/1.1\r\n")
        stalled = time.monotonic()
        assert (await answer(conn)).startswith(b"HTTP/1.1 408")
        assert DEADLINE_S - 0.05 <= time.monotonic() - stalled <= DEADLINE_S + 1.0


async def test_the_keep_alive_deadline_counts_from_the_last_response() -> None:
    """Requests every 0.4 s for 2.5 s on a 1 s keep-alive: never closed (each response starts
    the idle time again); then idle: closed about 1 s after the last response."""
    async with served(keepalive_s=1) as port, await anyio.connect_tcp("127.0.0.1", port) as conn:
        began = time.monotonic()
        while time.monotonic() - began < 2.5:
            await conn.send(REQUEST)
            assert (await answer(conn)).startswith(b"HTTP/1.1 200 OK")
            await anyio.sleep(0.4)
        last = time.monotonic()
        await conn.send(REQUEST)
        assert (await answer(conn)).startswith(b"HTTP/1.1 200 OK")
        closed = False
        with anyio.move_on_after(5):
            try:
                await conn.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                closed = True  # by the server
        assert closed and 0.9 <= time.monotonic() - last <= 2.5
