"""JetStream publishes with acknowledgement, at a fraction of the client CPU of nats-py's own.

``publish(nc, subject, payload, headers, timeout)`` answers exactly as
``JetStreamContext.publish`` does (a ``PubAck``; ``APIError`` subclasses for an error reply,
``NoStreamResponseError`` when no stream listens, ``nats.errors.TimeoutError`` after
``timeout``), over the same protocol. What it saves, per publish: the random token bytes (a
``getrandom`` call) and the done callback of nats-py's request, ``asyncio.wait_for``'s wrapper,
``Client.publish``'s building of the command (``runtime.infra.pubframe`` writes the frame in
one go, with the same checks and the same way out), and on the ack's side the ``Msg`` nats-py
builds, its header parsing, and the ack's ``json.loads`` plus dataclass building (msgspec
decodes it). Replies arrive on one wildcard subscription per connection, under the
connection's own inbox prefix (so a role's inbox permissions hold), and tokens come from a
counter. Concurrent publishes share the connection's flushes, as before.

The reply subscription is made with nats-py's ``future=`` (so it is resubscribed after a
reconnect) and registered with the connection's raw receivers (``runtime.infra.ordered``): the
reader hands each ack's payload and raw headers to ``Publisher._on_reply`` as it parses it,
which completes the waiting publish's future; no ``Msg``, no task in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import weakref
from collections.abc import Callable
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.js import JetStreamContext, api
from nats.js.errors import APIError, NoStreamResponseError

from runtime.infra import ordered, pubframe

NO_RESPONDERS = b"NATS/1.0 503"  # the status line of a no-responders reply


class _Ack(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool | None = None
    domain: str | None = None
    error: dict[str, Any] | None = None


_ack_decoder = msgspec.json.Decoder(_Ack)


Reply = tuple[bytes, bytes]  # an ack's payload and raw headers, as the reader parsed them


class Publisher:
    """One connection's acknowledged publishes. Safe to share within its event loop."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self._prefix = ""
        self._tokens = itertools.count()
        self._waiting: dict[bytes, asyncio.Future[Reply]] = {}
        self._subscribing: asyncio.Lock | None = None
        # the connection's loop, kept: asking for the running loop per publish is a ``getpid``
        # system call on Python 3.11
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _replies(self) -> str:
        if self._prefix:
            return self._prefix
        self._loop = asyncio.get_running_loop()
        if self._subscribing is None:
            self._subscribing = asyncio.Lock()
        async with self._subscribing:
            if not self._prefix:
                prefix = self.nc.new_inbox() + "."
                # ``future=``: nats-py keeps it (resubscribed after a reconnect) but never
                # calls it: the reader hands each ack to ``_on_reply`` (runtime.infra.ordered)
                sub = await self.nc.subscribe(prefix + "*", future=asyncio.Future())
                ordered.Connection.of(self.nc).receivers[sub._id] = self._on_reply
                self._prefix = prefix
        return self._prefix

    def _on_reply(self, subject: bytes, data: bytes, headers: bytes) -> None:
        future = self._waiting.pop(subject, None)
        if future is not None and not future.done():
            future.set_result((data, headers))

    async def publish(
        self, subject: str, payload: bytes, headers: dict[str, str] | None, timeout: float
    ) -> api.PubAck:
        """Publish to a stream's subject and wait (up to ``timeout`` seconds) for its ack."""
        return await (await self.send(subject, payload, headers, timeout)).ack()

    async def send(
        self,
        subject: str,
        payload: bytes,
        headers: dict[str, str] | None,
        timeout: float,
        expiry: Expiry | None = None,
    ) -> Pending:
        """Publish to a stream's subject; its ack is awaited later (``Pending.ack``), so that
        several publishes can be in flight from one task. Whoever gets a ``Pending`` either
        awaits its ack or cancels it. With ``expiry`` (publishes sent together) the ack times
        out with the others', on the expiry's one timer (``timeout`` is then the expiry's)."""
        reply = f"{self._prefix or await self._replies()}{next(self._tokens)}"
        command = pubframe.frame(subject, reply, headers, payload)
        key = reply.encode()
        loop = self._loop or asyncio.get_running_loop()
        future: asyncio.Future[Reply] = loop.create_future()
        self._waiting[key] = future
        if expiry is not None and expiry.add(future):
            pending = Pending(self, key, future, None)
        else:  # alone, or sent after the expiry's timer fired or was cancelled: its own timer
            pending = Pending(self, key, future, loop.call_later(timeout, _expire, future))
        try:
            await pubframe.send(self.nc, command, len(payload))
        except BaseException:
            pending.cancel()
            raise
        return pending


