"""Server-enforced fencing of the leading scheduler's decisions.

The lease (``runtime.infra.lease``) says who should decide; the fence makes sure nobody else
can. A scheduler that takes the lease appends one ``elected`` marker per fence slot to the event
log, on the slot's own subject (``jetrun.ev._fence<n>.elected``), each expecting the slot's last
marker to be the one it read (so two schedulers racing to fence cannot both win a slot). Every
decision it appends then takes a slot and carries JetStream's
``Nats-Expected-Last-Subject-Sequence`` (its own marker's sequence) with
``Nats-Expected-Last-Subject-Sequence-Subject`` (the slot's subject): once a newer scheduler's
markers are stored, the server refuses every decision of the older one (``Fenced``), whatever
its clock says. The check is two headers on an append that happens anyway: no extra round trip.

Why slots: on a replicated stream the leader refuses a second expected-sequence check on a
subject while the first is still being proposed (err 10164), so appends in flight at once each
check their own slot's subject; a single-server stream has no such limit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import anyio
from nats.js.errors import APIError, NotFoundError

from contracts.events import Event, SchedulerElected
from runtime.infra.eventlog import PUBLISH_TIMEOUT_S, Appended, EventLog, Fencing, event_subject
from runtime.infra.jspub import Expiry, Pending
from runtime.infra.jsretry import RETRYABLE, retrying
from runtime.infra.streams import EVENTS_STREAM
from runtime.infra.tailconfirm import Tailed

log = logging.getLogger("jetrun.fence")

FENCE_SLOTS = 64  # as many as the scheduler's appends in flight at once
WRONG_LAST_SEQUENCE = 10071  # the slot's last marker is not the one expected: fenced out
SUBJECT_BUSY = 10164  # another check on the slot is still being proposed (clusters): retry
BUSY_RETRIES = 20


class Fenced(Exception):
    """A newer scheduler fenced the log: this one's decisions are refused; it must stand by."""


def slot_id(slot: int) -> str:
    """The marker's ``run_id`` for ``slot`` (one subject token, never a run's id)."""
    return f"_fence{slot}"


def fenced_out(err: BaseException) -> bool:
    return isinstance(err, APIError) and err.err_code == WRONG_LAST_SEQUENCE


def busy(err: BaseException) -> bool:
    return isinstance(err, APIError) and err.err_code == SUBJECT_BUSY


class Fence:
    """One scheduler's fence: ``establish`` once it holds the lease, then append every
    decision with ``append`` (a free slot each)."""

    def __init__(self, log: EventLog, holder: str, *, slots: int = FENCE_SLOTS) -> None:
        self.log, self.holder = log, holder
        self.markers: list[int] = []  # per slot, the sequence of this holder's marker
        self._free = list(range(slots))
        self._slots = slots
        self._subjects = [event_subject(slot_id(slot), "elected") for slot in range(slots)]
        # a free slot is taken without a trip through the event loop
        self._available = anyio.Semaphore(slots, fast_acquire=True)
        self.established_at = 0.0
        self._renewals = 0

    @property
    def established(self) -> bool:
        return bool(self.markers)

    async def establish(self, term: int) -> int:
        """Fence every slot for ``term``; returns the last marker's sequence (the index must
        reach it before deciding: every decision of an older leader stored before the fence
        is then seen). Raises ``Fenced`` if another scheduler fenced a slot meanwhile."""
        markers = list(self.markers) or [0] * self._slots
        renewal = self._renewals = self._renewals + 1 if self.markers else 0

        async def fence(slot: int) -> None:
            last = await self._last_marker(slot)
            marker = SchedulerElected(
                run_id=slot_id(slot),
                at=time.time(),
                holder=self.holder,
                term=term,
                renewal=renewal,
            )
            subject = event_subject(marker.run_id, marker.kind)
            markers[slot] = (await append(self.log, marker, Fencing(subject, last))).seq
            if self.markers:  # written again while leading: this slot's appends expect it now
                self.markers[slot] = markers[slot]

        async with anyio.create_task_group() as tg:
            for slot in range(self._slots):
                tg.start_soon(fence, slot)
        self.markers = markers
        self.established_at = time.time()
        return max(markers)

    def due(self, max_age_s: float) -> bool:
        """Whether the markers should be written again before they age out of a log that keeps
        events ``max_age_s`` (0: for ever): at half that age."""
        return (
            self.established and max_age_s > 0 and time.time() - self.established_at > max_age_s / 2
        )

    def drop(self) -> None:
        """Forget the fence (the lease was lost): appends go unfenced only where nobody leads
        (tests that drive passes by hand)."""
        self.markers = []

    def slot(self) -> _Slot:
        """``async with fence.slot() as fencing``: a free slot's fencing headers for one append
        (None when not established), the slot given back on leaving."""
        return _Slot(self)

    async def take(self) -> tuple[int, Fencing | None]:
        """A free slot (waiting for one while all are taken) and its fencing headers (None
        when not established); ``give`` it back once its append is answered."""
        try:
            self._available.acquire_nowait()
        except anyio.WouldBlock:  # every slot has an append in flight: wait for one to end
            await self._available.acquire()
        slot = self._free.pop()
        if not self.markers:
            return slot, None
        return slot, Fencing(self._subjects[slot], self.markers[slot])

    def give(self, slot: int) -> None:
        self._free.append(slot)
        self._available.release()

    def has_free(self) -> bool:
        return self._available.value > 0

    async def _last_marker(self, slot: int) -> int:
        subject = event_subject(slot_id(slot), "elected")

        async def get() -> int:
            try:
                msg = await self.log.js.get_msg(EVENTS_STREAM, subject=subject, direct=True)
            except NotFoundError:
                return 0
            return int(msg.seq or 0)

        return await retrying(f"last marker of {subject}", get, self.log.settings.append_deadline_s)


