"""The NATS-level client for platform services: submit runs, follow run state.

    async with RunEvents.connect(url, Credentials(role="service", seed_file=seed)) as events:
        run = await events.submit("acme/echo:v1", "hi", token="jr_acme_secret")
        async with aclosing(events.watch(team="acme")) as changes:
            async for change in changes:
                print(change.seq, change.run.id, change.run.state)

``watch`` yields a ``RunChange`` for every event that changed a matching run, in log order (a
queue's ``queue_waiting`` event yields one for each matching run it changed: what it waits for).
Filter by team, pipeline or run id. It is resumable: pass ``from_seq=change.seq + 1`` after a
disconnect (runs that began before ``from_seq`` are loaded from the log when first seen).
Its memory holds the runs that can still change, not every run it saw (``RunFollower``).
``submit`` goes through a gateway's admission, exactly like ``POST /v4/runs``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import anyio
import msgspec
from nats.aio.client import Client

from contracts.events import (
    BATCHES,
    AnyEvent,
    Event,
    QueueWaitChanged,
    RunsDispatched,
    RunsEnded,
    RunsQueued,
    RunSubmitted,
)
from contracts.machine import evolve
from contracts.run import Run, RunRecord
from contracts.states import RunState
from contracts.submission import SUBMIT_SUBJECT, SubmitReply, SubmitRequest
from contracts.values import from_python
from runtime.clients.sdk import ConcurrencyLimitReached, JetrunError
from runtime.infra.eventlog import (
    ALL_EVENTS,
    Appended,
    EventLog,
    kind_subjects,
    run_subjects,
    submission_of,
)
from runtime.infra.nats_auth import Credentials
from runtime.infra.nats_conn import connect
from runtime.infra.streams import TERMINAL_KINDS

_reply_decoder = msgspec.json.Decoder(SubmitReply)


class RunChange(msgspec.Struct, frozen=True, kw_only=True):
    seq: int
    event: AnyEvent
    run: RunRecord


class RunEvents:
    def __init__(self, nc: Client, *, own_connection: bool = False) -> None:
        self.log = EventLog(nc)
        self._own = own_connection

    @classmethod
    def connect(cls, url: str, credentials: Credentials | None = None) -> _Connecting:
        """Connect as ``credentials`` (a platform service uses the ``service`` role: it may
        watch runs, submit through admission and ask for cancellation)."""
        return _Connecting(url, credentials)

    async def publish(self, event: Event) -> Appended:
        """Append a run event (idempotent by its message id); blocks until stored. A
        ``submitted`` event published this way skips admission: the scheduler fails that run
        (``not_admitted``) and it never runs; submit runs with ``submit``. A run's end is
        appended where the webhook outbox reads it when the run has a callback URL (as the
        log records its submission), so that its callback is posted."""
        callback = event.kind in TERMINAL_KINDS and await self._has_callback(event.run_id)
        return await self.log.append(event, callback=callback)

    async def _has_callback(self, run_id: str) -> bool:
        """Whether ``run_id`` was submitted with a callback URL (its ``submitted`` event, or
        its latest ``restated`` one): two direct gets at most, however long the run."""
        submitted = await submission_of(self.log, run_id)
        return submitted is not None and bool(submitted.callback_url)

    async def submit(
        self,
        pointer: str,
        *inputs: Any,
        token: str,
        wait_for_resources: bool | None = None,
        idempotency_key: str | None = None,
        timeout: float = 30.0,
    ) -> Run:
        """Submit an async run through a gateway's admission (request/reply on
        ``jetrun.submit``), as the team ``token`` names; returns the admitted run. Raises
        ``ConcurrencyLimitReached`` (429) or ``JetrunError`` (any other refusal, with the same
        status and detail as the HTTP API), or a NATS error if no gateway answered in
        ``timeout`` s. With an ``idempotency_key``, retrying is safe."""
        body = msgspec.json.encode(
            {
                "pipeline": pointer,
                "inputs": [from_python(i) for i in inputs],
                "async_run": True,
                "wait_for_resources": wait_for_resources,
            }
        )
        request = SubmitRequest(
            token=token, body=msgspec.Raw(body), idempotency_key=idempotency_key
        )
        msg = await self.log.nc.request(
            SUBMIT_SUBJECT, msgspec.json.encode(request), timeout=timeout
        )
        reply = _reply_decoder.decode(msg.data)
        if reply.status == 202 and reply.run is not None:
            return reply.run
        detail = msgspec.to_builtins(reply.detail)
        if reply.status == 429:
            raise ConcurrencyLimitReached(detail, reply.retry_after or 1.0)
        raise JetrunError(reply.status, detail)

    async def watch(
        self,
        *,
        team: str | None = None,
        pipeline: str | None = None,
        run_id: str | None = None,
        from_seq: int = 1,
        buffer: int = 1024,
    ) -> AsyncIterator[RunChange]:
        """Yield run changes matching every filter given, from ``from_seq`` on, for ever.
        Close it when done (``async with contextlib.aclosing(events.watch(...)) as changes``)
        so that its consumer is removed at once."""
        runs = RunFollower()
        send, receive = anyio.create_memory_object_stream[tuple[int, AnyEvent]](buffer)
        last = from_seq - 1

        async def on_event(seq: int, event: AnyEvent) -> None:
            await send.send((seq, event))

        if run_id:  # the run's own events, its queue's, and the batches that may queue it
            subjects = [
                run_subjects(run_id),
                kind_subjects(QueueWaitChanged.kind),
                kind_subjects(RunsQueued.kind),
                kind_subjects(RunsDispatched.kind),
                kind_subjects(RunsEnded.kind),
            ]
            sub = await self.log.tail(on_event, from_seq=from_seq, subjects=subjects)
        else:
            sub = await self.log.tail(on_event, from_seq=from_seq, subject=ALL_EVENTS)
        try:
            async with receive:
                async for seq, event in receive:
                    if seq <= last:
                        continue  # a consumer recreated after a gap delivers again
                    last = seq
                    for one, by in _each_run(event, run_id):
                        if (
                            from_seq > 1
                            and not isinstance(one, (RunSubmitted, QueueWaitChanged))
                            and runs.unseen(one.run_id)
                        ):  # the run began before from_seq: load what came before
                            runs.load(one.run_id, await self._load_before(one.run_id, seq))
                        for after in runs.apply(one, by):
                            if _matches(after, team, pipeline, run_id):
                                yield RunChange(seq=seq, event=one, run=after)
        finally:
            send.close()
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(Exception):  # the connection is already closed
                    await sub.unsubscribe()

    async def _load_before(self, run_id: str, seq: int) -> RunRecord | None:
        """The run as the log had it before ``seq``: its own events and its entries of the
        batches that dispatched or ended it (``EventLog.history``), so the agent a batch sent
        it to is known (an ``ended_runs`` entry applies only to that agent's run)."""
        stored = await self.log.history(run_id)
        record: RunRecord | None = None
        for s in stored:
            if s.seq >= seq:
                break
            record = evolve(record or RunRecord(id=run_id), s.event, own_subjects=True)
        return record


class RunFollower:
    """The fold behind ``watch``: the runs followed, in memory only while they can still change.

    A run that reaches a terminal state is dropped (nothing changes it any more) and its id kept
    among the last ``remember_ended`` ended ones, so a late event of it is known to change
    nothing; memory grows with the runs live at once, not with every run ever watched."""

    def __init__(self, *, remember_ended: int = 10_000) -> None:
        self.runs: dict[str, RunRecord] = {}
        self.queued: dict[str, dict[str, None]] = {}  # pipeline -> its runs queued now
        self.ended: dict[str, None] = {}  # insertion-ordered: the oldest is dropped first
        self.remember_ended = remember_ended
        # runs loaded from their own subjects still routing or queued: a batch before the
        # watch began may have dispatched them (rule 10 applies until they move on)
        self.loaded: set[str] = set()

    def unseen(self, run_id: str) -> bool:
        """Whether this run was never followed here (neither live nor recently ended)."""
        return run_id not in self.runs and run_id not in self.ended

    def load(self, run_id: str, record: RunRecord | None) -> None:
        """Take a run's state before the watch began (read from the log)."""
        if record is not None:
            if record.state in (RunState.routing, RunState.queued):
                self.loaded.add(record.id)
            self._keep(record)

    def apply(self, event: AnyEvent, by: str | None = None) -> list[RunRecord]:
        """The runs ``event`` changed, changed (a queue's event may change many; an event of an
        ended run changes none). ``by``: ``event`` is an entry of an ``ended_runs`` batch of
        that agent's, applied only to a run whose current attempt went to it."""
        if isinstance(event, QueueWaitChanged):
            return self._apply_to_queue(event)
        if isinstance(event, BATCHES):  # each run's own event, in order
            return [run for one, agent in _entries(event) for run in self.apply(one, agent)]
        if event.run_id in self.ended:
            return []
        held = self.runs.get(event.run_id)
        if by is not None and (held is None or held.agent_id != by):
            return []  # an end only the run's own agent may batch (machine rule 11)
        base = held or RunRecord(id=event.run_id)
        loaded = self.loaded
        after = evolve(base, event, own_subjects=bool(loaded) and event.run_id in loaded)
        if after is base:
            return []
        if loaded and after.state not in (RunState.routing, RunState.queued):
            loaded.discard(after.id)
        self._keep(after)
        return [after]

    def _apply_to_queue(self, event: QueueWaitChanged) -> list[RunRecord]:
        changed = []
        for run_id in list(self.queued.get(event.pipeline, {})):
            before = self.runs[run_id]
            after = evolve(before, event)
            if after is not before:
                self._keep(after)
                changed.append(after)
        return changed

    def _keep(self, run: RunRecord) -> None:
        self._track_queued(run)
        if not run.state.is_terminal:
            self.runs[run.id] = run
            return
        self.runs.pop(run.id, None)
        self.ended[run.id] = None
        if len(self.ended) > self.remember_ended:
            del self.ended[next(iter(self.ended))]

    def _track_queued(self, run: RunRecord) -> None:
        if run.state is RunState.queued:
            self.queued.setdefault(run.pipeline, {})[run.id] = None
        elif (runs := self.queued.get(run.pipeline)) is not None:
            runs.pop(run.id, None)
            if not runs:
                del self.queued[run.pipeline]


def _each_run(event: AnyEvent, run_id: str | None) -> list[tuple[AnyEvent, str | None]]:
    """``event``, or the event of each run a batch (``queued_runs``, ``dispatched_runs``,
    ``ended_runs``) stands for (only ``run_id``'s when one run is watched), each then yielded as
    that run's own event; with the agent of an ``ended_runs`` batch (``RunFollower.apply``)."""
    if not isinstance(event, BATCHES):
        return [(event, None)]
    return [(one, by) for one, by in _entries(event) if run_id is None or one.run_id == run_id]


def _entries(batch: RunsQueued | RunsDispatched | RunsEnded) -> list[tuple[AnyEvent, str | None]]:
    """Each run's own event of ``batch``, with the agent it must have gone to (ends only)."""
    by = batch.agent_id if isinstance(batch, RunsEnded) else None
    return [(one, by) for one in batch.each()]


def _matches(run: RunRecord, team: str | None, pipeline: str | None, run_id: str | None) -> bool:
    return (
        (team is None or run.team == team)
        and (pipeline is None or run.pipeline == pipeline)
        and (run_id is None or run.id == run_id)
    )


class _Connecting:
    def __init__(self, url: str, credentials: Credentials | None) -> None:
        self.url = url
        self.credentials = credentials
        self.nc: Client | None = None

    async def __aenter__(self) -> RunEvents:
        self.nc = await connect(self.url, "jetrun-client", self.credentials)
        return RunEvents(self.nc, own_connection=True)

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.nc is not None:
            await self.nc.close()
