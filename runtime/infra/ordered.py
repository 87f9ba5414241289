"""Ordered push consumers whose messages reach the handler from the connection's reader.

What ``JetStreamContext.subscribe(ordered_consumer=True, idle_heartbeat=...)`` gives, at less
CPU per message. nats-py, per message of such a subscription: parses every header line in
Python (an event carries three: ~9 µs, the largest part), builds a ``Msg``, reads the ack
subject twice (sequence check, flow-control tracking), then an ``asyncio.Queue`` put and get
and, when the subscription's task was idle, a wake-up of that task one loop step later; the
handler reads the ack subject a third time. Here:

- The reader hands a message of this consumer straight to ``OrderedTail`` with its raw bytes
  (``Connection`` replaces the client's ``_process_msg`` by one that first looks the
  subscription id up among its tails): headers are parsed only for a status message (a
  heartbeat, a flow-control request), no ``Msg`` is built, the ack subject is split once and
  the handler gets ``(stream sequence, subject, payload)``.
- The handler's coroutine is started there, inline. A handler that finishes without
  suspending (most do) costs no task and no queue; a plain function (it returns None: the
  readers that apply each event to an index) not even a coroutine. One that suspends is
  continued by the tail's own task, and every message that arrives meanwhile waits in a
  deque behind it: handlers run one at a time, in log order. While a handler runs inline,
  the tail's task is made the current task (as Python 3.12's eager tasks do), so code that
  looks at ``asyncio.current_task()`` (anyio's locks and cancel scopes) sees the same task
  before and after a suspension.
- Sequences: a consumer sequence that is not the next one expected (a message lost on the way,
  a consumer the server no longer has) recreates the consumer from the stream sequence after
  the last one received, under a new deliver subject, as nats-py does; so do two
  idle-heartbeat intervals without a message (a server restart) and a heartbeat naming a last
  consumer sequence other than ours. No sequence reaches the handler twice or is skipped.
- Flow control: the server stops sending until its flow-control request is answered. The
  answer goes out once every message received before the request has been handled, so a slow
  handler holds back the server instead of filling this process's memory (nats-py's ``cb=``
  path answers as soon as the messages are received).
- A handler that raises: the exception goes to the connection's error callback and the next
  message is handled, as with nats-py.

nats-py internals relied on (it is pinned in constraints.txt; tests/test_ordered.py fails if
they change): the reader calls ``client._process_msg(sid, subject, reply, payload, headers)``
(bytes, headers raw or empty) looked up on the instance; ``Client._process_headers``,
``Client._error_cb``, ``Client.stats``, ``Subscription._id``; a subscription made with
``future=`` is resubscribed after a reconnect. From asyncio: ``tasks._enter_task`` and
``tasks._leave_task``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import weakref
from asyncio.tasks import _enter_task, _leave_task
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Generator
from dataclasses import replace
from typing import Any

from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api

from runtime.infra import natsparse

log = logging.getLogger("jetrun.ordered")

# (stream seq, subject, payload); a handler that returns None (a plain function) is done
TailHandler = Callable[[int, bytes, bytes], Awaitable[None] | None]

_STATUS_LINE = b"NATS/1.0 "  # a status message: "NATS/1.0 100 Idle Heartbeat\r\n..."
LAST_CONSUMER = "Nats-Last-Consumer"
CONSUMER_STALLED = "Nats-Consumer-Stalled"


def ack_tokens(reply: bytes) -> tuple[int, int] | None:
    """``(stream sequence, consumer sequence)`` of a delivered message's ack subject
    (``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ts>.<pending>``, or the form with
    a domain and an account hash and a token at the end); None for anything else."""
    tokens = reply.split(b".")
    n = len(tokens)
    at = 5 if n == 9 else 7 if n >= 11 else 0
    if not at or tokens[0] != b"$JS" or tokens[1] != b"ACK":
        return None
    if not (tokens[at].isdigit() and tokens[at + 1].isdigit()):
        return None
    return int(tokens[at]), int(tokens[at + 1])


class Connection:
    """A client's tails, and its other subscriptions whose messages go raw to a function
    (``receivers``: ``runtime.infra.jspub``'s acks get ``(subject, payload, raw headers)``),
    by subscription id; made once per client (``of``)."""

    _made: weakref.WeakKeyDictionary[Client, Connection] = weakref.WeakKeyDictionary()

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.tails: dict[int, OrderedTail] = {}
        self.receivers: dict[int, Callable[[bytes, bytes, bytes], None]] = {}
        self._process_msg = nc._process_msg
        nc._process_msg = self.process_msg  # type: ignore[method-assign]
        natsparse.install(nc, self.dispatch, self.takes)

    @classmethod
    def of(cls, nc: Client) -> Connection:
        found = cls._made.get(nc)
        if found is None:
            found = cls._made[nc] = cls(nc)
        return found

    def takes(self, sid: int) -> bool:
        """Whether ``dispatch`` takes subscription ``sid``'s messages (a tail's status
        messages excepted)."""
        return sid in self.tails or sid in self.receivers

    def dispatch(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> bool:
        """``process_msg`` without a coroutine, for the parser (``natsparse``): a message of
        a tail or a receiver; False (not taken) for a status message or another
        subscription's, which ``process_msg`` handles."""
        tail = self.tails.get(sid)
        if tail is None:
            receiver = self.receivers.get(sid)
            if receiver is None:
                return False
            stats = self.nc.stats
            stats["in_msgs"] += 1
            stats["in_bytes"] += len(data)
            receiver(subject, data, headers)
            return True
        if headers and not data and headers.startswith(_STATUS_LINE):
            return False
        stats = self.nc.stats
        stats["in_msgs"] += 1
        stats["in_bytes"] += len(data)
        tail.on_message(sid, subject, reply, data)
        return True

    async def process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes
    ) -> None:
        """nats-py's way in (a parser that is not ``natsparse``'s, or a message ``dispatch``
        did not take): a tail's status message, or another subscription's message."""
        if self.dispatch(sid, subject, reply, data, headers):
            return
        tail = self.tails.get(sid)
        if tail is None:
            await self._process_msg(sid, subject, reply, data, headers)
            return
        stats = self.nc.stats
        stats["in_msgs"] += 1
        stats["in_bytes"] += len(data)
        tail.on_status(sid, reply, await self.nc._process_headers(headers) or {})


