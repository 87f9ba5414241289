"""The run state machine: one table, one rule for everything outside it, and a pure fold.

Rules of this machine:
1. ``TRANSITIONS[state][event type]`` is the next state. Nothing else moves a run.
2. An event the table does not list for the run's state is *ignored*: the run comes back
   unchanged (``Verdict.illegal``). That is the one explicit rule for illegal transitions;
   ``evolve_strict`` raises instead, for callers that want to hear about them.
3. Terminal states absorb everything (they have no row in the table).
4. An event of an attempt that is not the run's current attempt changes nothing
   (``Verdict.stale``): a zombie node can never complete a run twice.
5. Applying an event is idempotent, and ``updated_at`` only moves forward, so a duplicate
   event changes nothing wherever it appears after the original.
6. One event may stand for two: a ``submitted`` that carries its admission (a gateway's single
   append) is applied as that ``submitted`` and then the ``admitted`` it implies, each by the
   table, so the run goes from ``unknown`` through ``created`` to ``routing`` at once.
7. A ``restated`` event (a live run recorded again before its events age out of the log) gives
   a run this fold does not know (``unknown``: its earlier events were not read) the recorded
   run; a known run already is that run (it is appended only while ``of_seq`` is the run's last
   event), so there it changes nothing.
8. A queue's event (``queue_waiting``) names its pipeline, not a run: it applies to every run of
   that pipeline that is queued where it stands in the log, as a ``waiting`` would to each
   (``fold`` applies it to the one run; readers of the whole log keep it once for the queue and
   a queued run takes it on when read: ``runtime.infra.queue_log``).
9. A batch of ``queued`` (``queued_runs``: one decision pass's runs placed in their queues, in
   one event) is, for each run it names, that run's own ``queued`` where the batch stands in
   the log; for any other run it is foreign (``fold`` applies the one run's entry; readers of
   the whole log apply every entry in order: ``RunsQueued.queued()``). A batch of
   ``dispatched`` (``dispatched_runs``: the runs one pass dispatched to one agent) is the same
   for each run's own ``dispatched`` (``RunsDispatched.dispatched()``).
10. A run's own subjects do not hold a batch (rule 9): a reader of them alone sees the agent's
   events of an attempt (``started``, ``output``, an end) and the scheduler's loss of it
   (``preempted``, ``requeued``) follow ``routing`` or ``queued``. The table takes them there
   as the dispatch they imply, for the run's current attempt only (rule 4), for such a reader
   only (``fold``, ``evolve(..., own_subjects=True)``). In the whole log a dispatch always
   comes first, so there such an event is one no dispatch implies (another agent's forgery:
   any agent may append an attempt's events for any run): a reader of the whole log
   (``evolve``: every ``RunIndex``, so what the scheduler decides from) leaves the run as it
   is (``Verdict.illegal``).
11. A batch of ends (``ended_runs``: attempts one agent ended in the same turn of its loop) is,
   for each run it names, that run's own end where the batch stands in the log, but only if
   the run's current attempt was dispatched to the batch's agent (``ended_by``); otherwise,
   and for any other run, it is foreign. A run's own subjects do not hold it (rule 10).
No I/O, no clock: time is a field of each event. The same events give the same run anywhere.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from contracts.errors import ErrorType, RunError
from contracts.events import (
    BATCHES,
    AttemptEvent,
    Event,
    QueueWaitChanged,
    RunAdmitted,
    RunCancelled,
    RunCancelRequested,
    RunCompleted,
    RunDispatched,
    RunFailed,
    RunNoResourcesAvailable,
    RunOutputProduced,
    RunPreempted,
    RunQueued,
    RunRequeued,
    RunRestated,
    RunsDispatched,
    RunsEnded,
    RunsQueued,
    RunStarted,
    RunSubmitted,
    RunTimedOut,
    RunWaitChanged,
    ended_by,
)
from contracts.outputs import Outputs, encode_hook
from contracts.run import RunRecord
from contracts.states import RunState, WaitingFor
from contracts.values import RunIO

S = RunState

# rule 10: what a run's attempt may be told after a dispatch that a reader of its own subjects
# does not see (a ``dispatched_runs`` batch), and where it takes the run
_AFTER_AN_UNSEEN_DISPATCH: dict[type[Event], RunState] = {
    RunStarted: S.running,
    RunOutputProduced: S.running,
    RunCompleted: S.completed,
    RunTimedOut: S.failed,
    RunPreempted: S.node_preempted,
    RunRequeued: S.queued,
}

TRANSITIONS: dict[RunState, dict[type[Event], RunState]] = {
    S.unknown: {RunSubmitted: S.created},
    S.created: {
        RunAdmitted: S.routing,
        RunFailed: S.failed,  # never admitted: a submission that bypassed admission
        RunCancelRequested: S.created,
        RunCancelled: S.cancelled,
    },
    S.routing: {
        RunQueued: S.queued,
        RunDispatched: S.running,  # a replica had a free slot and nothing was queued before it
        RunNoResourcesAvailable: S.no_resources_available,
        RunFailed: S.failed,
        RunCancelRequested: S.routing,
        RunCancelled: S.cancelled,
        **_AFTER_AN_UNSEEN_DISPATCH,
    },
    S.queued: {
        RunWaitChanged: S.queued,
        QueueWaitChanged: S.queued,
        RunDispatched: S.running,
        RunNoResourcesAvailable: S.no_resources_available,
        RunFailed: S.failed,
        RunCancelRequested: S.queued,
        RunCancelled: S.cancelled,
        **_AFTER_AN_UNSEEN_DISPATCH,
    },
    S.running: {
        RunStarted: S.running,
        RunOutputProduced: S.running,
        RunCompleted: S.completed,
        RunFailed: S.failed,
        RunTimedOut: S.failed,
        RunPreempted: S.node_preempted,
        RunRequeued: S.queued,
        RunCancelRequested: S.running,
        RunCancelled: S.cancelled,
    },
}


# rule 10's rows: only a reader of a run's own subjects takes them
OWN_SUBJECTS_ONLY: frozenset[tuple[RunState, type[Event]]] = frozenset(
    (state, kind) for state in (S.routing, S.queued) for kind in _AFTER_AN_UNSEEN_DISPATCH
)
# what a reader of the whole log goes by: the table without them
_WHOLE_LOG: dict[RunState, dict[type[Event], RunState]] = {
    state: {kind: to for kind, to in row.items() if (state, kind) not in OWN_SUBJECTS_ONLY}
    for state, row in TRANSITIONS.items()
}


class Verdict(enum.StrEnum):
    applied = "applied"
    illegal = "illegal"  # not in the table for the run's state (terminal states included)
    stale = "stale"  # from an attempt that is not the current one
    foreign = "foreign"  # about another run


class IllegalTransition(Exception):
    def __init__(self, run: RunRecord, event: Event, verdict: Verdict) -> None:
        super().__init__(
            f"{type(event).__name__} ({verdict}) for run {run.id} in state {run.state}"
            f" at attempt {run.attempt}"
        )
        self.verdict = verdict


def judge(run: RunRecord, event: Event, own_subjects: bool = False) -> Verdict:
    """What ``evolve`` would do with ``event``, without doing it. A queue's event is about
    every run of its pipeline (rule 8)."""
    if isinstance(event, BATCHES):  # rules 9 and 11
        own = event.one(run.id)
        if own is None or (isinstance(event, RunsEnded) and not ended_by(run.agent_id, event)):
            return Verdict.foreign
        return judge(run, own, own_subjects)
    if isinstance(event, QueueWaitChanged):
        if event.pipeline != run.pipeline:
            return Verdict.foreign
    elif event.run_id != run.id:
        return Verdict.foreign
    table = TRANSITIONS if own_subjects else _WHOLE_LOG
    if type(event) not in table.get(run.state, {}):
        return Verdict.illegal
    if isinstance(event, AttemptEvent) and event.attempt != run.attempt:
        return Verdict.stale
    return Verdict.applied


def evolve(run: RunRecord, event: Event, own_subjects: bool = False) -> RunRecord:
    """The run after ``event`` (and what it implies: rule 6); the same run if the event is
    illegal, stale or foreign. ``own_subjects``: ``event`` is read from the run's own subjects
    alone, not from the whole log (rule 10)."""
    table = TRANSITIONS if own_subjects else _WHOLE_LOG
    if isinstance(event, RunRestated):  # rule 7
        if event.run_id != run.id or run.state is not S.unknown:
            return run
        return restated_record(event)
    kind = type(event)
    if kind is RunsQueued or kind is RunsDispatched:  # rule 9 (identity tests: every event)
        own = event.one(run.id)  # type: ignore[attr-defined]
        return run if own is None else _evolve_one(run, own, table)
    if kind is RunsEnded:  # rule 11
        end = event.one(run.id)  # type: ignore[attr-defined]
        if end is None or not ended_by(run.agent_id, event):  # type: ignore[arg-type]
            return run
        return _evolve_one(run, end, table)
    after = _evolve_one(run, event, table)
    if after is not run and isinstance(event, RunSubmitted):
        follow = event.implied()
        if follow is not None:
            after = _evolve_one(after, follow, table)
    return after


def _evolve_one(
    run: RunRecord, event: Event, table: dict[RunState, dict[type[Event], RunState]]
) -> RunRecord:
    # ``judge``'s rules, read once per event (every process applies every event): the next
    # state for this kind in this state, then foreign and stale events left out
    kind = type(event)
    state = table.get(run.state, _NO_MOVES).get(kind)
    if state is None:  # illegal (terminal states included)
        return run
    if kind in _QUEUE_KINDS:
        if event.pipeline != run.pipeline:  # type: ignore[attr-defined]
            return run
    elif event.run_id != run.id:
        return run
    if kind in _ATTEMPT_KINDS and event.attempt != run.attempt:  # type: ignore[attr-defined]
        return run
    changes = _APPLY[kind](run, event)
    at = event.at
    if state.is_terminal:
        changes["resources_since"] = None
        changes["waiting_for"] = None
    else:
        waiting = changes.get("waiting_for", run.waiting_for)
        changes["resources_since"] = _resources_since(run, waiting, at)
        if run.cancel_requested or kind is RunCancelRequested:
            changes["waiting_for"] = WaitingFor.cancellation
    updated = run.updated_at
    return msgspec.structs.replace(
        run, state=state, updated_at=at if at > updated else updated, **changes
    )


def queued_in(batch: RunsQueued, run_id: str) -> RunQueued | None:
    """The ``queued`` that ``batch`` stands for for ``run_id`` (None: not in it). A fold of
    one run's history asks once per batch; readers of the whole log use ``batch.queued()``."""
    return batch.one(run_id)


