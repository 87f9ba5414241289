"""One tail of the event log for the readers of one process.

A gateway and a scheduler each keep a ``RunIndex`` of the whole log. Apart, each has its own
ordered consumer: nats-server delivers every event twice, and the process parses and decodes it
twice. In one process (``jetrun up``) they share a ``LogFeed``: one consumer, each event decoded
once and handed to every reader in log order, the indexes positioned at the same sequence. A
reader's callbacks are plain functions that apply the event to its index: the connection's
reader calls them as each message arrives, no coroutine or task per event (``EventLog.follow``).
Two readers may also share one index (``jetrun up``: the gateway and the scheduler hold one
``RunIndex``): it is then fed once, through the callbacks of the reader that joined first. A
component that is alone in its process gets a feed of its own, so the code is the same either
way.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import anyio

from contracts.events import AnyEvent
from runtime.control.views import RunViews, start_position
from runtime.infra.eventlog import Apply, EventLog, Skip
from runtime.infra.guard import Guard
from runtime.infra.ordered import OrderedTail
from runtime.infra.projection import RunIndex
from runtime.infra.tailconfirm import TailConfirm


@dataclass(frozen=True)
class Position:
    start: int  # the first sequence read
    target: int  # the last sequence stored when reading began: caught up once applied


@dataclass(frozen=True)
class _Reader:
    index: RunIndex
    on_event: Apply
    on_skipped: Skip


class LogFeed:
    """Join every reader before the first ``start()``. Not thread-safe; one event loop."""

    def __init__(self, log: EventLog, views: RunViews) -> None:
        self.log, self.views = log, views
        self._readers: list[_Reader] = []
        self._position: Position | None = None
        self._starting = anyio.Lock()
        self._sub: OrderedTail | None = None
        self._active = 0
        # the appends of this process's components that the feed will show go without a
        # reply: the feed confirms them (``runtime.infra.tailconfirm``; ``confirm_appends``)
        self.confirm = TailConfirm()

    def confirm_appends(self, log: EventLog) -> None:
        """Have ``log``'s ``send`` and ``record`` confirmed by this feed, not by acks."""
        log.tail_confirm = self.confirm

    def join(self, index: RunIndex, on_event: Apply, on_skipped: Skip) -> None:
        """Feed ``index`` (through ``on_event``/``on_skipped``, which must not raise: wrap them
        in the component's ``Guard``). An index another reader joined with is fed once, through
        that reader's callbacks. Raises ``RuntimeError`` once the feed has started."""
        if self._position is not None:
            raise RuntimeError("a reader joined a log feed that had already started")
        if any(reader.index is index for reader in self._readers):
            return
        self._readers.append(_Reader(index, on_event, on_skipped))

    def join_guarded(self, index: RunIndex, guard: Guard) -> None:
        """``join`` with ``index``'s own apply and skip, each wrapped in ``guard`` (a failure
        stops that component, not the tail)."""
        tail = guard.wrap_sync
        self.join(index, tail("event-log tail", index.apply), tail("event-log tail", index.skip))

    async def start(self) -> Position:
        """Position every reader's index and start the one consumer; idempotent (a later
        caller gets the same position). Each call is matched by one ``leave()``."""
        async with self._starting:
            if self._position is None:
                begin, target = await start_position(self.log.js, self.views)
                for reader in self._readers:
                    reader.index.start_at(begin - 1)
                on_event: Apply = self._on_event
                on_skipped: Skip = self._on_skipped
                if len(self._readers) == 1:  # straight to the one reader
                    on_event, on_skipped = self._readers[0].on_event, self._readers[0].on_skipped
                self._sub = await self.log.follow(
                    on_event, on_skipped, from_seq=begin, confirm=self.confirm
                )
                self.confirm.start()
                self._position = Position(begin, target)
            self._active += 1
            return self._position

    async def leave(self) -> None:
        """A reader is done; the last one stops the consumer."""
        self._active -= 1
        if self._active <= 0 and self._sub is not None:
            self.confirm.stop()
            sub, self._sub = self._sub, None
            with contextlib.suppress(Exception):  # the connection may be gone
                await sub.unsubscribe()

    def _on_event(self, seq: int, event: AnyEvent) -> None:
        for reader in self._readers:
            reader.on_event(seq, event)

    def _on_skipped(self, seq: int) -> None:
        for reader in self._readers:
            reader.on_skipped(seq)