class Expiry:
    """One timer for publishes sent together (``Publisher.send(..., expiry=...)``): once
    ``timeout`` seconds have passed, each of their acks not yet answered fails with
    ``nats.errors.TimeoutError``, as its own timer would have failed it. A timer per publish
    (a handle made and cancelled each time) cost about 3 us of the scheduler's CPU per append.
    ``cancel()`` once the acks are all read. A publish sent with it once its timer has fired
    or been cancelled (a send that waited that long for the connection) is not taken: it gets
    a timer of its own, so that no ack is ever awaited without one."""

    __slots__ = ("_futures", "_open", "_timer")

    def __init__(self, timeout: float) -> None:
        self._futures: list[asyncio.Future[Reply]] = []
        self._open = True  # its timer has neither fired nor been cancelled
        self._timer = asyncio.get_running_loop().call_later(timeout, self._expire)

    def add(self, future: asyncio.Future[Reply]) -> bool:
        """Time ``future`` out with the others; False (not taken) once the timer is done."""
        if self._open:
            self._futures.append(future)
        return self._open

    def _expire(self) -> None:
        self._open = False
        for future in self._futures:
            _expire(future)
        self._futures.clear()

    def cancel(self) -> None:
        self._open = False
        self._timer.cancel()
        self._futures.clear()


class Pending:
    """A publish in flight: ``ack()`` waits for its acknowledgement, ``cancel()`` stops
    waiting (the message may still be stored)."""

    __slots__ = ("_future", "_key", "_publisher", "_timer")

    def __init__(
        self,
        publisher: Publisher,
        key: bytes,
        future: asyncio.Future[Reply],
        timer: asyncio.TimerHandle | None,
    ) -> None:
        self._publisher, self._key, self._future, self._timer = publisher, key, future, timer

    def on_answer(self, call: Callable[[bool], None]) -> None:
        """``call(stored)`` once the ack is in (or timed out, or waiting was cancelled):
        ``stored`` is whether it says the message was stored now (not a duplicate, not
        refused)."""

        def answered(future: asyncio.Future[Reply]) -> None:
            stored = False
            if not future.cancelled() and future.exception() is None:
                with contextlib.suppress(Exception):
                    stored = not _ack_of(*future.result()).duplicate
            call(stored)

        self._future.add_done_callback(answered)

    async def ack(self) -> api.PubAck:
        """The ack, as ``JetStreamContext.publish`` answers (see ``publish``)."""
        try:
            data, headers = await self._future
        finally:
            self.cancel()
        return _ack_of(data, headers)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._publisher._waiting.pop(self._key, None)
        if not self._future.done():
            self._future.cancel()


def _expire(future: asyncio.Future[Reply]) -> None:
    if not future.done():
        future.set_exception(nats.errors.TimeoutError())


def _ack_of(data: bytes, headers: bytes) -> api.PubAck:
    if headers and headers.startswith(NO_RESPONDERS):
        raise NoStreamResponseError
    ack = _ack_decoder.decode(data)
    if ack.error is not None:
        raise APIError.from_error(ack.error)
    return api.PubAck(stream=ack.stream, seq=ack.seq, domain=ack.domain, duplicate=ack.duplicate)


_publishers: weakref.WeakKeyDictionary[Client, Publisher] = weakref.WeakKeyDictionary()


def publisher(nc: Client) -> Publisher:
    """The connection's publisher (made on first use)."""
    found = _publishers.get(nc)
    if found is None:
        found = _publishers[nc] = Publisher(nc)
    return found


def publisher_of(js: JetStreamContext) -> Publisher:
    """The publisher of the connection behind ``js`` (for code that holds only a context)."""
    return publisher(js._nc)