_NO_MOVES: dict[type[Event], RunState] = {}
_KINDS = {kind for moves in TRANSITIONS.values() for kind in moves}
_QUEUE_KINDS = frozenset(k for k in _KINDS if issubclass(k, QueueWaitChanged))
_ATTEMPT_KINDS = frozenset(k for k in _KINDS if issubclass(k, AttemptEvent))


WAITS_FOR_A_REPLICA = frozenset({WaitingFor.resources, WaitingFor.cold_start})


def _resources_since(run: RunRecord, waiting: WaitingFor | None, at: float) -> float | None:
    """A wait for a replica starts when the run begins waiting for one (queued or told so) and
    lasts while it waits for one; a cancel request does not end it; anything else does (a
    requeued run waits for capacity first, so its next wait for a replica is a new one).
    ``waiting`` is what the event says the run waits for, before a pending cancel outranks it."""
    if waiting in WAITS_FOR_A_REPLICA:
        return run.resources_since if run.resources_since is not None else at
    if waiting is WaitingFor.cancellation:
        return run.resources_since
    return None


def _decode_hook(kind: type, obj: Any) -> Any:
    if kind is Outputs:
        return Outputs(msgspec.convert(obj, list[RunIO]))
    raise NotImplementedError(f"cannot decode {kind.__name__}")


