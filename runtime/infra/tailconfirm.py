"""Appends confirmed by the appender's own tail of the log instead of an ack message.

A process that tails the whole event log (a gateway, a scheduler; ``jetrun up`` holds both)
sees each of its own appends come back on its tail moments after it is stored. For such an
append the JetStream ack is one more message nats-server sends and the process parses, a
future resolved and a task woken, to learn what the tail tells anyway. ``TailConfirm.send``
publishes an append without a reply subject (nats-server then sends no ack) and ``Tailed.ack``
answers once the tail delivers it: the stream sequence it was stored at.

What an append that does not come back means, and how it is found out without waiting for
ever:
- nats-server handles one connection's publishes in the order they were sent, and the tail
  delivers the stream in order. So once the tail delivers an append that this connection
  sent later, every earlier one of its appends that the tail has not delivered was not
  stored by that publish: refused (a fenced decision, a stream limit), a duplicate of a
  message already stored (the same ``Nats-Msg-Id``), or lost on a connection that broke.
- An append that nothing later confirms or rules out this way is given up on after
  ``within_s`` (a refusal with no later append, a tail that lags or is down).
Either way its ``ack()`` raises ``NotSeen``: the caller makes the append again the acked way,
with the same message id, and the ack tells the outcome (a duplicate: stored before, at the
sequence it names; a refusal: its error, ``Fenced`` included; a lost one: stored now).

An append is matched to its delivery by subject and payload (a run's event subjects name the
run and the kind: another process's append on the same subject has another payload). While
one append is waiting on a subject, another on the same subject goes the acked way (``send``
returns None), as does every append while the tail is not running.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque

from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import api

from runtime.infra import jspub, pubframe
from runtime.infra.jspub import Pending

CONFIRM_WITHIN_S = 1.0  # an append the tail has not shown by then is asked about with an ack


class NotSeen(NatsTimeoutError):
    """The tail did not show a reply-less append: append it again with an ack (same id)."""


class _Entry:
    """One append waiting for the tail: a reply-less one (with a ``future`` its sender
    awaits), or an acked one that only marks its place in its connection's order."""

    __slots__ = ("data", "deadline", "future", "key", "line")

    def __init__(
        self,
        key: bytes,
        data: bytes,
        line: deque[_Entry],
        future: asyncio.Future[int] | None,
        deadline: float,
    ) -> None:
        self.key, self.data, self.line, self.future = key, data, line, future
        self.deadline = deadline


