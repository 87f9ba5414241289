"""What one decision pass reads and what it returns: the time (``Now``), the run index
(``Runs``), the scheduler's own projection of the log (``Worklist``), everything a pass reads
(``Pass``) and what it decided (``Decisions``). Pure data and bookkeeping, no I/O; the rules
live in ``runtime.control.decide``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, TypeVar

import msgspec
from sortedcontainers import SortedList

from contracts.agents import PipelineInfo
from contracts.events import (
    BATCHES,
    AnyEvent,
    Event,
    QueueWaitChanged,
    RunAdmitted,
    RunDispatched,
    RunQueued,
    dispatched_runs,
    queued_runs,
)
from contracts.machine import WAITS_FOR_A_REPLICA
from contracts.run import RunRecord
from contracts.states import RunState, WaitingFor
from runtime.control.durations import AttemptDurations
from runtime.infra.config import Config
from runtime.infra.fleet import FleetView

_CREATED, _ROUTING, _QUEUED, _RUNNING = (
    RunState.created,
    RunState.routing,
    RunState.queued,
    RunState.running,
)


class Now(NamedTuple):
    wall: float  # Unix seconds: stamped on events, compared with event times
    mono: float  # this process's monotonic clock: compared with heartbeat arrival times


class Runs(Protocol):
    """What a pass reads from the run index (``runtime.infra.projection.RunIndex``)."""

    @property
    def records(self) -> Mapping[str, RunRecord]: ...

    on_agent: dict[str, set[str]]

    def queued(self, pipeline: str, limit: int | None = None) -> list[str]: ...

    def pipelines_with_queue(self) -> list[str]: ...

    def queue_version(self, pipeline: str) -> int: ...


@dataclass
class Worklist:
    """The scheduler's own projection of the log, beside the index: which runs need a decision
    (insertion-ordered sets, in log order, so placement keeps queues FIFO) and, per running
    attempt, where its dispatch is in the log and when it last changed on this process's
    monotonic clock. Fed by ``observe``; rebuilt by replaying the log."""

    routing: dict[str, None] = field(default_factory=dict)
    created: dict[str, None] = field(default_factory=dict)
    cancelling: dict[str, None] = field(default_factory=dict)
    running_since: dict[str, float] = field(default_factory=dict)
    dispatched_at: dict[str, int] = field(default_factory=dict)
    announced: dict[str, WaitingFor] = field(default_factory=dict)  # pipeline -> its queue's wait
    permit_held: set[str] = field(default_factory=set)  # late routing runs whose permit is there
    # per pipeline, its queued runs waiting for a replica ordered by when they began waiting
    # (``resources_since``): expiring resource waits looks only at the heads that are due
    resource_waits: dict[str, SortedList] = field(default_factory=dict)
    _waiting: dict[str, tuple[str, float]] = field(default_factory=dict)  # run -> its entry
    durations: AttemptDurations = field(default_factory=AttemptDurations)  # per pipeline
    # agent -> pipeline -> its runs the log says are on the agent (running or waiting there):
    # the index's ``on_agent`` counted by pipeline, so a pass counts slots in use without
    # reading every such run
    agent_load: dict[str, Counter[str]] = field(default_factory=dict)
    _on_agent: dict[str, tuple[str, str]] = field(default_factory=dict)  # run -> its entry

    def observe_queue(self, event: QueueWaitChanged, queued: list[str]) -> None:
        """A queue's event (its runs stay queued: only their wait for a replica changes, as the
        machine's ``evolve`` changes ``resources_since``): one that waits for a replica starts
        a wait for each run without one; one that waits for something else (not a
        cancellation) ends them all. No run record is read."""
        pipeline = event.pipeline
        if event.waiting_for in WAITS_FOR_A_REPLICA:
            entry = (pipeline, event.at)
            fresh = [(event.at, r) for r in queued if r not in self._waiting]
            for _, run_id in fresh:
                self._waiting[run_id] = entry
            if fresh:
                self.resource_waits.setdefault(pipeline, SortedList()).update(fresh)
        elif event.waiting_for is not WaitingFor.cancellation:
            for _, run_id in self.resource_waits.pop(pipeline, ()):
                del self._waiting[run_id]

    def observe(self, seq: int, event: AnyEvent, run: RunRecord, mono: float) -> None:
        # every event of every run comes here: the sets kept in place without a call each,
        # and what only concerns a queued or running run skipped for the others (the states
        # are module constants: on Python 3.11 reading ``RunState.x`` is a descriptor call)
        run_id, state = run.id, run.state
        if state is _ROUTING:
            self.routing.setdefault(run_id, None)
        else:
            self.routing.pop(run_id, None)
            if self.permit_held:
                self.permit_held.discard(run_id)
        if state is _CREATED:
            self.created.setdefault(run_id, None)
        else:
            self.created.pop(run_id, None)
        if run.cancel_requested and not state.is_terminal:
            self.cancelling.setdefault(run_id, None)
        elif self.cancelling:
            self.cancelling.pop(run_id, None)
        if state is _QUEUED or run_id in self._waiting:
            self._track_resource_wait(run)
        if state is _RUNNING or run_id in self._on_agent:
            self._track_agent(run)
        self.durations.observe(event, run)
        if state is _RUNNING:
            self.running_since[run_id] = mono
            if type(event) is RunDispatched:
                self.dispatched_at[run_id] = seq
        else:
            self.running_since.pop(run_id, None)
            self.dispatched_at.pop(run_id, None)
        if state is _QUEUED:
            # queued (or requeued) with another wait than its queue was told last: the next
            # timed pass looks at the whole queue again
            told = self.announced.get(run.pipeline)
            if told is not None and run.waiting_for not in (told, WaitingFor.cancellation):
                del self.announced[run.pipeline]

    def _track_agent(self, run: RunRecord) -> None:
        on = run.agent_id if run.state is _RUNNING else None  # as the index's on_agent
        entry = None if on is None else (on, run.pipeline)
        old = self._on_agent.get(run.id)
        if old == entry:
            return
        if old is not None:
            load = self.agent_load[old[0]]
            load[old[1]] -= 1
            if not load[old[1]]:
                del load[old[1]]
                if not load:
                    del self.agent_load[old[0]]
            del self._on_agent[run.id]
        if entry is not None:
            self.agent_load.setdefault(entry[0], Counter())[entry[1]] += 1
            self._on_agent[run.id] = entry

    def _track_resource_wait(self, run: RunRecord) -> None:
        since = run.resources_since if run.state is _QUEUED else None
        entry = None if since is None else (run.pipeline, since)
        old = self._waiting.get(run.id)
        if old == entry:
            return
        if old is not None:
            queue = self.resource_waits[old[0]]
            queue.discard((old[1], run.id))
            if not queue:
                del self.resource_waits[old[0]]
            del self._waiting[run.id]
        if entry is not None:
            self.resource_waits.setdefault(entry[0], SortedList()).add((entry[1], run.id))
            self._waiting[run.id] = entry


@dataclass
class Decisions:
    """What one pass decided. The applier appends ``events`` (one per run) and the late
    ``admissions`` (after looking up each one's permit); once an agent's events are all stored
    it forgets the agent (``lost``) and, per pipeline whose runs were all told, records the
    wait it announced (``announced``)."""

    events: list[Event] = field(default_factory=list)
    admissions: list[RunAdmitted] = field(default_factory=list)
    lost: dict[str, list[str]] = field(default_factory=dict)  # agent -> its runs' event ids
    lost_reasons: dict[str, str] = field(default_factory=dict)
    announced: dict[str, WaitingFor] = field(default_factory=dict)
    decided: set[str] = field(default_factory=set)
    permit_checks: list[str] = field(default_factory=list)  # confirm before placing (see place)

    def add(self, event: Event) -> bool:
        """Record ``event`` unless its run already has a decision in this pass."""
        if event.run_id in self.decided:
            return False
        self.decided.add(event.run_id)
        self.events.append(event)
        return True

    def __bool__(self) -> bool:
        return bool(self.events or self.admissions or self.lost or self.permit_checks)


QUEUED_PER_EVENT = 256  # runs per ``queued_runs`` event (some 12 KB)
DISPATCHED_PER_EVENT = 256  # runs per ``dispatched_runs`` event
# bytes of the entries of one ``dispatched_runs`` event (inputs up to 64 KiB each are carried):
# well under nats-server's max_payload (1 MiB by default; the applier passes a quarter of the
# connection's, if that is less)
DISPATCHED_BYTES = 256 * 1024
_ENTRY_BYTES = 160  # an entry's own fields, beside its team, pipeline and inputs (a bound)
_encode = msgspec.json.Encoder().encode
E = TypeVar("E", RunQueued, RunDispatched)


def packed(
    events: list[Event],
    per_event: int = QUEUED_PER_EVENT,
    *,
    dispatched_per_event: int = DISPATCHED_PER_EVENT,
    dispatched_bytes: int = DISPATCHED_BYTES,
    batches_to: Callable[[str], bool] | None = None,
) -> list[Event]:
    """``events`` as a pass appends them: the ``queued`` of two or more runs go as
    ``queued_runs`` events (one stored message for up to ``per_event`` runs, in the order
    decided, runs stamped with one time per event), where the first of them stood; the
    ``dispatched`` of two or more runs to one agent go as ``dispatched_runs`` events (up to
    ``dispatched_per_event`` runs and ``dispatched_bytes`` of entries each), where the first
    dispatch to that agent stood; every other event, a lone ``queued`` or ``dispatched``, and
    the dispatch of a run with a callback URL, as it is (the webhook outbox reads a run's own
    subjects: there it sees the dispatch, so an end no dispatch came before is a forgery), and
    the dispatches to an agent that ``batches_to`` (None: all) says takes no batch. Pure:
    the same decisions give the same events, so the same batch decided twice from one picture
    has one message id."""
    queued = [e for e in events if isinstance(e, RunQueued)]
    to: dict[str, list[RunDispatched]] = {}
    for e in events:
        if not isinstance(e, RunDispatched) or e.callback:
            continue
        if batches_to is None or batches_to(e.agent_id):
            to.setdefault(e.agent_id, []).append(e)
    if len(queued) < 2 and all(len(runs) < 2 for runs in to.values()):
        return events
    batches: list[Event] | None = _queued_batches(queued, per_event) if len(queued) > 1 else None
    by_agent = {
        agent: _dispatched_batches(runs, dispatched_per_event, dispatched_bytes)
        for agent, runs in to.items()
        if len(runs) > 1
    }
    out: list[Event] = []
    for event in events:
        if isinstance(event, RunQueued) and batches is not None:
            out += batches
            batches = []
        elif isinstance(event, RunDispatched) and not event.callback and event.agent_id in by_agent:
            out += by_agent[event.agent_id]
            by_agent[event.agent_id] = []
        else:
            out.append(event)
    return out


def _queued_batches(queued: list[RunQueued], per_event: int) -> list[Event]:
    """The queued runs, in order, as ``queued_runs`` events."""
    return [queued_runs(c, c[0].at) for c in _chunks(queued, per_event)]


def _dispatched_batches(runs: list[RunDispatched], per_event: int, max_bytes: int) -> list[Event]:
    """One agent's dispatches, in order, as ``dispatched_runs`` events; a chunk of one goes as
    the plain ``dispatched``."""
    chunks = _chunks(runs, per_event, max_bytes, _entry_bytes)
    return [c[0] if len(c) == 1 else dispatched_runs(c, c[0].at) for c in chunks]


def _chunks(
    events: list[E], per_event: int, max_bytes: int = 0, size: Callable[[E], int] | None = None
) -> list[list[E]]:
    """``events`` cut, in order, into chunks of at most ``per_event`` events stamped with one
    time each (and, given ``size``, at most ``max_bytes`` of entries each)."""
    chunks: list[list[E]] = []
    chunk: list[E] = []
    used = 0
    for one in events:
        bytes_ = size(one) if size is not None else 0
        full = len(chunk) >= per_event or (size is not None and used + bytes_ > max_bytes)
        if chunk and (full or one.at != chunk[0].at):
            chunks.append(chunk)
            chunk, used = [], 0
        chunk.append(one)
        used += bytes_
    chunks.append(chunk)
    return chunks


def _entry_bytes(one: RunDispatched) -> int:
    """A bound on the bytes of ``one``'s entry in a ``dispatched_runs`` event."""
    size = _ENTRY_BYTES + len(one.run_id) + len(one.team or "") + len(one.pipeline or "")
    if one.inputs:
        size += len(_encode(one.inputs))
    return size


def runs_of(event: Event) -> list[str]:
    """The runs an appended event decides about (a batch: each of its runs)."""
    if isinstance(event, BATCHES):
        return [r.run_id for r in event.each()]
    return [event.run_id]


@dataclass(frozen=True)
class Pass:
    """Everything one pass reads."""

    runs: Runs
    work: Worklist
    fleet: FleetView
    catalogue: Mapping[str, PipelineInfo]
    config: Config
    now: Now
    booting: frozenset[str] = frozenset()  # pipelines a node is being added for

    def kind(self, pipeline: str) -> str:
        """The slot kind ``pipeline``'s runs need (cpu for a pipeline never registered)."""
        info = self.catalogue.get(pipeline)
        return info.accelerator if info is not None else "cpu"

    def retries(self, pipeline: str) -> int:
        info = self.catalogue.get(pipeline)
        return info.max_retries if info is not None else 0

    def run(self, run_id: str) -> RunRecord:
        return self.runs.records[run_id]


__all__ = [
    "DISPATCHED_BYTES",
    "DISPATCHED_PER_EVENT",
    "QUEUED_PER_EVENT",
    "Decisions",
    "Now",
    "Pass",
    "Runs",
    "Worklist",
    "packed",
    "runs_of",
]
