"""How a throughput phase learns that its runs ended, and its runs/s from the events.

While the runs drain, the benchmark must not be a load of its own: reading every run's
``submitted`` and end as they are stored (2.4 NATS messages per run delivered to it, each parsed
in Python) cost nats-server and the machine CPU that the runs compete for. ``EndCounts`` learns
instead how many runs were submitted and how many ended from two pull consumers that nothing is
ever fetched from: nats-server keeps each one's count of pending messages as it stores the
log's messages (a counter per matching message), and asking is one request per consumer and
poll. Once every run ended, ``Span`` reads the phase's ``submitted`` and end events once, for
the figure (runs/s from the first submit to the last run's end, both as recorded in the events)
and for the check that every submitted run's end is in the log.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import anyio
import msgspec
from nats.js import JetStreamContext, api

from contracts.events import BATCHES, RunsEnded, decode_event
from runtime.infra.eventlog import kind_filters
from runtime.infra.streams import EVENTS_STREAM, TERMINAL_KINDS

SUBMITTED = kind_filters("submitted")
ENDS = [f for kind in TERMINAL_KINDS for f in kind_filters(kind)]
ENDED_RUNS = kind_filters(RunsEnded.kind)  # an agent's batches of ends: read, entries counted
POLL_S = 0.25
#: an abandoned counting consumer (the benchmark died) is removed after this
INACTIVE_S = 900.0


class _Ends(msgspec.Struct):
    ends: list[msgspec.Raw]


_count = msgspec.json.Decoder(_Ends)


@dataclass
class EndCounts:
    """Runs ``submitted`` and ended in the log from ``start_seq`` on, counted by nats-server
    (use ``async with``: the two consumers are removed when done)."""

    js: JetStreamContext
    start_seq: int
    names: tuple[str, str] = ("", "")
    batched: int = 0  # ends read in ``ended_runs`` batches so far
    batch_counter: str = ""  # a consumer of the batches nothing is fetched from
    _batches: JetStreamContext.PullSubscription | None = None

    async def __aenter__(self) -> EndCounts:
        names = []
        for filters in (SUBMITTED, ENDS):
            config = api.ConsumerConfig(
                name=f"bench-count-{uuid.uuid4().hex}",
                ack_policy=api.AckPolicy.NONE,
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=self.start_seq,
                filter_subjects=filters,
                inactive_threshold=INACTIVE_S,
                mem_storage=True,
            )
            info = await self.js.add_consumer(EVENTS_STREAM, config)
            names.append(info.name)
        self.names = (names[0], names[1])
        config = api.ConsumerConfig(
            ack_policy=api.AckPolicy.NONE,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self.start_seq,
            filter_subjects=ENDED_RUNS,
            inactive_threshold=INACTIVE_S,
            mem_storage=True,
        )
        self._batches = await self.js.pull_subscribe("", stream=EVENTS_STREAM, config=config)
        config.name = f"bench-count-{uuid.uuid4().hex}"
        self.batch_counter = (await self.js.add_consumer(EVENTS_STREAM, config)).name
        return self

    async def __aexit__(self, *exc: object) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            for name in (*self.names, self.batch_counter):
                await self.js.delete_consumer(EVENTS_STREAM, name)
            if self._batches is not None:
                await self._batches.unsubscribe()

    async def counts(self) -> tuple[int, int]:
        """(runs submitted, runs ended) since ``start_seq`` (an ``ended_runs`` batch: each of
        its ends; these batches are read, the other messages counted by nats-server)."""
        submitted, ended = [
            (await self.js.consumer_info(EVENTS_STREAM, name)).num_pending or 0
            for name in self.names
        ]
        while self._batches is not None:
            try:
                msgs = await self._batches.fetch(1024, timeout=0.05)
            except TimeoutError:
                break
            self.batched += sum(len(_count.decode(msg.data).ends) for msg in msgs)
        return submitted, ended + self.batched

    async def until_all_ended(self, timeout_s: float) -> int:
        """Waits until as many runs ended as were submitted (at least one); returns how many.
        Raises ``TimeoutError`` after ``timeout_s``. While the runs drain, nothing is read: the
        ``ended_runs`` batches are counted as messages (each holds two ends or more), and read
        for their exact count only once the counts stop moving."""
        last: tuple[int, int, int] | None = None
        with anyio.fail_after(timeout_s):
            while True:
                submitted, plain, batches = now = await self._pending()
                if submitted and plain + 2 * batches >= submitted:
                    return submitted
                if submitted and now == last:
                    counted, ended = await self.counts()
                    if ended >= counted:
                        return counted
                last = now
                await anyio.sleep(POLL_S)

    async def _pending(self) -> tuple[int, int, int]:
        """(runs submitted, plain ends, ``ended_runs`` batches) since ``start_seq``."""
        submitted, ended = [
            (await self.js.consumer_info(EVENTS_STREAM, name)).num_pending or 0
            for name in self.names
        ]
        info = await self.js.consumer_info(EVENTS_STREAM, self.batch_counter)
        return submitted, ended, info.num_pending or 0


@dataclass
class Span:
    """The runs submitted after ``since`` (wall clock) from ``next_seq`` on: when each was
    submitted and when each ended, from the events' own timestamps, read through one consumer
    of the ``submitted`` and terminal events only, each event once."""

    since: float
    next_seq: int
    first: dict[str, float] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)
    _sub: JetStreamContext.PullSubscription | None = None

    @property
    def all_ended(self) -> bool:
        return bool(self.first) and self.first.keys() <= self.last.keys()

    def runs_per_s(self) -> float:
        """Runs that ended, over the time from the first submit to the last end."""
        return len(self.last) / (max(self.last.values()) - min(self.first.values()))

    async def read(self, js: JetStreamContext) -> None:
        """What was stored since the last read."""
        if self._sub is None:
            config = api.ConsumerConfig(
                ack_policy=api.AckPolicy.NONE,
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=self.next_seq,
                filter_subjects=[*SUBMITTED, *ENDS, *ENDED_RUNS],
                inactive_threshold=30.0,
                mem_storage=True,
            )
            self._sub = await js.pull_subscribe("", stream=EVENTS_STREAM, config=config)
        while True:
            try:
                msgs = await self._sub.fetch(1024, timeout=0.5)
            except TimeoutError:  # nats-py raises its own or asyncio's (both TimeoutError)
                return
            for msg in msgs:
                batch = decode_event(msg.data)
                for event in batch.each() if isinstance(batch, BATCHES) else (batch,):
                    if event.kind == "submitted" and event.at >= self.since:
                        self.first[event.run_id] = event.at
                    elif event.kind in TERMINAL_KINDS and event.run_id in self.first:
                        self.last[event.run_id] = event.at

    async def read_all(self, js: JetStreamContext, runs: int, timeout_s: float = 60.0) -> None:
        """Reads until ``runs`` runs were submitted and every one of them ended in the log.
        Raises ``TimeoutError`` (naming what is missing) after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            await self.read(js)
            if len(self.first) >= runs and self.all_ended:
                return
            if time.monotonic() > deadline:
                missing = len(self.first.keys() - self.last.keys())
                raise TimeoutError(
                    f"{len(self.first)} runs submitted (of {runs} counted), {missing} with "
                    "no end in the log"
                )
            await anyio.sleep(POLL_S)
