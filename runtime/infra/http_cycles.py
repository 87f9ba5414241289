"""How the gateway's HTTP protocol (``runtime.infra.http_server``) answers a request: in one write.

- **One write per response** (``OneWriteCycle``): uvicorn writes a response's head and its body
  with two ``transport.write`` calls (two ``send`` system calls, two TCP segments). A response
  of known length (``content-length``) has its head held until its body is written, and both
  leave in one write; a streamed (chunked) response's head still leaves at once, and a response
  whose body never comes (a ``HEAD``, an application error) has its head written as before.
- **Direct answers** (``DirectCycle``): the protocol asks the application, for each request it is
  about to start, whether it takes it directly (``Direct.route(method, path)``; the gateway's
  front layer takes ``POST /v4/runs`` and ``GET /v4/runs/{id}`` once it is ready). Such a
  request skips uvicorn's ASGI wrapper, the proxy-headers middleware, the front layer's ASGI
  entry, Starlette's ``Response.__call__`` and uvicorn's ``send`` twice (head, then body):
  ``run_direct`` applies the proxy headers to the scope itself (``forwarded``: the rule of
  uvicorn's middleware, with its trusted hosts), then calls the route with the scope, the
  cycle's ``receive`` (the body, ``Expect: 100-continue``, a disconnect: as before) and
  ``answer``, which writes a plain ``Response`` (status line, uvicorn's default headers, the
  response's headers, its body) in one write; any other response (streamed, with a background
  task) goes through uvicorn's ``send`` as before. The connection (parsing, pipelining,
  keep-alive, flow control, limits, shutdown) is the protocol's, unchanged; every other request
  is the ASGI application's, unchanged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, cast

from starlette.responses import Response
from starlette.types import Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    RequestResponseCycle,
)

log = logging.getLogger("jetrun.http")

Answer = Callable[[Response], Awaitable[None]]
DirectCall = Callable[[Scope, Receive, Answer], Awaitable[None]]
_PROXY_SCHEMES = frozenset({"http", "https", "ws", "wss"})  # as uvicorn's middleware


class HeldHead:
    """A response cycle's transport: while ``holding``, the next write (the response head) is
    kept back and goes out joined to the write after it (the body), or on ``flush``/``close``."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.holding = False
        self.held = b""

    def write(self, data: bytes) -> None:
        if self.holding:
            self.holding = False
            self.held = data
            return
        if self.held:
            data, self.held = self.held + data, b""
        self.transport.write(data)

    def flush(self) -> None:
        self.holding = False
        if self.held:
            data, self.held = self.held, b""
            if not self.transport.is_closing():
                self.transport.write(data)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class OneWriteCycle(RequestResponseCycle):
    """uvicorn's request/response cycle, writing a response of known length in one write."""

    transport: HeldHead  # type: ignore[assignment]

    async def send(self, message: Any) -> None:
        transport = self.transport
        if message["type"] == "http.response.start" and not self.response_started:
            transport.holding = True
            try:
                await super().send(message)
            finally:
                transport.holding = False
            if self.chunked_encoding is not False or self.scope["method"] == "HEAD":
                transport.flush()  # streamed, or no body to come: the head goes now
            return
        try:
            await super().send(message)
        finally:
            transport.flush()


class Direct(Protocol):
    def route(self, method: str, path: str) -> DirectCall | None:
        """The call that answers this request, or None: the ASGI application answers it."""


def _nothing() -> None:
    pass


class DirectCycle(OneWriteCycle):
    """A request/response cycle answered by a direct call (the same fields as uvicorn's)."""

    async def run_direct(self, call: DirectCall, proxy: ProxyHeadersMiddleware | None) -> None:
        """As uvicorn's ``run_asgi``: a failure before the response is answered 500 (it is a
        bug: the call answers its own errors), after it the connection is closed."""
        scope = cast(Scope, self.scope)
        try:
            if proxy is not None:
                forwarded(scope, proxy)
            await call(scope, cast(Receive, self.receive), self.answer)
        except BaseException as exc:
            log.error("Exception in a direct answer", exc_info=exc)
            if not self.response_started:
                await self.send_500_response()
            else:
                self.transport.close()
        finally:
            self.on_response = _nothing

    async def answer(self, response: Response) -> None:
        """Send ``response``: a plain one (its body in memory) in one write."""
        if type(response).__call__ is not Response.__call__ or response.background is not None:
            scope, receive, send = cast(Scope, self.scope), cast(Receive, self.receive), self.send
            await response(scope, receive, cast(Send, send))  # streamed, or more to do
            return
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected:
            return
        if self.response_started:
            raise RuntimeError("a direct call answered twice")
        self.response_started = True
        self.waiting_for_100_continue = False
        self.transport.write(self._encode(response))
        self.response_complete = True
        self.message_event.set()
        if not self.keep_alive:
            self.transport.close()
        self.on_response()

    def _encode(self, response: Response) -> bytes:
        block, closing = _default_block(self.default_headers)
        parts: list[bytes | memoryview] = [STATUS_LINE[response.status_code], block]
        for name, value in response.raw_headers:
            closing = _header(parts, name, value) or closing
        if closing:
            self.keep_alive = False
        elif not self.keep_alive:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        if self.scope["method"] != "HEAD":
            parts.append(response.body)
        return b"".join(parts)


def _header(parts: list[bytes | memoryview], name: bytes, value: bytes) -> bool:
    """Add a header line to ``parts`` (checked as uvicorn does); whether it closes."""
    if HEADER_RE.search(name) or HEADER_VALUE_RE.search(value):
        raise RuntimeError(f"invalid HTTP header {name!r}")
    parts += (name, b": ", value, b"\r\n")
    return name == b"connection" and b"close" in value.lower()


class _Defaults:
    """The server's default headers (``date``, ``server``, the configured ones) as one block,
    checked and joined once per list: uvicorn makes a new list once a second (the date) and
    every response until then carries the same one."""

    made: tuple[list[tuple[bytes, bytes]], bytes, bool] | None = None


def _default_block(headers: list[tuple[bytes, bytes]]) -> tuple[bytes, bool]:
    made = _Defaults.made
    if made is not None and made[0] is headers:
        return made[1], made[2]
    parts: list[bytes | memoryview] = []
    closing = False
    for name, value in headers:
        closing = _header(parts, name, value) or closing
    block = b"".join(parts)
    _Defaults.made = (headers, block, closing)
    return block, closing


def forwarded(scope: Scope, proxy: ProxyHeadersMiddleware) -> None:
    """What uvicorn's ``ProxyHeadersMiddleware`` does to an HTTP request's scope: from a trusted
    client, ``X-Forwarded-Proto`` sets the scheme and ``X-Forwarded-For`` the client (the
    nearest address the trusted hosts do not vouch for, port 0)."""
    client = scope.get("client")
    if client is None or client[0] not in proxy.trusted_hosts:
        return
    proto: bytes | None = None
    forwarded_for: list[bytes] = []
    for name, value in scope["headers"]:
        if name == b"x-forwarded-proto":
            proto = value
        elif name == b"x-forwarded-for":
            forwarded_for.append(value)
    if proto is not None:
        scheme = proto.decode("latin1").strip()
        if scheme in _PROXY_SCHEMES:
            scope["scheme"] = scheme
    if forwarded_for:
        joined = b", ".join(forwarded_for).decode("latin1")
        host, port = proxy.trusted_hosts.get_trusted_client_address(joined)
        if host:
            scope["client"] = (host, port)