def restate(run: RunRecord, of_seq: int, at: float, ticket: tuple[int, ...] | None) -> RunRestated:
    """The ``restated`` event of ``run`` as it stands after the event at ``of_seq``. Its queue
    ticket is written ``[group, sequence]`` unless the run was queued by a batch at an index
    other than 0 (``[group, sequence, index]``), so a reader that knows only the two-element
    form reads every other ticket exactly."""
    record = msgspec.to_builtins(run, enc_hook=encode_hook)
    place = None
    if ticket is not None:
        place = list(ticket[:2]) if len(ticket) < 3 or not ticket[2] else list(ticket[:3])
    return RunRestated(run_id=run.id, at=at, of_seq=of_seq, record=record, queue_ticket=place)


def restated_record(event: RunRestated) -> RunRecord:
    """The run a ``restated`` event records (rule 7)."""
    run = msgspec.convert(event.record, RunRecord, dec_hook=_decode_hook)
    return msgspec.structs.replace(run, id=event.run_id)


def evolve_strict(run: RunRecord, event: Event, own_subjects: bool = False) -> RunRecord:
    """Like ``evolve``, but raises ``IllegalTransition`` instead of ignoring an event."""
    verdict = judge(run, event, own_subjects)
    if verdict is not Verdict.applied:
        raise IllegalTransition(run, event, verdict)
    return evolve(run, event, own_subjects)


def fold(
    events: Iterable[Event], run_id: str | None = None, own_subjects: bool = True
) -> RunRecord:
    """The run that ``events`` (in log order: its own subjects, rule 10, unless
    ``own_subjects`` is False) describe. ``run_id`` defaults to the first event's run; an empty
    log gives a run in state ``unknown``."""
    it = iter(events)
    first = next(it, None)
    if first is None:
        return RunRecord(id=run_id or "")
    run = evolve(RunRecord(id=run_id or first.run_id), first, own_subjects)
    for event in it:
        run = evolve(run, event, own_subjects)
    return run