class _Slot:
    """One append's hold on a fence slot (a plain class: on the scheduler's hot path a
    generator-based context manager cost more than the rest of taking a slot)."""

    __slots__ = ("_fence", "_slot")

    def __init__(self, fence: Fence) -> None:
        self._fence = fence
        self._slot = -1

    async def __aenter__(self) -> Fencing | None:
        self._slot, fencing = await self._fence.take()
        return fencing

    async def __aexit__(self, *exc: object) -> None:
        self._fence.give(self._slot)


async def append(
    log: EventLog, event: Event, fencing: Fencing | None, callback: bool = False
) -> Appended:
    """Append ``event`` behind ``fencing``: raises ``Fenced`` if a newer scheduler fenced the
    slot; a check refused only because another one on the slot is still being proposed (a
    replicated stream, just after this slot's previous append) is tried again. ``callback``:
    its run has a callback URL (``EventLog.append``)."""
    for _ in range(BUSY_RETRIES):
        try:
            return await log.append(event, fencing=fencing, callback=callback)
        except APIError as err:
            if fenced_out(err):
                raise Fenced(f"{event.kind} of {event.run_id} refused: {err.description}") from err
            if not busy(err):
                raise
        await anyio.sleep(0.005)
    raise Fenced(f"{event.kind} of {event.run_id}: the fence slot stayed busy")


def _first_try(event: Event, err: Exception) -> Exception | None:
    """What a refused first try of a batched append means: ``Fenced``, the error itself (a
    final answer), or None (an outage or a busy slot: try again the patient way)."""
    if fenced_out(err):
        description = err.description if isinstance(err, APIError) else err
        return Fenced(f"{event.kind} of {event.run_id} refused: {description}")
    if busy(err) or isinstance(err, RETRYABLE):
        return None
    return err


def _no_callback(run_id: str) -> bool:
    return False


async def append_all(
    log: EventLog,
    fence: Fence,
    events: Sequence[Event],
    callback: Callable[[str], bool] = _no_callback,
    fenced: Callable[[Fenced], None] | None = None,
) -> list[Appended | Exception]:
    """Append ``events`` (about different runs) behind ``fence``, each on a slot of its own,
    with no task per append: each publish is sent as soon as it has a slot, and the acks are
    awaited once no slot is free or all are sent. A first try refused for an outage or a busy
    slot is made again by ``append`` (the same message id, so stored once), those together.
    Returns, per event, where it was stored or the exception (``Fenced``: a newer scheduler
    fenced its slot). ``callback(run_id)``: whether that run has a callback URL. ``fenced``:
    told at once of a first try refused by the fence, before the others are settled (where
    the log's tail confirms appends, the ones sent before it are then asked about again)."""
    results: list[Appended | Exception | None] = [None] * len(events)
    flight: list[tuple[int, int, Fencing | None, Pending | Tailed]] = []
    again: list[tuple[int, int, Fencing | None]] = []
    held: set[int] = set()

    expiry: Expiry | None = None  # one timer for the appends in flight (jspub.Expiry)

    async def land() -> None:
        nonlocal expiry
        for i, slot, fencing, pending in flight:
            try:
                ack = await pending.ack()
                results[i] = Appended(ack.seq, bool(ack.duplicate))
            except Exception as err:
                result = results[i] = _first_try(events[i], err)
                if result is None:
                    again.append((i, slot, fencing))
                    continue
                if fenced is not None and isinstance(result, Fenced):
                    fenced(result)
            held.discard(slot)
            fence.give(slot)
        flight.clear()
        if expiry is not None:
            expiry.cancel()
            expiry = None

    async def patiently(i: int, slot: int, fencing: Fencing | None) -> None:
        try:
            event = events[i]
            results[i] = await append(log, event, fencing, callback(event.run_id))
        except Exception as err:
            results[i] = err
        finally:
            held.discard(slot)
            fence.give(slot)

    async def settle() -> None:
        await land()
        if again:
            async with anyio.create_task_group() as tg:
                for i, slot, fencing in again:
                    tg.start_soon(patiently, i, slot, fencing)
                again.clear()

    try:
        for i, event in enumerate(events):
            if not fence.has_free() and (flight or again):
                await settle()  # our own appends hold the slots: free them first
            slot, fencing = await fence.take()
            held.add(slot)
            try:
                if expiry is None:
                    expiry = Expiry(PUBLISH_TIMEOUT_S)
                pending = await log.send(
                    event,
                    fencing=fencing,
                    callback=callback(event.run_id),
                    expiry=expiry,
                    # the last before the acks are awaited: acked (``EventLog.send``)
                    last=i == len(events) - 1 or not fence.has_free(),
                )
                flight.append((i, slot, fencing, pending))
            except Exception as err:
                results[i] = _first_try(event, err)
                if results[i] is None:
                    again.append((i, slot, fencing))
                else:
                    held.discard(slot)
                    fence.give(slot)
        await settle()
    finally:  # cancelled: stop waiting for what is in flight and give every slot back
        for _, _, _, pending in flight:
            pending.cancel()
        if expiry is not None:
            expiry.cancel()
        for slot in held:
            fence.give(slot)
    return [r if r is not None else Fenced("not appended") for r in results]


__all__ = [
    "FENCE_SLOTS",
    "Fence",
    "Fenced",
    "append",
    "append_all",
    "busy",
    "fenced_out",
    "slot_id",
]
