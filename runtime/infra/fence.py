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

import anyio
from nats.js.errors import APIError, NotFoundError

from contracts.events import Event, SchedulerElected
from runtime.infra.eventlog import Appended, EventLog, Fencing, event_subject
from runtime.infra.jsretry import retrying
from runtime.infra.streams import EVENTS_STREAM

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
        fence = self._fence
        try:
            fence._available.acquire_nowait()
        except anyio.WouldBlock:  # 64 appends in flight: wait for one to end
            await fence._available.acquire()
        self._slot = slot = fence._free.pop()
        if not fence.markers:
            return None
        return Fencing(fence._subjects[slot], fence.markers[slot])

    async def __aexit__(self, *exc: object) -> None:
        self._fence._free.append(self._slot)
        self._fence._available.release()


async def append(log: EventLog, event: Event, fencing: Fencing | None) -> Appended:
    """Append ``event`` behind ``fencing``: raises ``Fenced`` if a newer scheduler fenced the
    slot; a check refused only because another one on the slot is still being proposed (a
    replicated stream, just after this slot's previous append) is tried again."""
    for _ in range(BUSY_RETRIES):
        try:
            return await log.append(event, fencing=fencing)
        except APIError as err:
            if fenced_out(err):
                raise Fenced(f"{event.kind} of {event.run_id} refused: {err.description}") from err
            if not busy(err):
                raise
        await anyio.sleep(0.005)
    raise Fenced(f"{event.kind} of {event.run_id}: the fence slot stayed busy")


__all__ = ["FENCE_SLOTS", "Fence", "Fenced", "append", "busy", "fenced_out", "slot_id"]
