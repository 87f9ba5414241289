"""JetStream publishes with acknowledgement, at about half the client CPU of nats-py's own.

``publish(nc, subject, payload, headers, timeout)`` answers exactly as
``JetStreamContext.publish`` does (a ``PubAck``; ``APIError`` subclasses for an error reply,
``NoStreamResponseError`` when no stream listens, ``nats.errors.TimeoutError`` after
``timeout``), over the same protocol. What it saves, per publish: the random token bytes (a
``getrandom`` call) and the done callback of nats-py's request, ``asyncio.wait_for``'s wrapper,
and the ack's ``json.loads`` plus dataclass building (msgspec decodes it). Replies arrive on
one wildcard subscription per connection, under the connection's own inbox prefix (so a
role's inbox permissions hold), and tokens come from a counter. Concurrent publishes share
the connection's flushes, as before.

The reply subscription is made with nats-py's ``future=`` (its request path): the reader hands
each ack to ``_Replies.set_result`` as it parses it, where a ``cb`` subscription queues it for a
task of its own, one more step of the loop per ack before its publish hears of it.
"""

from __future__ import annotations

import asyncio
import itertools
import weakref
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import APIError, NoStreamResponseError

NO_RESPONDERS = "503"


class _Ack(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool | None = None
    domain: str | None = None
    error: dict[str, Any] | None = None


_ack_decoder = msgspec.json.Decoder(_Ack)


class Publisher:
    """One connection's acknowledged publishes. Safe to share within its event loop."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self._prefix = ""
        self._tokens = itertools.count()
        self._waiting: dict[str, asyncio.Future[Msg]] = {}
        self._subscribing: asyncio.Lock | None = None

    async def _replies(self) -> str:
        if self._prefix:
            return self._prefix
        if self._subscribing is None:
            self._subscribing = asyncio.Lock()
        async with self._subscribing:
            if not self._prefix:
                prefix = self.nc.new_inbox() + "."
                await self.nc.subscribe(prefix + "*", future=_Replies(self._waiting))
                self._prefix = prefix
        return self._prefix

    async def publish(
        self, subject: str, payload: bytes, headers: dict[str, str] | None, timeout: float
    ) -> api.PubAck:
        """Publish to a stream's subject and wait (up to ``timeout`` seconds) for its ack."""
        return await (await self.send(subject, payload, headers, timeout)).ack()

    async def send(
        self, subject: str, payload: bytes, headers: dict[str, str] | None, timeout: float
    ) -> Pending:
        """Publish to a stream's subject; its ack is awaited later (``Pending.ack``), so that
        several publishes can be in flight from one task. Whoever gets a ``Pending`` either
        awaits its ack or cancels it."""
        reply = f"{await self._replies()}{next(self._tokens)}"
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Msg] = loop.create_future()
        self._waiting[reply] = future
        pending = Pending(self, reply, future, loop.call_later(timeout, _expire, future))
        try:
            await self.nc.publish(subject, payload, reply=reply, headers=headers)
        except BaseException:
            pending.cancel()
            raise
        return pending


class _Replies(asyncio.Future[Msg]):
    """The receiver of a publisher's acks. nats-py calls ``set_result(msg)`` of a subscription's
    ``future`` for every message it parses on it (it never completes this one), so each ack
    reaches the future of its publish from the reader itself, with no task in between."""

    def __init__(self, waiting: dict[str, asyncio.Future[Msg]]) -> None:
        super().__init__()
        self._waiting = waiting

    def set_result(self, result: Msg) -> None:
        future = self._waiting.pop(result.subject, None)
        if future is not None and not future.done():
            future.set_result(result)


class Pending:
    """A publish in flight: ``ack()`` waits for its acknowledgement, ``cancel()`` stops
    waiting (the message may still be stored)."""

    __slots__ = ("_future", "_publisher", "_reply", "_timer")

    def __init__(
        self,
        publisher: Publisher,
        reply: str,
        future: asyncio.Future[Msg],
        timer: asyncio.TimerHandle,
    ) -> None:
        self._publisher, self._reply, self._future, self._timer = publisher, reply, future, timer

    async def ack(self) -> api.PubAck:
        """The ack, as ``JetStreamContext.publish`` answers (see ``publish``)."""
        try:
            msg = await self._future
        finally:
            self.cancel()
        return _ack_of(msg)

    def cancel(self) -> None:
        self._timer.cancel()
        self._publisher._waiting.pop(self._reply, None)
        if not self._future.done():
            self._future.cancel()


def _expire(future: asyncio.Future[Msg]) -> None:
    if not future.done():
        future.set_exception(nats.errors.TimeoutError())


def _ack_of(msg: Msg) -> api.PubAck:
    if msg.headers and msg.headers.get(api.Header.STATUS) == NO_RESPONDERS:
        raise NoStreamResponseError
    ack = _ack_decoder.decode(msg.data)
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