class TailConfirm:
    """The reply-less appends of one process whose tail of the whole log calls ``seen`` for
    every message it delivers. Not thread-safe: one event loop."""

    def __init__(self, within_s: float = CONFIRM_WITHIN_S) -> None:
        self.within_s = within_s
        self.active = False  # the tail is running: every append stored from now is delivered
        self._waiting: dict[bytes, _Entry] = {}  # by subject
        # per connection, its appends in the order they were sent
        self._lines: weakref.WeakKeyDictionary[Client, deque[_Entry]] = weakref.WeakKeyDictionary()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """The tail runs: appends may go without a reply from now on."""
        self._loop = asyncio.get_running_loop()
        self.active = True

    def stop(self) -> None:
        """The tail stopped: every append still waiting is asked about the acked way."""
        self.active = False
        for line in list(self._lines.values()):
            while line:
                self._not_seen(line.popleft())
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def send(
        self, nc: Client, subject: str, payload: bytes, headers: dict[str, str]
    ) -> Tailed | None:
        """Publish an append on ``nc`` without a reply; None (nothing sent) where it must go
        the acked way: the tail is not running, or an append on ``subject`` is waiting."""
        loop = self._loop
        if not self.active or loop is None or subject.encode() in self._waiting:
            return None
        command = pubframe.frame(subject, "", headers, payload)
        future: asyncio.Future[int] = loop.create_future()
        entry = self._enter(nc, subject, payload, future)
        try:
            await pubframe.send(nc, command, len(payload))
        except BaseException:
            self._drop(entry)
            raise
        return Tailed(self, entry, future)

    async def send_acked(
        self, nc: Client, subject: str, payload: bytes, headers: dict[str, str], timeout: float
    ) -> Pending:
        """Publish an append on ``nc`` with a reply (``jspub``), as the last of a burst of
        reply-less ones: the tail showing it rules out the earlier ones it has not shown, and
        an ack that says anything but "stored now" (a refusal, a duplicate, a timeout) has
        every earlier one not yet shown asked about at once (``NotSeen``), so that a burst
        whose acked message fails answers each of its appends without waiting."""
        publisher = jspub.publisher(nc)
        line = self._lines.get(nc)
        if not line or not self.active or self._loop is None or subject.encode() in self._waiting:
            # nothing of this connection waits for the tail (a pass of one decision): a plain
            # acked publish, no bookkeeping
            return await publisher.send(subject, payload, headers, timeout)
        marker = self._enter(nc, subject, payload, None)
        try:
            pending = await publisher.send(subject, payload, headers, timeout)
        except BaseException:
            self._abandon(marker)
            raise
        pending.on_answer(lambda stored: None if stored else self._abandon(marker))
        return pending

    def _enter(
        self, nc: Client, subject: str, payload: bytes, future: asyncio.Future[int] | None
    ) -> _Entry:
        loop = self._loop
        assert loop is not None
        line = self._lines.get(nc)
        if line is None:
            line = self._lines[nc] = deque()
        entry = _Entry(subject.encode(), payload, line, future, loop.time() + self.within_s)
        self._waiting[entry.key] = entry
        line.append(entry)
        if self._timer is None:
            self._timer = loop.call_at(entry.deadline, self._expire)
        return entry

    def seen(self, seq: int, subject: bytes, data: bytes) -> None:
        """The tail delivered ``data`` on ``subject``, stored at ``seq``."""
        if not self._waiting:
            return
        entry = self._waiting.get(subject)
        if entry is None or entry.data != data:
            return
        del self._waiting[subject]
        line = entry.line
        while line:  # sent before it on its connection, not delivered: not stored by it
            first = line.popleft()
            if first is entry:
                break
            self._not_seen(first)
        future = entry.future
        if future is not None and not future.done():
            future.set_result(seq)

    def _not_seen(self, entry: _Entry) -> None:
        if self._waiting.get(entry.key) is entry:
            del self._waiting[entry.key]
        future = entry.future
        if future is not None and not future.done():
            future.set_exception(NotSeen())

    def _drop(self, entry: _Entry) -> None:
        """Stop waiting for ``entry`` (its waiter left); it stays in its line, answered, so
        that it still marks where later appends of its connection were sent."""
        if self._waiting.get(entry.key) is entry:
            del self._waiting[entry.key]
        future = entry.future
        if future is not None and not future.done():
            future.cancel()

    def _abandon(self, marker: _Entry) -> None:
        """The acked ``marker`` was not stored now: every append sent before it on its
        connection and not yet shown is asked about the acked way (the server handled them
        before it: stored ones answer as duplicates)."""
        line = marker.line
        if marker not in line:  # the tail or the deadline answered them already
            return
        while line:
            first = line.popleft()
            self._not_seen(first)
            if first is marker:
                break

    def _expire(self) -> None:
        """Give up on the appends older than ``within_s``; the timer runs again at the next
        deadline while any append is waiting."""
        self._timer = None
        loop = self._loop
        if loop is None:
            return
        now, next_deadline = loop.time(), 0.0
        for line in list(self._lines.values()):
            while line and line[0].deadline <= now:
                self._not_seen(line.popleft())
            if line and (not next_deadline or line[0].deadline < next_deadline):
                next_deadline = line[0].deadline
        if next_deadline:
            self._timer = loop.call_at(next_deadline, self._expire)

    def waiting(self) -> int:
        """How many appends wait for the tail."""
        return len(self._waiting)


class Tailed:
    """A reply-less append in flight, with ``jspub.Pending``'s ways: ``ack()`` waits for the
    tail to show it (its sequence) or raises ``NotSeen``; ``cancel()`` stops waiting."""

    __slots__ = ("_confirm", "_entry", "_future")

    def __init__(self, confirm: TailConfirm, entry: _Entry, future: asyncio.Future[int]) -> None:
        self._confirm, self._entry, self._future = confirm, entry, future

    def answered(self) -> bool:
        return self._future.done()

    async def ack(self) -> api.PubAck:
        try:
            seq = await self._future
        finally:
            self._confirm._drop(self._entry)
        return api.PubAck(stream="", seq=seq, duplicate=False)

    def cancel(self) -> None:
        self._confirm._drop(self._entry)


__all__ = ["CONFIRM_WITHIN_S", "NotSeen", "TailConfirm", "Tailed"]
