"""The event log: one JetStream stream holding every run event, the source of truth.

Where each event goes (its subject) and the filters that read them are in
``runtime.infra.event_subjects`` (re-exported here). Every append carries ``Nats-Msg-Id`` =
``event.message_id()``, so a retried append inside the stream's duplicate window is recorded
once.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api
from nats.js.errors import (
    NotFoundError,
)

from contracts.events import (
    AnyEvent,
    Event,
    RunRestated,
    RunSubmitted,
    decode_event,
    encode_event,
)
from contracts.machine import fold, restated_record
from contracts.run import RunRecord
from runtime.infra import jspub, streams, tailconfirm
from runtime.infra.event_subjects import (
    ALL_EVENTS,
    agent_dispatches,
    callback_ends,
    dispatch_subject,
    event_subject,
    kind_filters,
    kind_subjects,
    on_its_subject,
    run_subjects,
    subject_of,
)
from runtime.infra.jsretry import RETRYABLE, retrying
from runtime.infra.ordered import OrderedTail, TailHandler, ack_tokens
from runtime.infra.run_batches import with_batches
from runtime.infra.streams import EVENTS_STREAM
from runtime.infra.streamsetup import ensure_stream, require_stream

log = logging.getLogger("jetrun.eventlog")

# with the subject names of ``runtime.infra.event_subjects``, which the log's callers use
__all__ = [
    "ALL_EVENTS",
    "PUBLISH_TIMEOUT_S",
    "Appended",
    "Apply",
    "EventLog",
    "Fencing",
    "Handler",
    "LogSettings",
    "NamedEachTime",
    "Skip",
    "SkipHandler",
    "Stored",
    "ack_sequences",
    "agent_dispatches",
    "callback_ends",
    "dispatch_subject",
    "event_subject",
    "kind_filters",
    "kind_subjects",
    "last_event_of_kind",
    "on_its_subject",
    "run_subjects",
    "stream_seq",
    "subject_of",
    "submission_of",
]


_PREFIX = ALL_EVENTS[:-1]  # "jetrun.ev."
PUBLISH_TIMEOUT_S = 5.0  # one try of an append; ``retrying`` repeats it until its deadline


@dataclass(frozen=True)
class LogSettings:
    replicas: int = 1
    duplicate_window_s: float = 600.0
    max_age_s: float = 0.0  # 0 keeps events for ever
    append_deadline_s: float = 60.0  # how long an append keeps retrying through outages
    setup_deadline_s: float = 120.0  # how long creating streams may take (cluster elections)


class Fencing(NamedTuple):
    """Store an append only if the last message on ``subject`` is still at ``seq`` (0: there
    is none); the server refuses it otherwise (err 10071). See ``runtime.infra.fence``."""

    subject: str
    seq: int


class Appended(NamedTuple):
    seq: int
    duplicate: bool


class Stored(NamedTuple):
    seq: int
    event: AnyEvent


Handler = Callable[[int, AnyEvent], Awaitable[None]]
SkipHandler = Callable[[int], Awaitable[None]]
Apply = Callable[[int, AnyEvent], None]  # ``follow``'s handlers: plain functions
Skip = Callable[[int], None]


class EventLog:
    """Append, read back and tail run events. Safe to share within one process."""

    def __init__(self, nc: Client, settings: LogSettings | None = None) -> None:
        self.nc = nc
        self.js = nc.jetstream(timeout=PUBLISH_TIMEOUT_S)
        self.settings = settings or LogSettings()
        self._publisher = jspub.publisher(nc)
        # this process's tail of the whole log, where it has one (``LogFeed``): ``send`` and
        # ``record`` go without a reply and are confirmed by it (``runtime.infra.tailconfirm``)
        self.tail_confirm: tailconfirm.TailConfirm | None = None

    def stream_config(self) -> api.StreamConfig:
        s = self.settings
        return streams.events_config(
            replicas=s.replicas, duplicate_window_s=s.duplicate_window_s, max_age_s=s.max_age_s
        )

    async def ensure(self) -> None:
        """Create the stream if it is missing (see ``runtime.infra.streams`` for what an existing
        stream gets). Idempotent. Needs the admin role."""
        await ensure_stream(self.js, self.stream_config(), self.settings.setup_deadline_s)

    async def require(self) -> None:
        """Wait until the stream exists (``jetrun setup`` creates it)."""
        await require_stream(self.js, EVENTS_STREAM, self.settings.setup_deadline_s)

    async def append(
        self,
        event: Event,
        *,
        expect_last_seq: int | None = None,
        fencing: Fencing | None = None,
        payload: bytes | None = None,
        callback: bool = False,
    ) -> Appended:
        """Append ``event``; blocks until the server has stored it. Idempotent for the duplicate
        window. Retries through outages for ``append_deadline_s``, then raises. With
        ``fencing`` (or ``expect_last_seq``: the run's last event) the server stores it only
        if that subject's last message is still the one expected. ``payload``: the event
        already encoded (``encode_event(event)``), for a caller that measured it.
        ``callback``: the run has a callback URL (a terminal event then goes where the webhook
        outbox reads it)."""
        if expect_last_seq is not None:
            fencing = Fencing(run_subjects(event.run_id), expect_last_seq)
        subject, data, headers = _message(event, fencing, payload, callback)
        publisher = self._publisher

        async def publish() -> api.PubAck:
            return await publisher.publish(subject, data, headers, PUBLISH_TIMEOUT_S)

        ack = await retrying(f"append {subject}", publish, self.settings.append_deadline_s)
        return Appended(ack.seq, bool(ack.duplicate))

    async def record(self, event: Event) -> Appended:
        """``append(event)``, confirmed by this process's tail where it has one (no ack
        message): an append the tail does not show (``tailconfirm.NotSeen``) is made again the
        acked way, whose answer tells the outcome (``append``'s)."""
        confirm = self.tail_confirm
        if confirm is not None and confirm.active:
            subject, data, headers = _message(event, None, None)
            try:
                tailed = await confirm.send(self.nc, subject, data, headers)
                if tailed is not None:
                    return Appended((await tailed.ack()).seq, False)
            except RETRYABLE:  # not seen (``NotSeen`` is one), or not sent: the acked way tells
                pass
        return await self.append(event)

    async def send(
        self,
        event: Event,
        *,
        fencing: Fencing | None = None,
        callback: bool = False,
        expiry: jspub.Expiry | None = None,
        payload: bytes | None = None,
        last: bool = True,
    ) -> jspub.Pending | tailconfirm.Tailed:
        """The first try of ``append(event, fencing=fencing, callback=callback)``, its ack
        awaited later (``Pending.ack()``), so that one task can have many appends in flight. No
        retry: after an outage the caller calls ``append`` (the same message id: stored once).
        ``expiry``: appends sent together time out together (``jspub.Expiry``). ``payload``: as
        for ``append``.

        Where this process tails the whole log (``tail_confirm``), an append that is not the
        ``last`` of the appends sent together goes without a reply and the tail confirms it:
        its ``ack()`` raises ``tailconfirm.NotSeen`` (a retryable timeout) for one the tail
        does not show, which the caller appends again as after an outage. The last one is
        acked, and its answer settles the ones before it (``TailConfirm.send_acked``)."""
        subject, data, headers = _message(event, fencing, payload, callback)
        confirm = self.tail_confirm
        if confirm is not None and confirm.active:
            if last:
                return await confirm.send_acked(self.nc, subject, data, headers, PUBLISH_TIMEOUT_S)
            tailed = await confirm.send(self.nc, subject, data, headers)
            if tailed is not None:
                return tailed
        return await self._publisher.send(subject, data, headers, PUBLISH_TIMEOUT_S, expiry)

    async def read(self, run_id: str) -> list[Stored]:
        """Every event of one run, in log order."""
        return await self.read_subject(run_subjects(run_id))

    async def read_subject(self, subject: str | list[str], start_seq: int = 1) -> list[Stored]:
        """Every event on ``subject`` (or on any of a list of subjects) from ``start_seq``, in
        log order."""
        stored: list[Stored] = []
        config = api.ConsumerConfig(
            ack_policy=api.AckPolicy.NONE,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start_seq,
            inactive_threshold=30.0,
            mem_storage=True,
        )
        if isinstance(subject, list):
            config.filter_subjects, subject = subject, ""
        psub = await self.js.pull_subscribe(subject, stream=EVENTS_STREAM, config=config)
        info = await psub.consumer_info()
        try:
            pending = info.num_pending or 0
            while len(stored) < pending:
                batch = await psub.fetch(min(pending - len(stored), 1024), timeout=5.0)
                for msg in batch:
                    event = _decode(msg)
                    if event is not None:
                        stored.append(Stored(msg.metadata.sequence.stream, event))
                    else:
                        pending -= 1
        finally:
            await psub.unsubscribe()
            with contextlib.suppress(Exception):  # else it lingers until inactive_threshold
                await self.js.delete_consumer(EVENTS_STREAM, info.name)
        return stored

    async def load(self, run_id: str) -> RunRecord:
        """The run folded from its events (``history``, batches read only if its own events
        leave it unended); state ``unknown`` if it has none."""
        own = await self.read(run_id)
        run = fold((s.event for s in own), run_id=run_id)
        if not own or run.state.is_terminal:
            return run
        return fold((s.event for s in await with_batches(self, run_id, own)), run_id=run_id)

    async def history(self, run_id: str) -> list[Stored]:
        """Every event of one run, in log order: its own, and its entries of the batches that
        dispatched or ended it (``dispatched_runs``, ``ended_runs``: not on its own subjects),
        each as the run's own event."""
        return await with_batches(self, run_id, await self.read(run_id))

    async def last_seq(self) -> int:
        info = await self.js.stream_info(EVENTS_STREAM)
        return int(info.state.last_seq)

    async def tail(
        self,
        handler: Handler,
        *,
        from_seq: int = 1,
        subject: str = ALL_EVENTS,
        subjects: list[str] | None = None,
        skipped: SkipHandler | None = None,
    ) -> OrderedTail:
        """Call ``handler(seq, event)`` for every event on ``subject`` from ``from_seq`` on,
        in order, one at a time (``runtime.infra.ordered``: a handler that suspends holds back
        the events after it). An ordered consumer: after a reconnect, a server restart or a
        gap it is recreated from the sequence after the last one received, so each sequence
        is passed once. A message that does not decode (an event kind from a newer release,
        say) is logged at WARNING and passed to ``skipped(seq)``, so a reader that counts
        sequences still moves past it. ``unsubscribe()`` the returned tail to stop."""

        async def on_msg(seq: int, subject: bytes, data: bytes) -> None:
            event = _decode_data(data, subject)
            if event is not None:
                await handler(seq, event)
            elif skipped is not None:
                await skipped(seq)

        config = api.ConsumerConfig(opt_start_seq=max(from_seq, 1))
        if subjects:  # several filters on one consumer (``subject`` is then ignored)
            config.filter_subjects = subjects
            subject = subjects[0]
        return await self._ordered(subject, on_msg, config)

    async def follow(
        self,
        apply: Apply,
        skip: Skip,
        *,
        from_seq: int = 1,
        confirm: tailconfirm.TailConfirm | None = None,
    ) -> OrderedTail:
        """``tail`` of every event for handlers that are plain functions (a reader that
        applies each event to an index): ``apply(seq, event)``, or ``skip(seq)`` for a message
        that does not decode. Each event is handled as the connection's reader receives it:
        no coroutine, no task (``runtime.infra.ordered``). ``confirm``: told of every message
        once it is applied, to confirm this process's reply-less appends."""

        def on_msg(seq: int, subject: bytes, data: bytes) -> None:
            event = _decode_data(data, subject)
            if event is not None:
                apply(seq, event)
            else:
                skip(seq)
            if confirm is not None:
                confirm.seen(seq, subject, data)

        config = api.ConsumerConfig(opt_start_seq=max(from_seq, 1))
        return await self._ordered(ALL_EVENTS, on_msg, config)

    async def tail_each(
        self, handler: Handler, *, from_seq: int, subjects: list[str]
    ) -> list[OrderedTail]:
        """``tail`` with one ordered consumer per subject, each created through JetStream's
        filtered create call (``$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>``), so that
        NATS permissions can say which filters a role may read (one consumer with several
        filters cannot be checked). Events of different subjects may arrive out of log order;
        within a subject they are in order and each sequence is passed once."""
        subs: list[OrderedTail] = []
        try:
            for subject in subjects:
                subs.append(await self._tail_one(handler, from_seq, subject))
        except BaseException:
            for sub in subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            raise
        return subs

    async def _tail_one(self, handler: Handler, from_seq: int, subject: str) -> OrderedTail:
        async def on_msg(seq: int, subject: bytes, data: bytes) -> None:
            event = _decode_data(data, subject)
            if event is not None:
                await handler(seq, event)

        config = NamedEachTime(opt_start_seq=max(from_seq, 1), filter_subject=subject)
        return await self._ordered(subject, on_msg, config)

    async def _ordered(
        self, subject: str, on_msg: TailHandler, config: api.ConsumerConfig
    ) -> OrderedTail:
        """An ordered push consumer on the event stream from ``config``'s start sequence,
        delivered from the connection's reader (``runtime.infra.ordered``)."""
        if not config.filter_subjects:
            config.filter_subject = subject
        return await OrderedTail(self.js, EVENTS_STREAM, config, on_msg, idle_heartbeat=1.0).start()


@dataclass
class NamedEachTime(api.ConsumerConfig):
    """A consumer config that takes a new name each time a copy is made. nats-py creates (and,
    after a gap or a reconnect, recreates) an ordered consumer from a copy of its config: a
    named consumer goes through the filtered create call, and a recreated one must not reuse
    the name of the one it replaces (that one lingers until it is inactive)."""

    def __post_init__(self) -> None:
        self.name = uuid.uuid4().hex


def _message(
    event: Event, fencing: Fencing | None, payload: bytes | None, callback: bool = False
) -> tuple[str, bytes, dict[str, str]]:
    """An append's subject, payload and headers."""
    headers = {"Nats-Msg-Id": event.message_id()}
    if fencing is not None:
        headers["Nats-Expected-Last-Subject-Sequence"] = str(fencing.seq)
        headers["Nats-Expected-Last-Subject-Sequence-Subject"] = fencing.subject
    data = payload if payload is not None else encode_event(event)
    return subject_of(event, callback), data, headers


def ack_sequences(reply: str | None) -> tuple[int, int] | None:
    """``(stream sequence, consumer sequence)`` named in a JetStream message's ack subject,
    read without building nats-py's whole ``Metadata`` (a date among it): ``ordered.ack_tokens``
    of a reply subject nats-py decoded. None for anything else."""
    return ack_tokens(reply.encode()) if reply else None


def stream_seq(msg: Msg) -> int:
    """The stream sequence of a message a consumer delivered, read from its reply subject
    split once (``msg.metadata`` builds every field, the time included, for each message);
    nats-py's parse only for a reply subject ``ack_sequences`` does not read."""
    found = ack_sequences(msg.reply)
    return found[0] if found is not None else int(msg.metadata.sequence.stream)


def _decode(msg: Msg) -> AnyEvent | None:
    return _decode_data(msg.data, msg.subject)


def _decode_data(data: bytes, subject: str | bytes) -> AnyEvent | None:
    # latin-1: never fails (a subject's bytes are anyone's), and an event's own subject is ASCII
    where = subject.decode("latin-1") if isinstance(subject, bytes) else subject
    try:
        event = decode_event(data)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as err:
        log.warning("skipping undecodable event on %s: %s", where, err)
        return None
    if where == f"{_PREFIX}{event.run_id}.{event.kind}" or on_its_subject(event, where):
        return event
    # another kind or run than its subject says: appended by a role not allowed that kind
    log.warning("skipping a %s event of %s on %s", event.kind, event.run_id, where)
    return None


async def last_event_of_kind(log: EventLog, run_id: str, kind: str) -> AnyEvent | None:
    """The latest ``kind`` event of one run, by a single direct get; None if there is none,
    or if it cannot be decoded (a newer kind, or nested past what the decoder allows: such a
    run is skipped by every reader of the log, so it is no run here either)."""

    async def get() -> Any:
        return await log.js.get_msg(EVENTS_STREAM, subject=event_subject(run_id, kind), direct=True)

    try:
        msg = await retrying(f"get {kind} of {run_id}", get, log.settings.append_deadline_s)
    except NotFoundError:
        return None
    if msg.data is None:
        return None
    try:
        return decode_event(msg.data)
    except (msgspec.MsgspecError, RecursionError) as err:
        logging.getLogger("jetrun.eventlog").warning(
            "undecodable %s event of %s: %s", kind, run_id, err
        )
        return None


async def submission_of(log: EventLog, run_id: str) -> RunSubmitted | None:
    """What ``run_id`` was submitted with: its ``submitted`` event, else as its latest
    ``restated`` event records it (a live run whose first events aged out of the log). None
    for a run the log does not know (any more)."""
    event = await last_event_of_kind(log, run_id, "submitted")
    if isinstance(event, RunSubmitted):
        return event
    restated = await last_event_of_kind(log, run_id, "restated")
    if not isinstance(restated, RunRestated):
        return None
    run = restated_record(restated)
    return RunSubmitted(
        run_id=run_id,
        at=run.created_at,
        team=run.team,
        pipeline=run.pipeline,
        inputs=run.inputs,
        async_run=run.async_run,
        wait_for_resources=run.wait_for_resources,
        idempotency_key=run.idempotency_key,
        callback_url=run.callback_url,
    )