class OrderedTail:
    """An ordered push consumer on ``stream`` from ``config``'s filter and start sequence,
    each message handed to ``handler(stream seq, subject, payload)``. ``start()`` creates it,
    ``unsubscribe()`` stops it. One event loop."""

    def __init__(
        self,
        js: JetStreamContext,
        stream: str,
        config: api.ConsumerConfig,
        handler: TailHandler,
        *,
        idle_heartbeat: float = 1.0,
    ) -> None:
        self.js, self.nc = js, js._nc
        self.stream, self.handler = stream, handler
        self.idle_heartbeat = idle_heartbeat
        self._config = replace(
            config,
            ack_policy=api.AckPolicy.NONE,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            flow_control=True,
            idle_heartbeat=idle_heartbeat,
            max_deliver=1,
            ack_wait=22 * 3600,
            num_replicas=1,
            mem_storage=True,
        )
        self.last_seq = (config.opt_start_seq or 1) - 1  # the last stream sequence received
        self.consumer = ""  # the current consumer's name
        self.resets = 0  # how many times the consumer was recreated
        self._connection = Connection.of(self.nc)
        self._sub: Subscription | None = None
        self._sid = 0  # the current subscription; 0 while the consumer is being recreated
        self._next_dseq = 1
        self._active = True
        self._closed = False
        self._recreating = False
        self._waiting: deque[tuple[int, bytes, bytes]] = deque()
        self._busy = False  # a handler suspended: the task continues it, then the deque
        self._received = 0  # messages received (on any consumer of this tail)
        self._handled = 0
        self._flow: deque[tuple[int, str]] = deque()  # (messages received before it, subject)
        self._context = contextvars.copy_context()
        self._handoff: asyncio.Future[Coroutine[Any, Any, None]] | None = None
        self._yielded: Any = None
        self._task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()

    async def start(self) -> OrderedTail:
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._deliver(), context=self._context)
        await asyncio.sleep(0)  # the task now waits for its first hand-off
        try:
            await self._subscribe()
            info = await self.js._jsm.add_consumer(self.stream, config=self._next_config())
        except BaseException:
            await self.unsubscribe()
            raise
        self.consumer = info.name
        self._spawn(self._activity())
        return self

    async def unsubscribe(self) -> None:
        """Stop: no handler starts after this; one that is running is cancelled."""
        self._closed = True
        self._sid = 0  # nothing more is taken from the reader
        for task in (self._task, *self._background):
            if task is not None:
                task.cancel()
        self._waiting.clear()
        if self._sub is not None:
            sub, self._sub = self._sub, None
            self._connection.tails.pop(sub._id, None)
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    # --- the consumer ------------------------------------------------------------------------

    def _next_config(self) -> api.ConsumerConfig:
        assert self._sub is not None
        config = self._config
        config.deliver_subject = self._sub.subject
        config.opt_start_seq = self.last_seq + 1
        return replace(config)  # a copy (a ``NamedEachTime`` config takes a new name)

    async def _subscribe(self) -> None:
        old = self._sub
        # ``future=``: nats-py keeps it (resubscribed after a reconnect) but never calls it
        sub = await self.nc.subscribe(self.nc.new_inbox(), future=asyncio.Future())
        self._sub, self._sid, self._next_dseq = sub, sub._id, 1
        self._connection.tails[sub._id] = self
        if old is not None:
            self._connection.tails.pop(old._id, None)
            with contextlib.suppress(Exception):
                await old.unsubscribe()

    def _reset(self) -> None:
        """Recreate the consumer from the message after the last one received."""
        if self._closed or self._recreating:
            return
        self._recreating = True
        self.resets += 1
        self._sid = 0  # what the old consumer still sends is dropped
        self._spawn(self._recreate())

    async def _recreate(self) -> None:
        try:
            await self._subscribe()
            if self._closed:  # unsubscribed meanwhile
                await self.unsubscribe()
                return
            info = await self.js._jsm.add_consumer(self.stream, config=self._next_config())
            self.consumer = info.name
        except Exception as err:  # tried again after two heartbeat intervals without one
            await self.nc._error_cb(err)
        finally:
            self._recreating = False

    async def _activity(self) -> None:
        while True:
            await asyncio.sleep(self.idle_heartbeat * 2)
            if self.nc.is_closed:
                return
            if not self._active:
                self._reset()
            self._active = False

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- messages, from the reader -----------------------------------------------------------

    def on_message(self, sid: int, subject: bytes, reply: bytes, data: bytes) -> None:
        if sid != self._sid:
            return  # from a consumer replaced since
        self._active = True
        found = ack_tokens(reply)
        if found is None:
            return
        seq, dseq = found
        if dseq != self._next_dseq:
            self._reset()
            return
        self._next_dseq = dseq + 1
        if seq <= self.last_seq:  # not from this consumer's start on: never twice
            return
        self.last_seq = seq
        self._received += 1
        if self._busy:
            self._waiting.append((seq, subject, data))
        else:
            self._inline(seq, subject, data)

    def on_status(self, sid: int, reply: bytes, headers: dict[str, str]) -> None:
        if sid != self._sid or headers.get(api.Header.STATUS) != "100":
            return
        self._active = True
        description = headers.get(api.Header.DESCRIPTION, "")
        if description.startswith("Flow") and reply:
            self._flow.append((self._received, reply.decode()))
        elif description.startswith("Idle"):
            stalled = headers.get(CONSUMER_STALLED)
            if stalled:
                self._flow.append((self._received, stalled))
            last = headers.get(LAST_CONSUMER)
            if last is not None and last.isdigit() and int(last) != self._next_dseq - 1:
                self._reset()
        self._answer_flow()

    def _answer_flow(self) -> None:
        """Answer each flow-control request whose earlier messages are all handled."""
        while self._flow and self._flow[0][0] <= self._handled:
            _, subject = self._flow.popleft()
            self._spawn(self._publish_empty(subject))

    async def _publish_empty(self, subject: str) -> None:
        with contextlib.suppress(Exception):  # not connected: the server asks again
            await self.nc.publish(subject)

    # --- handlers ----------------------------------------------------------------------------

    def _inline(self, seq: int, subject: bytes, data: bytes) -> None:
        """Start the handler here; if it suspends, the tail's task continues it."""
        task = self._task
        assert task is not None
        try:
            coro = self.handler(seq, subject, data)
        except Exception as err:  # a plain function that raised
            self._failed(err)
            self._done()
            return
        if coro is None:  # a plain function: done
            self._done()
            return
        if not isinstance(coro, Coroutine):  # another awaitable: the task awaits it
            self._hand_off(_awaiting(coro), None)
            return
        loop = asyncio.get_running_loop()
        reader = asyncio.current_task(loop)
        if reader is not None:
            _leave_task(loop, reader)
        _enter_task(loop, task)
        try:
            yielded = self._context.run(coro.send, None)
        except StopIteration:
            self._done()
            return
        except asyncio.CancelledError:  # it cancelled itself: as with nats-py, the tail stops
            self._closed, self._sid = True, 0
            return
        except Exception as err:
            self._failed(err)
            self._done()
            return
        finally:
            _leave_task(loop, task)
            if reader is not None:
                _enter_task(loop, reader)
        self._hand_off(coro, yielded)

    def _hand_off(self, coro: Coroutine[Any, Any, None], yielded: Any) -> None:
        self._busy = True
        self._yielded = yielded
        assert self._handoff is not None and not self._handoff.done()
        self._handoff.set_result(coro)

    def _done(self) -> None:
        self._handled += 1
        if self._flow:
            self._answer_flow()

    def _failed(self, err: Exception) -> None:
        self._spawn(self._report(err))

    async def _report(self, err: Exception) -> None:
        await self.nc._error_cb(err)

    async def _deliver(self) -> None:
        """The tail's task: continues a handler that suspended, then handles what waited."""
        loop = asyncio.get_running_loop()
        while True:
            self._handoff = loop.create_future()
            coro = await self._handoff
            try:
                await _Resume(coro, self._yielded)
            except Exception as err:
                self._failed(err)
            self._done()
            while self._waiting:
                seq, subject, data = self._waiting.popleft()
                try:
                    pending = self.handler(seq, subject, data)
                    if pending is not None:
                        await pending
                except Exception as err:
                    self._failed(err)
                self._done()
            self._busy = False


async def _awaiting(awaitable: Awaitable[None]) -> None:
    await awaitable


class _Resume:
    """Awaiting it continues a coroutine that was started elsewhere and suspended on
    ``yielded`` (what it passed up to the task running it: a future, or None for a bare
    yield), as if this task had run it from the start."""

    __slots__ = ("coro", "yielded")

    def __init__(self, coro: Coroutine[Any, Any, None], yielded: Any) -> None:
        self.coro, self.yielded = coro, yielded

    def __await__(self) -> Generator[Any, Any, None]:
        coro, value = self.coro, self.yielded
        while True:
            try:
                sent = yield value
            except BaseException as exc:  # the task was cancelled: so is the handler
                try:
                    value = coro.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    value = coro.send(sent)
                except StopIteration:
                    return
