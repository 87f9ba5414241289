"""Hostile webhook receivers against the deliverer's POST, on real sockets on 127.0.0.1: one
that never stops sending its body, one that answers a byte at a time, and a callback host whose
name resolves elsewhere when connected than when checked (DNS rebinding)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import anyio
import httpx
import pytest

from contracts.run import Run, RunRecord
from contracts.webhooks import Delivery
from runtime.control.webhook_delivery import Deliverer, GiveUp, Retry
from runtime.infra.clock import SYSTEM_CLOCK
from runtime.infra.config import parse

pytestmark = pytest.mark.anyio

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _endless_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000000\r\n\r\n")
    while True:  # 100 GB, as fast as the deliverer reads
        writer.write(b"x" * 65536)
        await writer.drain()


async def _trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n":
        writer.write(bytes([byte]))  # one byte per 0.3 s: never idle for a whole timeout
        await writer.drain()
        await asyncio.sleep(0.3)


async def _record_host(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    seen_hosts.append(next(h for h in head.lower().split(b"\r\n") if h.startswith(b"host:")))
    writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
    await writer.drain()


seen_hosts: list[bytes] = []


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[int]]]:
    servers: list[asyncio.Server] = []

    async def start(handler: Handler) -> int:
        async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass  # the deliverer hung up: what these tests want
            finally:
                writer.close()

        server = await asyncio.start_server(closing, "127.0.0.1", 0)
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    yield start
    for server in servers:
        server.close()


async def _post(url: str, timeout_s: float = 1.0) -> int | None:
    """The deliverer's POST of one delivery to ``url``, allowed to reach 127.0.0.1."""
    hooks = {"allowed_hosts": ["127.0.0.1"], "timeout_s": timeout_s}
    config = parse({"webhooks": hooks})
    service = Deliverer(SimpleNamespace(), config, SYSTEM_CLOCK)  # type: ignore[arg-type]
    run = Run.of(RunRecord(id="run_x", team="acme", pipeline="acme/p:v1"))
    delivery = Delivery(delivery_id="d1", team="acme", url=url, run=run)
    async with httpx.AsyncClient(trust_env=False) as http:
        service.http = http
        with anyio.fail_after(20):  # a hang fails the test
            try:
                await service._post(delivery, "secret")
            except Retry:
                return None
    return 200


async def test_a_receiver_that_never_ends_its_body_cannot_hold_the_deliverer(
    serve: Callable[[Handler], Awaitable[int]],
) -> None:
    port = await serve(_endless_body)
    assert await _post(f"http://127.0.0.1:{port}/hook") == 200  # the status is enough


async def test_a_receiver_that_answers_a_byte_at_a_time_times_out(
    serve: Callable[[Handler], Awaitable[int]],
) -> None:
    port = await serve(_trickle)
    with anyio.fail_after(5):  # the whole exchange is bounded by timeout_s (1 s), not per read
        assert await _post(f"http://127.0.0.1:{port}/hook", timeout_s=1.0) is None


async def test_the_post_goes_to_the_address_that_was_checked(
    serve: Callable[[Handler], Awaitable[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The name is resolved once, checked, and connected to at that address: a resolver that
    would answer differently the second time (rebinding) is never asked again."""
    port = await serve(_record_host)
    answers: list[str] = []

    async def resolve(host: str, port: int, **_: Any) -> list[Any]:
        answers.append(host)
        address = "127.0.0.1" if len(answers) == 1 else "169.254.169.254"  # then: metadata
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(anyio, "getaddrinfo", resolve)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: pytest.fail("resolved again"))
    seen_hosts.clear()
    assert await _post(f"http://hooks.rebind.test:{port}/hook") == 200
    assert answers == ["hooks.rebind.test"]
    assert seen_hosts == [f"host: hooks.rebind.test:{port}".encode()]


async def test_a_redirect_is_not_followed(serve: Callable[[Handler], Awaitable[int]]) -> None:
    """A receiver answering 302 to an address the policy would refuse gets no second POST."""
    seen_hosts.clear()
    target = await serve(_record_host)

    async def redirect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        location = f"Location: http://127.0.0.1:{target}/metadata\r\n".encode()
        writer.write(b"HTTP/1.1 302 Found\r\n" + location + b"Content-Length: 0\r\n\r\n")
        await writer.drain()

    port = await serve(redirect)
    with pytest.raises(GiveUp, match="HTTP 302"):
        await _post(f"http://127.0.0.1:{port}/hook")
    assert seen_hosts == []
