"""How the scheduler applies a decision pass: it appends the pass's events together, waits
until its own index holds them, then acts on what was stored (forgets lost agents, remembers
announced waits, answers drain requests); it looks permits up for late admissions and gives
permits of ended runs back. A mixin of ``runtime.control.scheduler.Scheduler``: the attributes
below are the scheduler's."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TypeVar

import anyio
import msgspec
import stamina
from nats.aio.client import Client

from contracts.events import AdmissionSlot, Event, RunAdmitted, RunDispatched, RunsDispatched
from contracts.run import RunRecord
from runtime.control.admission import Admission, stream_name
from runtime.control.decide import not_admitted
from runtime.control.passes import DISPATCHED_BYTES, Decisions, Worklist, packed, runs_of
from runtime.infra.clock import Clock
from runtime.infra.config import Config
from runtime.infra.eventlog import Appended, EventLog
from runtime.infra.fence import Fence, Fenced, append_all
from runtime.infra.fence import append as fenced_append
from runtime.infra.fleet import Fleet
from runtime.infra.jsretry import RETRYABLE
from runtime.infra.peers import PeerSchedulers
from runtime.infra.projection import RunIndex

log = logging.getLogger("jetrun.scheduler")

T = TypeVar("T")

APPENDS_IN_FLIGHT = 64  # permit releases in flight at once (decisions: one per fence slot)
CATCH_UP_S = 5.0  # how long a pass waits for the index to hold what it appended


async def patiently(what: str, call: Callable[[], Awaitable[T]]) -> T:
    """``call()``, retried with jittered exponential backoff through NATS outages (timeouts,
    no responders, a leader change) for up to 10 s; then the last error is raised."""
    async for attempt in stamina.retry_context(
        on=RETRYABLE, attempts=None, timeout=10.0, wait_initial=0.05, wait_max=1.0
    ):
        with attempt:
            return await call()
    raise AssertionError("unreachable")  # pragma: no cover


class Applier:
    """Applying passes; mixed into the scheduler."""

    nc: Client
    config: Config
    clock: Clock
    log: EventLog
    index: RunIndex
    work: Worklist
    fleet: Fleet
    peers: PeerSchedulers
    admission: Admission
    fence: Fence
    fenced: bool  # a newer scheduler fenced the log: stand by
    scheduler_id: str
    _kick: anyio.Event
    _applying: int
    _decisions: int
    _lost: int
    _ended: list[RunRecord]
    _drain_replies: dict[str, list[str]]
    _unsure: bool  # a dispatch's append failed and may be stored: read the log's end first

    async def apply(self, d: Decisions) -> None:
        """Append a pass's events together (they are about different runs), wait until the
        index holds them, then act on what was stored: forget lost agents, remember announced
        waits, answer drain requests."""
        failed: set[str] = set()
        stored = 0
        if self._unsure and not await self._read_to_end():
            failed.update(event.run_id for event in d.events)  # decided from a stale picture
            d = Decisions()
        self._applying = len(d.events) + len(d.admissions)

        async def append(event: Event) -> None:
            nonlocal stored
            async with self.fence.slot() as fencing:  # at most FENCE_SLOTS in flight
                if self.fenced:
                    failed.add(event.run_id)
                    return
                try:
                    callback = self.has_callback(event.run_id)
                    seq = (await fenced_append(self.log, event, fencing, callback)).seq
                except Fenced as err:
                    self._fenced_out(err)
                    failed.add(event.run_id)
                    return
                except Exception as err:
                    log.warning("could not append %s for %s: %r", event.kind, event.run_id, err)
                    failed.add(event.run_id)
                    return
            stored = max(stored, seq)
            self._decisions += 1

        async def admit(event: RunAdmitted) -> None:
            try:
                await append(await self._with_permit(event))
            except RETRYABLE as err:
                log.warning("permit of %s not found now (%r); later", event.run_id, err)
                failed.add(event.run_id)

        async def check(run_id: str) -> None:
            run = self.index.records[run_id]
            try:
                limit = self.config.tiers.get(run.tier or "")
                held = limit is None or await self._permit_of(run, limit) is not None
            except RETRYABLE as err:
                log.warning("permit of %s not checked now (%r); later", run_id, err)
                return
            if held:
                self.work.permit_held.add(run_id)
                self._kick.set()  # the next pass places it
                return
            log.warning("run %s reached the log after its permit was given back", run_id)
            why = "its admission permit was given back before the run reached the event log"
            await append(not_admitted(run, self.clock.now(), why))

        async def append_events() -> None:
            """The pass's decisions, in flight together from this task (no task each)."""
            nonlocal stored
            if self.fenced:
                failed.update(event.run_id for event in d.events)
                return
            # the queued runs of the pass, and its dispatches to each agent: batched
            most = min(DISPATCHED_BYTES, self.nc.max_payload // 4)
            events = packed(d.events, dispatched_bytes=most, batches_to=self._takes_batches)
            results = await append_all(
                self.log, self.fence, events, self.has_callback, self._fenced_out
            )
            for event, result in zip(events, results, strict=True):
                runs = runs_of(event)
                if isinstance(result, Appended):
                    stored = max(stored, result.seq)
                    self._decisions += len(runs)
                    continue
                failed.update(runs)
                if isinstance(result, Fenced):
                    self._fenced_out(result)
                    continue
                log.warning("could not append %s for %s: %r", event.kind, event.run_id, result)
                if isinstance(event, RunDispatched | RunsDispatched):
                    self._unsure = True

        late = [partial(admit, admission) for admission in d.admissions]
        late += [partial(check, run_id) for run_id in d.permit_checks]
        if late:  # permits to look up first: one task each, beside the decisions
            async with anyio.create_task_group() as tg:
                for call in late:
                    tg.start_soon(call)
                await append_events()
        elif d.events:
            await append_events()
        self._applying = 0
        if stored:
            await self.index.wait_for_seq(stored, timeout=CATCH_UP_S)
        if self._unsure:
            await self._read_to_end()
        await self._settle(d, failed)

    async def _read_to_end(self) -> bool:
        """After a dispatch whose append failed (it may be stored all the same: a timeout, an
        outage), read the log up to its end before the next pass decides: a batch's message id
        dedupes only that same batch, so a run of it decided again from a picture that lacks it
        (with other runs, or to another agent) would be stored twice and run twice. True once
        the index holds the log's end; until then passes append nothing."""
        try:
            last = await patiently("the log's end", self.log.last_seq)
        except Exception as err:
            log.warning("the log's end is not known now (%r); deciding nothing until it is", err)
            return False
        if not await self.index.wait_for_seq(last, timeout=CATCH_UP_S):
            log.warning("the index has not reached the log's end (%d) yet; deciding later", last)
            return False
        self._unsure = False
        return True

    def _takes_batches(self, agent_id: str) -> bool:
        """Whether ``agent_id``'s last heartbeat says it takes ``dispatched_runs`` batches (an
        agent of a release before them would skip one and never run its runs), and no scheduler
        of such a release was heard (were it to lead next, it would dispatch them again)."""
        beat = self.fleet.get(agent_id)
        return beat is not None and beat.batches and not self.peers.older_heard()

    def has_callback(self, run_id: str) -> bool:
        """Whether ``run_id`` was submitted with a callback URL (its end then goes where the
        webhook outbox reads it)."""
        run = self.index.stored.get(run_id)  # set at submission: queue events never change it
        return run is not None and run.callback_url is not None

    def _fenced_out(self, err: Fenced) -> None:
        if not self.fenced:
            log.warning(
                "scheduler %s: decision refused by the server, a newer scheduler leads (%s);"
                " standing by",
                self.scheduler_id,
                err,
            )
        self.fenced = True

    async def _settle(self, d: Decisions, failed: set[str]) -> None:
        for agent_id, runs in d.lost.items():
            if failed.intersection(runs):
                continue
            if not self.fleet.is_gone(agent_id):
                self._lost += 1
                log.info(
                    "agent %s lost (%s); %d runs handled",
                    agent_id,
                    d.lost_reasons[agent_id],
                    len(runs),
                )
            self.fleet.forget(agent_id)
            for reply in self._drain_replies.pop(agent_id, []):
                with contextlib.suppress(Exception):  # the agent may be gone already
                    await self.nc.publish(reply, str(len(runs)).encode())
        if not failed:
            self.work.announced.update(d.announced)

    async def _with_permit(self, event: RunAdmitted) -> Event:
        """A late admission carries the permit its gateway took; a run for which the team
        holds no permit never went through admission: it fails instead."""
        run = self.index.records[event.run_id]
        limit = self.config.tiers[event.tier]
        assert limit is not None  # decide admits late only runs of limited tiers
        slot = await self._permit_of(run, limit)
        if slot is not None:
            log.warning("run %s: its gateway never admitted it; admitting it", run.id)
            self.work.permit_held.add(run.id)  # just confirmed: no second check
            return msgspec.structs.replace(event, slot=slot)
        log.warning("run %s did not go through admission: failing it", run.id)
        return not_admitted(run, event.at, "no permit was taken for it")

    async def _permit_of(self, run: RunRecord, limit: int) -> AdmissionSlot | None:
        """The permit ``run``'s team holds for it under ``limit``, if any. Retries outages."""
        holders = await patiently(
            f"permits of {run.team}", lambda: self.admission.holders(limit, run.team)
        )
        for seq, permit in holders:
            if permit.run_id == run.id:
                return AdmissionSlot(stream=stream_name(limit), seq=seq)
        return None

    async def _release_ended(self) -> None:
        """Give back the permits of runs that ended, together: an outage holds a pass up for
        one retry budget at most, not one per run. A permit still held is the sweep's job."""
        ended, self._ended = self._ended, []
        held = [(run.id, run.slot) for run in ended if run.slot is not None]
        again: list[tuple[str, AdmissionSlot]] = []
        for start in range(0, len(held), APPENDS_IN_FLIGHT):  # in flight together, no tasks
            chunk = held[start : start + APPENDS_IN_FLIGHT]
            results = await self.admission.release_all([slot for _, slot in chunk])
            again += [pair for pair, r in zip(chunk, results, strict=True) if _outage(r)]
        if not again:
            return
        limiter = anyio.CapacityLimiter(APPENDS_IN_FLIGHT)

        async def release(run_id: str, slot: AdmissionSlot) -> None:
            async with limiter:
                try:
                    await patiently(f"release {slot}", partial(self.admission.release, slot))
                except RETRYABLE as err:
                    log.warning("could not give back the permit of %s (%r)", run_id, err)

        async with anyio.create_task_group() as tg:  # an outage: each retried, patiently
            for run_id, slot in again:
                tg.start_soon(release, run_id, slot)

    async def _sweep(self) -> None:
        try:
            released = await self.admission.sweep(
                self.clock.now(), self.config.settings.release_grace_s
            )
        except Exception as err:
            log.warning("admission sweep failed: %r", err)
            return
        if released:
            log.info("gave back %d admission permits of ended or unrecorded runs", released)


def _outage(result: bool | Exception) -> bool:
    return isinstance(result, Exception)


__all__ = ["APPENDS_IN_FLIGHT", "Applier", "patiently"]
