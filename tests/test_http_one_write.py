"""The gateway's HTTP protocol writes a response of known length in one write (head and body
together), still sends a streamed response's head at once, and answers ``HEAD`` and failing
applications as before. A real uvicorn server on loopback with the gateway's protocol, its
transport wrapped to record every write."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from runtime.infra.config import Settings
from runtime.infra.http_server import protocol_for

pytestmark = pytest.mark.anyio


class Recorded:
    """A transport that records what is written through it."""

    def __init__(self, transport: asyncio.Transport, writes: list[bytes]) -> None:
        self._transport, self._writes = transport, writes

    def write(self, data: bytes) -> None:
        self._writes.append(bytes(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


async def fixed(request: Request) -> Response:
    return Response(b'{"ok":true}', media_type="application/json")


async def streamed(request: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        await anyio.sleep(0.3)
        yield b"one\n"
        yield b"two\n"

    return StreamingResponse(chunks(), media_type="application/x-ndjson")


async def half(scope: Any, receive: Any, send: Any) -> None:
    """Starts a response of 10 bytes, then fails."""
    head = [(b"content-length", b"10")]
    await send({"type": "http.response.start", "status": 200, "headers": head})
    raise RuntimeError("failed after the head")


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, list[bytes]]]:
    writes: list[bytes] = []

    class Protocol(protocol_for(Settings())):  # type: ignore[misc]
        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(Recorded(transport, writes))  # type: ignore[arg-type]

    app = Starlette(routes=[Route("/fixed", fixed), Route("/stream", streamed)])

    async def routed(scope: Any, receive: Any, send: Any) -> None:
        target = half if scope.get("path") == "/half" else app
        await target(scope, receive, send)

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    config = uvicorn.Config(
        routed, lifespan="off", log_config=None, loop="none", http=Protocol, log_level="critical"
    )
    server = uvicorn.Server(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, [sock])
        with anyio.fail_after(10):
            while not server.started:
                await anyio.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", writes
        server.should_exit = True


async def test_a_response_of_known_length_is_one_write(
    server: tuple[str, list[bytes]],
) -> None:
    url, writes = server
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        for _ in range(3):  # keep-alive: each response of the connection
            answer = await http.get("/fixed")
            assert (answer.status_code, answer.json()) == (200, {"ok": True})
    assert len(writes) == 3
    for write in writes:
        assert write.startswith(b"HTTP/1.1 200 OK\r\n") and write.endswith(b'\r\n\r\n{"ok":true}')


async def test_a_head_request_gets_its_head(server: tuple[str, list[bytes]]) -> None:
    url, writes = server
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        answer = await http.head("/fixed")
        assert answer.status_code == 200 and answer.headers["content-length"] == "11"
        assert (await http.get("/fixed")).json() == {"ok": True}  # the connection goes on
    assert writes[0].startswith(b"HTTP/1.1 200 OK\r\n") and writes[0].endswith(b"\r\n\r\n")


async def test_a_streamed_head_goes_before_its_body(server: tuple[str, list[bytes]]) -> None:
    url, writes = server
    async with (
        httpx.AsyncClient(base_url=url, timeout=10) as http,
        http.stream("GET", "/stream") as answer,
    ):
        assert answer.status_code == 200  # the head came before the first chunk
        assert writes and writes[-1].endswith(b"\r\n\r\n")
        assert [line async for line in answer.aiter_lines()] == ["one", "two"]
    assert writes[0].startswith(b"HTTP/1.1 200 OK\r\n") and b"one" in writes[1]


async def test_an_application_failing_after_the_head(server: tuple[str, list[bytes]]) -> None:
    url, writes = server
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        with pytest.raises(httpx.RemoteProtocolError):  # the head, then the connection closed
            await http.get("/half")
    assert writes == [writes[0]] and writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
