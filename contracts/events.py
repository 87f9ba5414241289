"""The event catalogue: every step of a run, as an immutable, past-tense fact.

Rules for evolving this module: a new field gets a default; a field is never retyped; a tag is
never reused. Every event names its run and carries its own time (``at``, Unix seconds); events
that belong to one attempt carry ``attempt`` so that the state machine can fence stale ones.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Annotated, Any, ClassVar

import msgspec

from contracts.errors import ErrorType, RunError
from contracts.states import WaitingFor
from contracts.values import RunIO

MAX_OUTPUTS = 100_000  # streamed outputs of one attempt


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="event"):
    run_id: str
    at: float

    kind: ClassVar[str]

    def message_id(self) -> str:
        """A deterministic id: appending the same fact twice is deduplicated by the log."""
        return f"{self.run_id}:{self.kind}"


class AttemptEvent(Event, frozen=True, kw_only=True):
    attempt: int

    def message_id(self) -> str:
        return f"{self.run_id}:{self.kind}:{self.attempt}"


class AdmissionSlot(msgspec.Struct, frozen=True, kw_only=True):
    """Where the admission permit of a run is held, so that it can be given back."""

    stream: str
    seq: int


class AdmissionGrant(msgspec.Struct, frozen=True, kw_only=True):
    """The admission a gateway took before recording a run: the team's tier, and the permit
    (None for an unlimited tier)."""

    tier: str
    slot: AdmissionSlot | None = None


class RunSubmitted(Event, frozen=True, kw_only=True, tag="submitted"):
    """The run exists. With ``admission`` (what a gateway appends: one append per run) it was
    admitted too and starts in ``routing``; without, it waits in ``created`` for an
    ``admitted`` event."""

    kind: ClassVar[str] = "submitted"
    team: str
    pipeline: str
    inputs: list[RunIO]
    async_run: bool = False
    wait_for_resources: bool = False
    idempotency_key: str | None = None
    admission: AdmissionGrant | None = None
    callback_url: str | None = None  # the run is POSTed there when it ends (webhooks)

    def implied(self) -> RunAdmitted | None:
        """The admission this submission carries, as the event it stands for."""
        if self.admission is None:
            return None
        return RunAdmitted(
            run_id=self.run_id, at=self.at, tier=self.admission.tier, slot=self.admission.slot
        )


class RunAdmitted(Event, frozen=True, kw_only=True, tag="admitted"):
    kind: ClassVar[str] = "admitted"
    tier: str
    slot: AdmissionSlot | None = None


class RunQueued(AttemptEvent, frozen=True, kw_only=True, tag="queued"):
    kind: ClassVar[str] = "queued"
    waiting_for: WaitingFor = WaitingFor.capacity


class RunWaitChanged(AttemptEvent, frozen=True, kw_only=True, tag="waiting"):
    """A queued run now waits for something else (a replica came alive, or went away)."""

    kind: ClassVar[str] = "waiting"
    waiting_for: WaitingFor

    def message_id(self) -> str:
        # the same change restamped is the same fact; a reason that comes back within the
        # log's duplicate window is not announced twice
        return f"{self.run_id}:{self.kind}:{self.attempt}:{self.waiting_for}"


class QueueWaitChanged(Event, frozen=True, kw_only=True, tag="queue_waiting"):
    """What every run waiting in ``pipeline``'s queue at this point of the log waits for now (a
    replica came alive, started loading, or went away): one event per queue, however long the
    queue, instead of one ``waiting`` per run. ``run_id`` names the queue (``queue_id``), never
    a run; runs queued later carry their own ``waiting_for``. ``follows`` is the sequence of the
    queue's previous such event or of the event that queued its head, whichever is later, so
    the same change decided twice from one picture is stored once."""

    kind: ClassVar[str] = "queue_waiting"
    pipeline: str
    waiting_for: WaitingFor
    follows: int = 0

    def message_id(self) -> str:
        return f"{self.run_id}:{self.kind}:{self.follows}:{self.waiting_for}"


def queue_id(pipeline: str) -> str:
    """The ``run_id`` of ``pipeline``'s queue events: one subject token, never a run's id."""
    return "_queue-" + hashlib.sha256(pipeline.encode()).hexdigest()[:24]


def _batch_id(batch: Event, agent_id: str, entries: Iterable[str]) -> str:
    """A batch's message id: its kind, how many entries, and a hash of its agent (if any) and
    of each entry's line, so the same batch decided twice is stored once."""
    digest = hashlib.sha256(f"{agent_id}\n".encode() if agent_id else b"")
    n = 0
    for line in entries:
        digest.update(f"{line}\n".encode())
        n += 1
    return f"{batch.run_id}:{batch.kind}:{n}:{digest.hexdigest()[:32]}"


