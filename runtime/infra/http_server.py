"""The gateway's HTTP server protocol: uvicorn's httptools protocol with two limits it lacks.

- **Header-read deadline** (``http_header_timeout_s``): a connection that has not sent a whole
  request head that long after it opened (or after its previous response) is answered
  ``408`` and closed. Without it, a client that sends half a header holds its socket for ever.
- **Connection cap** (``http_max_connections``, and never more than the process's open-file
  limit minus a reserve for NATS, workers and logs): a new connection over the cap closes the
  oldest connection still reading its request head (it had its chance) or, when every
  connection is busy with a real request, is itself answered ``503`` and closed. So a pile of
  slow or idle connections can neither exhaust file descriptors (when ``accept`` fails, every
  client fails) nor keep a client with a whole request out.

- **Head size cap** (``http_max_head_bytes``): a request line and headers over it are answered
  ``431`` and the connection closed. The HTTP parser has no limit of its own, so without it a
  client could stream headers into the gateway's memory until the header-read deadline.

- **Keep-alive deadline** (``http_keepalive_s``): a connection idle that long after a response
  is closed. uvicorn starts a timer after every response and cancels it when the next request
  comes (1.7 CPU µs a request); here, as for the head deadline, one timer per connection looks
  at the deadline when it fires.

How a response is written (one write per response; the requests the application answers
directly, beside ASGI) is ``runtime.infra.http_cycles``.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import resource
from collections import OrderedDict
from typing import Any, cast

from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from runtime.infra.config import Settings
from runtime.infra.http_cycles import Direct, DirectCycle, HeldHead, OneWriteCycle

log = logging.getLogger("jetrun.http")

FD_RESERVE = 64  # descriptors kept for everything that is not an HTTP connection
TIMER_SLACK_S = 0.002  # a loop may run a timer this much before its time
_408 = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
_431 = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-length: 0\r\nconnection: close\r\n\r\n"
)
_503 = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


def connection_cap(configured: int) -> int:
    """``configured``, lowered to stay below this process's open-file limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(1, min(configured, soft - FD_RESERVE))


def protocol_for(settings: Settings, direct: Direct | None = None) -> type[asyncio.Protocol]:
    """A protocol class for one server: the limits and the set of connections still reading
    a request head are shared by its connections; ``direct`` (the server's application) is
    asked which requests it answers directly."""
    header_timeout = settings.http_header_timeout_s
    cap = connection_cap(settings.http_max_connections)
    reading: OrderedDict[LimitedHttpTools, None] = OrderedDict()  # oldest first

    class Protocol(LimitedHttpTools):
        pass

    Protocol.header_timeout_s = header_timeout
    Protocol.max_connections = cap
    Protocol.max_head_bytes = settings.http_max_head_bytes
    Protocol.reading = reading
    Protocol.direct = direct
    return Protocol


class LimitedHttpTools(HttpToolsProtocol):
    header_timeout_s: float
    max_connections: int
    max_head_bytes: int = 65_536
    reading: OrderedDict[LimitedHttpTools, None]
    direct: Direct | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None  # pending: looks at the deadline
        self._head_deadline: float | None = None  # loop time; None: no head being read
        self._head_bytes = 0  # received while the current request head is unfinished
        self._idle_deadline: float | None = None  # loop time; None: not idle after a response

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections and not self._evict_one():
            self._refuse(_503)
            return
        self._await_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._head_deadline is not None and not self.transport.is_closing():  # unfinished
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes:
                self._refuse(_431)

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_done()
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_deadline is None:  # a keep-alive connection's next request
            self._await_head()

    def on_headers_complete(self) -> None:
        self._head_done()
        super().on_headers_complete()
        cycle = self.cycle  # the request's (not started before this returns)
        if cycle is not None and not isinstance(cycle, OneWriteCycle):
            cycle.__class__ = OneWriteCycle  # adds behaviour only: the same fields
            cast(OneWriteCycle, cycle).transport = HeldHead(self.transport)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        """Start a request (at once, or when the one before it on the connection is answered):
        directly if the application takes it, else as uvicorn does."""
        call = None
        if self.direct is not None and app is self.app:  # not uvicorn's 503 over its limit
            call = self.direct.route(cycle.scope["method"], cycle.scope["path"])
        if call is None:
            super()._start_asgi_task(cycle, app)
            return
        if not isinstance(cycle.transport, HeldHead):
            cycle.transport = HeldHead(self.transport)  # type: ignore[assignment]
        cycle.__class__ = DirectCycle  # adds behaviour only: the same fields
        proxy = app if isinstance(app, ProxyHeadersMiddleware) else None
        run = cast(DirectCycle, cycle).run_direct(call, proxy)
        if self.config.reset_contextvars:  # as uvicorn
            task = self.loop.create_task(run, context=contextvars.Context())
        else:
            task = self.loop.create_task(run)
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    def on_response_complete(self) -> None:
        """uvicorn's, but idle until a deadline instead of a timer per response."""
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:  # a pipelined request waits: it starts now
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        else:
            self._idle_deadline = self.loop.time() + self.timeout_keep_alive
            if self.timeout_keep_alive_task is None:
                self.timeout_keep_alive_task = self.loop.call_at(
                    self._idle_deadline, self._idle_timer_fired
                )
        self.reading[self] = None  # idle between requests: as evictable as a slow head

    def _unset_keepalive_if_required(self) -> None:
        """Not idle any more (data came): a pending timer is left to find no deadline."""
        self._idle_deadline = None

    def _idle_timer_fired(self) -> None:
        self.timeout_keep_alive_task = None
        deadline = self._idle_deadline
        if deadline is None:  # busy again: the next response starts a timer
            return
        if self.loop.time() < deadline - TIMER_SLACK_S:  # idle again since, until later
            self.timeout_keep_alive_task = self.loop.call_at(deadline, self._idle_timer_fired)
            return
        self.timeout_keep_alive_handler()

    def _await_head(self) -> None:
        """A request head is due within ``header_timeout_s``. One timer per connection, not one
        per request: a pending timer is left running and, when it fires, looks at the deadline
        of the head being read then (none: it ends; later: it waits again)."""
        self._head_bytes = 0
        self._head_deadline = self.loop.time() + self.header_timeout_s
        if self._head_timer is None:
            self._head_timer = self.loop.call_at(self._head_deadline, self._head_timer_fired)
        self.reading[self] = None

    def _head_done(self) -> None:
        self._head_deadline = None
        self.reading.pop(self, None)

    def _head_timer_fired(self) -> None:
        self._head_timer = None
        deadline = self._head_deadline
        if deadline is None:  # no head being read: the next one starts a timer
            return
        if self.loop.time() < deadline - TIMER_SLACK_S:  # a later request's head
            self._head_timer = self.loop.call_at(deadline, self._head_timer_fired)
            return
        self._refuse(_408)

    def _evict_one(self) -> bool:
        """Close the oldest connection still reading its request head; False if none is."""
        for victim in self.reading:
            if victim is not self:
                log.warning("connection limit %d reached: closing a slow one", self.max_connections)
                victim._refuse(_408)
                return True
        return False

    def _refuse(self, response: bytes) -> None:
        self._head_done()
        if not self.transport.is_closing():
            self.transport.write(response)
            self.transport.close()