# --- what each event changes, beside the state -------------------------------------------

Changes = dict[str, Any]


def _submitted(run: RunRecord, e: RunSubmitted) -> Changes:
    return {
        "team": e.team,
        "pipeline": e.pipeline,
        "inputs": e.inputs,
        "created_at": e.at,
        "async_run": e.async_run,
        "wait_for_resources": e.wait_for_resources,
        "idempotency_key": e.idempotency_key,
        "waiting_for": WaitingFor.admission,
        "callback_url": e.callback_url,
    }


def _admitted(run: RunRecord, e: RunAdmitted) -> Changes:
    return {"tier": e.tier, "slot": e.slot, "attempt": 1, "waiting_for": WaitingFor.placement}


def _queued(run: RunRecord, e: RunQueued) -> Changes:
    return {"waiting_for": e.waiting_for}


def _wait_changed(run: RunRecord, e: RunWaitChanged) -> Changes:
    return {"waiting_for": e.waiting_for}


def _queue_wait_changed(run: RunRecord, e: QueueWaitChanged) -> Changes:
    return {"waiting_for": e.waiting_for}


def _dispatched(run: RunRecord, e: RunDispatched) -> Changes:
    return {"agent_id": e.agent_id, "waiting_for": WaitingFor.worker}


def _started(run: RunRecord, e: RunStarted) -> Changes:
    return {"agent_id": e.agent_id, "waiting_for": WaitingFor.execution}


def _output(run: RunRecord, e: RunOutputProduced) -> Changes:
    return {"outputs": Outputs.of(run.outputs).put(e.index, e.output)}  # O(1), no copy


def _completed(run: RunRecord, e: RunCompleted) -> Changes:
    # the first ``streamed`` outputs are this attempt's ``output`` events, not repeated here
    return {"outputs": Outputs.of(run.outputs).extend_from(e.streamed, e.outputs)}


def _failed(run: RunRecord, e: RunFailed) -> Changes:
    return {"error": e.error}


def _timed_out(run: RunRecord, e: RunTimedOut) -> Changes:
    message = f"the run exceeded the pipeline's execution timeout of {e.timeout_s:g} s"
    return {"error": RunError(type=ErrorType.timeout, message=message)}


def _preempted(run: RunRecord, e: RunPreempted) -> Changes:
    error = RunError(type=ErrorType.unknown, message=e.reason)
    return {"preemptions": run.preemptions + 1, "error": error}


def _no_resources(run: RunRecord, e: RunNoResourcesAvailable) -> Changes:
    return {"error": RunError(type=e.error_type, message=e.reason)}


def _requeued(run: RunRecord, e: RunRequeued) -> Changes:
    return {
        "attempt": run.attempt + 1,
        "agent_id": None,
        "outputs": Outputs(),
        "preemptions": run.preemptions + 1,
        "waiting_for": WaitingFor.capacity,
    }


def _no_changes(run: RunRecord, e: Event) -> Changes:
    return {}


def _cancel_requested(run: RunRecord, e: RunCancelRequested) -> Changes:
    return {"cancel_requested": True}


_APPLY: dict[type[Event], Callable[[RunRecord, Any], Changes]] = {
    RunSubmitted: _submitted,
    RunAdmitted: _admitted,
    RunQueued: _queued,
    RunWaitChanged: _wait_changed,
    QueueWaitChanged: _queue_wait_changed,
    RunDispatched: _dispatched,
    RunStarted: _started,
    RunOutputProduced: _output,
    RunCompleted: _completed,
    RunFailed: _failed,
    RunTimedOut: _timed_out,
    RunPreempted: _preempted,
    RunRequeued: _requeued,
    RunNoResourcesAvailable: _no_resources,
    RunCancelRequested: _cancel_requested,
    RunCancelled: _no_changes,
}


def mermaid_diagram() -> str:
    """The state diagram of ``TRANSITIONS`` in Mermaid syntax (docs/architecture.md)."""
    lines = ["stateDiagram-v2", "    [*] --> unknown"]
    for state, row in TRANSITIONS.items():
        for event_type, target in row.items():
            kind = getattr(event_type, "kind", event_type.__name__)
            lines.append(f"    {state.value} --> {target.value}: {kind}")
        if state is S.unknown:  # rule 6: a submission that carries its admission
            lines.append(f"    {S.unknown.value} --> {S.routing.value}: submitted (admitted)")
    for state in RunState:
        if state.is_terminal:
            lines.append(f"    {state.value} --> [*]")
    return "\n".join(lines) + "\n"