class QueuedRun(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One run of a ``queued_runs`` event: what that run's own ``queued`` would say."""

    run_id: str
    attempt: int = 1
    waiting_for: WaitingFor = WaitingFor.capacity


QUEUED_RUNS_ID = "_queued"  # the ``run_id`` of ``queued_runs`` events: never a run's id


class RunsQueued(Event, frozen=True, kw_only=True, tag="queued_runs"):
    """Several runs placed in their pipelines' queues by one decision pass: one event (one
    stored message) instead of one ``queued`` per run. ``run_id`` is ``QUEUED_RUNS_ID``, never
    a run; each of ``runs`` is applied, in order, exactly as that run's own ``queued`` at this
    point of the log (``queued()`` gives those events), and the runs take their places in
    their queues in that order. It is not on any run's own subjects: a reader of one run's
    events alone sees the run go from ``routing`` straight to ``dispatched``. Its message id
    names the runs and attempts it carries, so the same batch decided twice from one picture
    is stored once; a run in two different batches is queued by the first (a second
    ``queued`` of a queued run is ignored, as a duplicate ``queued`` would be)."""

    kind: ClassVar[str] = "queued_runs"
    runs: list[QueuedRun]

    def queued(self) -> list[RunQueued]:
        """The ``queued`` event each run of the batch stands for, in order."""
        return [self._of(r) for r in self.runs]

    def message_id(self) -> str:
        return _batch_id(self, "", (f"{r.run_id}:{r.attempt}:{r.waiting_for}" for r in self.runs))

    def each(self) -> list[RunQueued]:
        """Each run's own event, in order (``queued()``; every batch kind has ``each``)."""
        return self.queued()

    def one(self, run_id: str) -> RunQueued | None:
        """The ``queued`` this batch stands for for ``run_id`` (None: not in it)."""
        return next((self._of(r) for r in self.runs if r.run_id == run_id), None)

    def _of(self, r: QueuedRun) -> RunQueued:
        return RunQueued(run_id=r.run_id, at=self.at, attempt=r.attempt, waiting_for=r.waiting_for)


def queued_runs(events: list[RunQueued], at: float) -> RunsQueued:
    """One ``queued_runs`` event standing for ``events`` (in that order), stamped ``at``."""
    runs = [
        QueuedRun(run_id=e.run_id, attempt=e.attempt, waiting_for=e.waiting_for) for e in events
    ]
    return RunsQueued(run_id=QUEUED_RUNS_ID, at=at, runs=runs)


class RunDispatched(AttemptEvent, frozen=True, kw_only=True, tag="dispatched", omit_defaults=True):
    kind: ClassVar[str] = "dispatched"
    agent_id: str
    slot: str = "cpu"
    # what the agent needs to run the attempt, so that it reads nothing back from the log
    # (None: inputs too large to repeat here; the agent reads the run's ``submitted`` event)
    team: str | None = None
    pipeline: str | None = None
    inputs: list[RunIO] | None = None
    # the run has a callback URL: the agent appends its end where the webhook outbox reads it
    callback: bool = False


class DispatchedRun(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One run of a ``dispatched_runs`` event: what that run's own ``dispatched`` would say
    (its agent is the batch's)."""

    run_id: str
    attempt: int = 1
    slot: str = "cpu"
    team: str | None = None
    pipeline: str | None = None
    inputs: list[RunIO] | None = None
    callback: bool = False


DISPATCHED_RUNS_ID = "_dispatched"  # the ``run_id`` of ``dispatched_runs`` events: never a run's


class RunsDispatched(Event, frozen=True, kw_only=True, tag="dispatched_runs"):
    """Several runs dispatched to one agent by one decision pass: one event (one stored
    message, one delivery to the agent) instead of one ``dispatched`` per run. ``run_id`` is
    ``DISPATCHED_RUNS_ID``, never a run; it is appended where that agent's dispatches go
    (``jetrun.ev._dispatched.dispatched.<agent_id>``), and each of ``runs`` is applied, in
    order, exactly as that run's own ``dispatched`` at this point of the log (``dispatched()``
    gives those events): by every reader of the whole log and by the agent. It is not on any
    run's own subjects: a reader of one run's events alone sees the agent's events (``started``,
    an end) follow ``routing`` or ``queued`` (the state machine takes them there as the
    dispatch they imply). Its message id is a hash of the agent, runs and attempts it carries,
    so the same batch decided twice from one picture is stored once."""

    kind: ClassVar[str] = "dispatched_runs"
    agent_id: str
    runs: list[DispatchedRun]

    def dispatched(self) -> list[RunDispatched]:
        """The ``dispatched`` event each run of the batch stands for, in order."""
        return [self._of(r) for r in self.runs]

    def each(self) -> list[RunDispatched]:
        """Each run's own event, in order (``dispatched()``)."""
        return self.dispatched()

    def one(self, run_id: str) -> RunDispatched | None:
        """The ``dispatched`` this batch stands for for ``run_id`` (None: not in it)."""
        return next((self._of(r) for r in self.runs if r.run_id == run_id), None)

    def _of(self, r: DispatchedRun) -> RunDispatched:
        return RunDispatched(
            run_id=r.run_id,
            at=self.at,
            attempt=r.attempt,
            agent_id=self.agent_id,
            slot=r.slot,
            team=r.team,
            pipeline=r.pipeline,
            inputs=r.inputs,
            callback=r.callback,
        )

    def message_id(self) -> str:
        return _batch_id(self, self.agent_id, (f"{r.run_id}:{r.attempt}" for r in self.runs))


def dispatched_runs(events: list[RunDispatched], at: float) -> RunsDispatched:
    """One ``dispatched_runs`` event standing for ``events`` (in that order, all to one
    agent), stamped ``at``."""
    runs = [
        DispatchedRun(
            run_id=e.run_id,
            attempt=e.attempt,
            slot=e.slot,
            team=e.team,
            pipeline=e.pipeline,
            inputs=e.inputs,
            callback=e.callback,
        )
        for e in events
    ]
    return RunsDispatched(run_id=DISPATCHED_RUNS_ID, at=at, agent_id=events[0].agent_id, runs=runs)


class RunStarted(AttemptEvent, frozen=True, kw_only=True, tag="started"):
    kind: ClassVar[str] = "started"
    agent_id: str


class RunOutputProduced(AttemptEvent, frozen=True, kw_only=True, tag="output"):
    """One streamed output value; ``index`` orders them and makes a resend idempotent."""

    kind: ClassVar[str] = "output"
    # a negative index would crash the fold; a huge one would allocate placeholders up to it
    index: Annotated[int, msgspec.Meta(ge=0, le=MAX_OUTPUTS - 1)]
    output: RunIO

    def message_id(self) -> str:
        return f"{self.run_id}:{self.kind}:{self.attempt}:{self.index}"


class RunCompleted(AttemptEvent, frozen=True, kw_only=True, tag="completed", omit_defaults=True):
    """Success. The run's outputs are its first ``streamed`` outputs (this attempt's ``output``
    events, not repeated here) followed by ``outputs``. ``streamed`` is left out when 0, so a
    completion without streamed outputs is written as before the field existed."""

    kind: ClassVar[str] = "completed"
    outputs: list[RunIO]
    streamed: Annotated[int, msgspec.Meta(ge=0, le=MAX_OUTPUTS)] = 0
    # seconds the attempt's worker ran it (from ``started``'s time to this end), by the agent's
    # clock; not what it waited at the agent for a slot. None from agents that did not say
    ran_s: Annotated[float, msgspec.Meta(ge=0)] | None = None


class RunFailed(AttemptEvent, frozen=True, kw_only=True, tag="failed"):
    kind: ClassVar[str] = "failed"
    error: RunError


class RunTimedOut(AttemptEvent, frozen=True, kw_only=True, tag="timed_out"):
    """The attempt ran past the pipeline's execution timeout and was killed."""

    kind: ClassVar[str] = "timed_out"
    timeout_s: float


ENDED_RUNS_ID = "_ended"  # the ``run_id`` of ``ended_runs`` events: never a run's


class RunsEnded(Event, frozen=True, kw_only=True, tag="ended_runs"):
    """Several attempts one agent ended, ready in the same turn of its loop: one event (one
    stored message, one ack, one delivery to each reader) instead of one end each. ``run_id``
    is ``ENDED_RUNS_ID``, never a run; it is appended on ``jetrun.ev._ended.ended_runs.<agent>``
    (only that agent may publish there). Each of ``ends`` (a ``completed``, ``failed`` or
    ``timed_out``, in the order the attempts ended) is applied as that run's own end at this
    point of the log, by every reader of the whole log, but only to a run whose current attempt
    was dispatched to ``agent_id`` (``ended_by``); any other entry is ignored. Runs with a
    callback URL never go in one (their ends stay on the subjects the webhook outbox reads),
    and neither does an end too large for one. It is not on any run's own subjects (the state
    machine's rule 10). Its message id is a hash of the agent and each entry's run, attempt and
    kind, so a retried batch is stored once."""

    kind: ClassVar[str] = "ended_runs"
    agent_id: str
    ends: list[RunCompleted | RunFailed | RunTimedOut]

    def each(self) -> list[AnyEvent]:
        """Each run's own end, in order (a reader checks ``ended_by`` before applying one)."""
        return list(self.ends)

    def one(self, run_id: str) -> RunCompleted | RunFailed | RunTimedOut | None:
        """The end this batch stands for for ``run_id`` (None: not in it)."""
        for end in self.ends:
            if end.run_id == run_id:
                return end
        return None

    def message_id(self) -> str:
        entries = (f"{e.run_id}:{e.attempt}:{e.kind}" for e in self.ends)
        return _batch_id(self, self.agent_id, entries)


def ended_by(agent_id: str | None, batch: RunsEnded) -> bool:
    """Whether an entry of ``batch`` may apply to a run whose current attempt went to
    ``agent_id`` (the run record's ``agent_id``): only its own agent ends a run by batch."""
    return agent_id == batch.agent_id


# events that stand for one event of each of several runs
BATCHES = (RunsQueued, RunsDispatched, RunsEnded)


class RunPreempted(AttemptEvent, frozen=True, kw_only=True, tag="preempted"):
    """The node running the attempt was lost or recalled; the run ends ``node_preempted``."""

    kind: ClassVar[str] = "preempted"
    agent_id: str
    reason: str


class RunRequeued(AttemptEvent, frozen=True, kw_only=True, tag="requeued"):
    """The attempt was lost with retries left: the run goes back to the front of its queue
    as attempt ``attempt + 1``."""

    kind: ClassVar[str] = "requeued"
    agent_id: str
    reason: str


class RunNoResourcesAvailable(AttemptEvent, frozen=True, kw_only=True, tag="no_resources"):
    """No replica came alive in time (or none is alive and the run may not wait). ``reason``
    starts with a code (``no_resources_available: ...``, ``startup_error: ...``) and becomes
    the run's error message, of type ``error_type``."""

    kind: ClassVar[str] = "no_resources"
    reason: str
    error_type: ErrorType = ErrorType.unknown


class RunCancelRequested(Event, frozen=True, kw_only=True, tag="cancel_requested"):
    kind: ClassVar[str] = "cancel_requested"


class RunCancelled(Event, frozen=True, kw_only=True, tag="cancelled"):
    kind: ClassVar[str] = "cancelled"


class RunRestated(Event, frozen=True, kw_only=True, tag="restated"):
    """A live run as it stood after the event at ``of_seq`` (its last), recorded again by the
    leading scheduler before the events it was folded from age out of the log (retention): a
    reader that no longer has those events begins the run here. ``record`` is the
    ``contracts.run.RunRecord`` as builtins (that module imports this one); ``queue_ticket`` is
    its place in its pipeline's queue (``[group, sequence]``, or ``[group, sequence, index]``
    for a run a ``queued_runs`` batch queued at ``index`` > 0), kept across the restatement.
    Appended only if ``of_seq`` is still the run's last event, so it never hides a newer one."""

    kind: ClassVar[str] = "restated"
    of_seq: int
    record: dict[str, Any]
    queue_ticket: list[int] | None = None  # [group, sequence(, index in its batch)]

    def message_id(self) -> str:
        return f"{self.run_id}:{self.kind}:{self.of_seq}"


class SchedulerElected(Event, frozen=True, kw_only=True, tag="elected"):
    """A scheduler took the lease (``term``: the revision it took it at) and fenced the log:
    one marker per fence slot, ``run_id`` naming the slot (``_fence<n>``, never a run's id).
    Each decision it appends names a slot and expects the slot's last message to be its own
    marker, so once a newer scheduler's markers are stored the server refuses every decision
    of the older one. It changes no run (the state machine ignores it)."""

    kind: ClassVar[str] = "elected"
    holder: str
    term: int
    renewal: int = 0  # the markers written again (before they age out of the log), counted

    def message_id(self) -> str:
        return f"{self.run_id}:{self.kind}:{self.holder}:{self.term}:{self.renewal}"


AnyEvent = (
    RunSubmitted
    | RunAdmitted
    | RunQueued
    | RunWaitChanged
    | QueueWaitChanged
    | RunsQueued
    | RunDispatched
    | RunsDispatched
    | RunStarted
    | RunOutputProduced
    | RunCompleted
    | RunFailed
    | RunTimedOut
    | RunsEnded
    | RunPreempted
    | RunRequeued
    | RunNoResourcesAvailable
    | RunCancelRequested
    | RunCancelled
    | RunRestated
    | SchedulerElected
)

EVENT_TYPES: tuple[type[Event], ...] = (
    RunSubmitted,
    RunAdmitted,
    RunQueued,
    RunWaitChanged,
    QueueWaitChanged,
    RunsQueued,
    RunDispatched,
    RunsDispatched,
    RunStarted,
    RunOutputProduced,
    RunCompleted,
    RunFailed,
    RunTimedOut,
    RunsEnded,
    RunPreempted,
    RunRequeued,
    RunNoResourcesAvailable,
    RunCancelRequested,
    RunCancelled,
    RunRestated,
    SchedulerElected,
)

_encoder = msgspec.json.Encoder()
_decoder: msgspec.json.Decoder[AnyEvent] = msgspec.json.Decoder(AnyEvent)
_list_decoder: msgspec.json.Decoder[list[AnyEvent]] = msgspec.json.Decoder(list[AnyEvent])


def encode_event(event: Event) -> bytes:
    return _encoder.encode(event)


def decode_event(data: bytes) -> AnyEvent:
    """Decode one event; raises ``msgspec.ValidationError`` or ``msgspec.DecodeError``."""
    return _decoder.decode(data)


def decode_events(data: bytes) -> list[AnyEvent]:
    return _list_decoder.decode(data)


def to_builtins(event: Event) -> Any:
    return msgspec.to_builtins(event)
