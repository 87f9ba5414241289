"""The two hot endpoints answered directly by the gateway's HTTP protocol
(``runtime.infra.http_cycles``), on the wire: one write per answer, uvicorn's default headers,
keep-alive and pipelining in order, ``Connection: close`` and HTTP/1.0, ``Expect:
100-continue``, the proxy-header rule of uvicorn's middleware, a client that leaves mid-body, a
streamed answer, a head deadline after a direct answer, and the ASGI way while not ready. A real
uvicorn server with the gateway's protocol and front layer on loopback; raw sockets; every wait
bounded."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry, Histogram
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from runtime.control.http_front import Front
from runtime.control.http_input import HTTPError, error_response, json_response, on_unexpected
from runtime.control.http_input import read_body as read_limited
from runtime.infra.config import Settings
from runtime.infra.http_cycles import _default_block
from runtime.infra.http_server import protocol_for
from tests.http_serving import recording, serving

pytestmark = pytest.mark.anyio

DEADLINE_S = 0.6
LIMIT = 64  # body bytes the create handler reads


class Gateway:
    def __init__(self) -> None:
        self.ready = True
        self.stream = False
        self.bodies: list[bytes] = []
        self.writes: list[bytes] = []
        self.cycles: list[str] = []  # the class of each request's cycle

    async def create(self, request: Request) -> Response:
        self.cycles.append(type(getattr(request.receive, "__self__", None)).__name__)
        request.state.team = "acme"
        body = await read_limited(request, LIMIT)
        self.bodies.append(body)
        if self.stream:
            return StreamingResponse(iter([b"one\n", b"two\n"]), media_type="text/plain")
        return json_response({"got": body.decode()}, 202, {"Location": "/v4/runs/r1"})

    async def get(self, request: Request) -> Response:
        return json_response({"id": request.path_params["run_id"]})

    def front(self) -> Front:
        async def refused(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, HTTPError)
            return error_response(exc)

        errors: dict[Any, Any] = {HTTPError: refused, Exception: on_unexpected}
        routes = [
            Route("/v4/runs", self.create, methods=["POST"]),
            Route("/v4/runs/{run_id}", self.get, methods=["GET"]),
        ]
        latency = Histogram("h", "h", ["route", "method", "status"], registry=CollectorRegistry())
        return Front(
            Starlette(routes=routes, exception_handlers=errors),
            create=self.create,
            get=self.get,
            errors=errors,
            ready=lambda: self.ready,
            latency=latency,
        )


@pytest.fixture
async def served() -> AsyncIterator[tuple[Gateway, int]]:
    gateway = Gateway()
    front = gateway.front()
    settings = Settings(http_header_timeout_s=DEADLINE_S, http_keepalive_s=30)
    protocol = recording(protocol_for(settings, direct=front), gateway.writes)
    async with serving(front, protocol) as port:
        yield gateway, port


def post(body: bytes, *head: bytes) -> bytes:
    lines = [b"POST /v4/runs HTTP/1.1", b"Host: x", b"Content-Length: %d" % len(body), *head]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def read_answers(conn: anyio.abc.SocketStream, count: int) -> list[bytes]:
    """``count`` whole answers of known length (more bytes may follow)."""
    data = b""
    answers: list[bytes] = []
    with anyio.fail_after(5):
        while len(answers) < count:
            head, sep, rest = data.partition(b"\r\n\r\n")
            if sep:
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                if len(rest) >= length:
                    answers.append(head + sep + rest[:length])
                    data = rest[length:]
                    continue
            data += await conn.receive()
    return answers


async def read_to_close(conn: anyio.abc.SocketStream) -> bytes:
    data = b""
    with anyio.fail_after(5):
        try:
            while True:
                data += await conn.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return data


async def test_answers_in_one_write_with_the_default_headers(
    served: tuple[Gateway, int],
) -> None:
    gateway, port = served
    async with await anyio.connect_tcp("127.0.0.1", port) as conn:
        for i in range(3):  # keep-alive
            await conn.send(post(b'{"n": %d}' % i))
            (answer,) = await read_answers(conn, 1)
            assert answer.startswith(b"HTTP/1.1 202 Accepted\r\n")
            assert answer.endswith(b'{"got":"{\\"n\\": %d}"}' % i)
            head = answer.lower()
            for header in (b"date: ", b"server: uvicorn", b"location: /v4/runs/r1"):
                assert header in head
            assert b"content-type: application/json" in head
    assert len(gateway.writes) == 3 and gateway.writes[0].startswith(b"HTTP/1.1 202")
    assert gateway.cycles == ["DirectCycle"] * 3  # not through ASGI


async def test_pipelined_requests_are_answered_in_order(served: tuple[Gateway, int]) -> None:
    gateway, port = served
    three = post(b"a") + b"GET /v4/runs/r9 HTTP/1.1\r\nHost: x\r\n\r\n" + post(b"b")
    async with await anyio.connect_tcp("127.0.0.1", port) as conn:
        await conn.send(three)
        first, second, third = await read_answers(conn, 3)
    assert first.endswith(b'{"got":"a"}') and second.endswith(b'{"id":"r9"}')
    assert third.endswith(b'{"got":"b"}') and gateway.bodies == [b"a", b"b"]


async def test_connection_close_and_http_1_0_close_after_the_answer(
    served: tuple[Gateway, int],
) -> None:
    _, port = served
    async with await anyio.connect_tcp("127.0.0.1", port) as conn:
        await conn.send(post(b"x", b"Connection: close"))
        answer = await read_to_close(conn)
    assert answer.startswith(b"HTTP/1.1 202") and b"connection: close" in answer.lower()
    async with await anyio.connect_tcp("127.0.0.1", port) as conn:
        await conn.send(b"GET /v4/runs/r2 HTTP/1.0\r\nHost: x\r\n\r\n")
        answer = await read_to_close(conn)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'{"id":"r2"}')


async def test_expect_100_continue(served: tuple[Gateway, int]) -> None:
    gateway, port = served
    head = b"POST /v4/runs HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
    async with await anyio.connect_tcp("127.0.0.1", port) as conn:
        await conn.send(head)
        with anyio.fail_after(5):
            interim = await conn.receive()
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        await conn.send(b"ok")
        (answer,) = await read_answers(conn, 1)
    assert answer.startswith(b"HTTP/1.1 202") and gateway.bodies == [b"ok"]


async def test_a_body_over_the_limit_is_413_and_the_connection_goes_on(
    served: tuple[Gateway, int],
) -> None:
    _, port = served
    async with await anyio.connect_tcp("127.0.0.1", port) as conn:
        await conn.send(post(b"x" * (LIMIT + 1)))
        (refused,) = await read_answers(conn, 1)
        assert refused.startswith(b"HTTP/1.1 413") and b'"body_too_large"' in refused
        await conn.send(b"GET /v4/runs/r3 HTTP/1.1\r\nHost: x\r\n\r\n")
        (answer,) = await read_answers(conn, 1)
    assert answer.endswith(b'{"id":"r3"}')


async def test_forwarded_for_is_believed_only_as_uvicorn_does(
    served: tuple[Gateway, int], caplog: pytest.LogCaptureFixture
) -> None:
    """From 127.0.0.1 (trusted by default) the access log names the forwarded client, as
    uvicorn's middleware would; the connection's own address otherwise."""
    caplog.set_level(logging.INFO, "jetrun.access")
    _, port = served
    async with await anyio.connect_tcp("127.0.0.1", port) as conn:
        await conn.send(post(b"x", b"X-Forwarded-For: 203.0.113.7, 127.0.0.1"))
        await read_answers(conn, 1)
        await conn.send(b"GET /v4/runs/r4 HTTP/1.1\r\nHost: x\r\n\r\n")
        await read_answers(conn, 1)
    forwarded, direct = [r for r in caplog.records if r.name == "jetrun.access"]
    assert forwarded.client == "203.0.113.7:0" and forwarded.team == "acme"  # type: ignore[attr-defined]
    assert direct.client.startswith("127.0.0.1:") and direct.client != "127.0.0.1:0"  # type: ignore[attr-defined]


async def test_a_client_leaving_mid_body_harms_no_one(served: tuple[Gateway, int]) -> None:
    gateway, port = served
    async with await anyio.connect_tcp("127.0.0.1", port) as conn:
        await conn.send(post(b"0123456789")[:-4])  # 6 of 10 body bytes, then gone
    async with await anyio.connect_tcp("127.0.0.1", port) as conn:
        await conn.send(post(b"next"))
        (answer,) = await read_answers(conn, 1)
    assert answer.endswith(b'{"got":"next"}') and gateway.bodies == [b"next"]


async def test_a_streamed_answer_goes_through_uvicorns_send(served: tuple[Gateway, int]) -> None:
    gateway, port = served
    gateway.stream = True
    async with await anyio.connect_tcp("127.0.0.1", port) as conn:
        await conn.send(post(b"s", b"Connection: close"))
        answer = await read_to_close(conn)
    assert b"transfer-encoding: chunked" in answer.lower()
    assert answer.endswith(b"4\r\none\n\r\n4\r\ntwo\n\r\n0\r\n\r\n")


async def test_a_stalled_head_after_a_direct_answer_is_408(served: tuple[Gateway, int]) -> None:
    _, port = served
    async with await anyio.connect_tcp("127.0.0.1", port) as conn:
        await conn.send(b"GET /v4/runs/r5 HTTP/1.1\r\nHost: x\r\n\r\n")
        await read_answers(conn, 1)
        started = anyio.current_time()
        await conn.send(b"GET /v4/runs/r6 HTTP/1.1\r\nHost:")  # never finished
        answer = await read_to_close(conn)
    assert answer.startswith(b"HTTP/1.1 408")
    assert DEADLINE_S * 0.8 <= anyio.current_time() - started <= DEADLINE_S + 2


async def test_while_not_ready_the_api_says_starting(served: tuple[Gateway, int]) -> None:
    gateway, port = served
    gateway.ready = False
    async with await anyio.connect_tcp("127.0.0.1", port) as conn:
        await conn.send(post(b"x"))
        (answer,) = await read_answers(conn, 1)
    assert answer.startswith(b"HTTP/1.1 503") and b'"starting"' in answer
    assert gateway.bodies == []


def test_the_default_headers_block_follows_each_new_list() -> None:
    """uvicorn makes a new default-header list when the date changes: each gets its block."""
    first = [(b"date", b"Thu, 26 Nov 2026 14:00:00 GMT"), (b"server", b"uvicorn")]
    second = [(b"date", b"Thu, 26 Nov 2026 14:00:01 GMT"), (b"server", b"uvicorn")]
    want = b"date: Thu, 26 Nov 2026 14:00:00 GMT\r\nserver: uvicorn\r\n"
    assert _default_block(first) == (want, False)
    assert _default_block(second)[0] == want.replace(b":00 GMT", b":01 GMT")
    assert _default_block([*second, (b"connection", b"Close")])[1] is True
    with pytest.raises(RuntimeError, match="invalid HTTP header"):
        _default_block([(b"x-bad", b"a\r\nb")])
