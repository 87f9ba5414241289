"""The gateway's HTTP protocol writes a response of known length in one write (head and body
together), still sends a streamed response's head at once, and answers ``HEAD`` and failing
applications as before. A real uvicorn server on loopback with the gateway's protocol, its
transport wrapped to record every write."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from runtime.infra.config import Settings
from runtime.infra.http_server import protocol_for
from tests.http_serving import recording, serving

pytestmark = pytest.mark.anyio


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

    app = Starlette(routes=[Route("/fixed", fixed), Route("/stream", streamed)])

    async def routed(scope: Any, receive: Any, send: Any) -> None:
        target = half if scope.get("path") == "/half" else app
        await target(scope, receive, send)

    async with serving(routed, recording(protocol_for(Settings()), writes)) as port:
        yield f"http://127.0.0.1:{port}", writes


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
