"""Table tests of the run state machine: every legal transition, every illegal pair, stale
attempts and foreign runs, and the fold around them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from contracts.errors import ErrorType, RunError
from contracts.events import (
    EVENT_TYPES,
    AdmissionGrant,
    AdmissionSlot,
    AnyEvent,
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
    SchedulerElected,
    decode_event,
    encode_event,
    queue_id,
    queued_runs,
)
from contracts.machine import (
    OWN_SUBJECTS_ONLY,
    TRANSITIONS,
    IllegalTransition,
    Verdict,
    evolve,
    evolve_strict,
    fold,
    judge,
    mermaid_diagram,
    restate,
    restated_record,
)
from contracts.run import RunRecord
from contracts.states import TERMINAL_STATES, RunState, WaitingFor
from contracts.values import IOType, RunIO, from_python

RUN = "run_table"
T0 = 1_700_000_000.0
AT = T0 + 100.0  # the time of the event under test: later than every prefix event
# the events of the table (rules 1-6); ``restated`` is rule 7 and the batches rule 9,
# tested on their own below
TABLE_EVENT_TYPES = [
    t for t in EVENT_TYPES if t not in (RunRestated, RunsQueued, RunsDispatched, RunsEnded)
]


# --- realistic prefixes: the log of a run that has reached a given state -------------------------


def submitted(at: float = T0) -> RunSubmitted:
    return RunSubmitted(
        run_id=RUN,
        at=at,
        team="team-a",
        pipeline="demo/echo:v1",
        inputs=[from_python("hello"), from_python(3)],
        async_run=True,
        wait_for_resources=True,
        idempotency_key="key-7",
    )


def admitted(at: float = T0 + 1) -> RunAdmitted:
    return RunAdmitted(
        run_id=RUN, at=at, tier="pro", slot=AdmissionSlot(stream="ADMISSION", seq=12)
    )


def queued(attempt: int = 1, at: float = T0 + 2) -> RunQueued:
    return RunQueued(run_id=RUN, at=at, attempt=attempt, waiting_for=WaitingFor.cold_start)


def dispatched(attempt: int = 1, at: float = T0 + 3, agent: str = "agent-a") -> RunDispatched:
    return RunDispatched(run_id=RUN, at=at, attempt=attempt, agent_id=agent, slot="gpu")


def started(attempt: int = 1, at: float = T0 + 4, agent: str = "agent-a") -> RunStarted:
    return RunStarted(run_id=RUN, at=at, attempt=attempt, agent_id=agent)


def output(index: int, value: Any, attempt: int = 1, at: float = T0 + 5) -> RunOutputProduced:
    return RunOutputProduced(
        run_id=RUN, at=at, attempt=attempt, index=index, output=from_python(value)
    )


def requeued(attempt: int = 1, at: float = T0 + 6) -> RunRequeued:
    return RunRequeued(run_id=RUN, at=at, attempt=attempt, agent_id="agent-a", reason="node lost")


def cancel_requested(at: float) -> RunCancelRequested:
    return RunCancelRequested(run_id=RUN, at=at)


_TO_CREATED: list[AnyEvent] = [submitted()]
_TO_ROUTING: list[AnyEvent] = [*_TO_CREATED, admitted()]
_TO_QUEUED: list[AnyEvent] = [*_TO_ROUTING, queued()]
_TO_RUNNING: list[AnyEvent] = [*_TO_QUEUED, dispatched()]
_TO_EXECUTING: list[AnyEvent] = [*_TO_RUNNING, started(), output(0, "partial")]
_TO_REQUEUED: list[AnyEvent] = [*_TO_EXECUTING, requeued()]

#: Several realistic ways into each state (first attempt, retried attempt, cancel pending).
PREFIXES: dict[RunState, dict[str, list[AnyEvent]]] = {
    RunState.unknown: {"empty log": []},
    RunState.created: {
        "submitted": _TO_CREATED,
        "cancel pending": [*_TO_CREATED, cancel_requested(T0 + 0.5)],
    },
    RunState.routing: {
        "admitted": _TO_ROUTING,
        "cancel pending": [*_TO_ROUTING, cancel_requested(T0 + 1.5)],
    },
    RunState.queued: {
        "first attempt": _TO_QUEUED,
        "requeued, attempt 2": _TO_REQUEUED,
        "cancel pending": [*_TO_QUEUED, cancel_requested(T0 + 2.5)],
    },
    RunState.running: {
        "dispatched": _TO_RUNNING,
        "executing with an output": _TO_EXECUTING,
        "attempt 2": [
            *_TO_REQUEUED,
            dispatched(2, T0 + 7, "agent-b"),
            started(2, T0 + 8, "agent-b"),
        ],
        "cancel pending": [*_TO_EXECUTING, cancel_requested(T0 + 5.5)],
    },
    RunState.completed: {
        "completed": [
            *_TO_EXECUTING,
            RunCompleted(run_id=RUN, at=T0 + 6, attempt=1, outputs=[from_python("done")]),
        ]
    },
    RunState.failed: {
        "failed": [
            *_TO_EXECUTING,
            RunFailed(
                run_id=RUN,
                at=T0 + 6,
                attempt=1,
                error=RunError(type=ErrorType.pipeline_error, message="boom"),
            ),
        ],
        "timed out": [*_TO_EXECUTING, RunTimedOut(run_id=RUN, at=T0 + 6, attempt=1, timeout_s=5)],
    },
    RunState.no_resources_available: {
        "no resources": [
            *_TO_ROUTING,
            RunNoResourcesAvailable(run_id=RUN, at=T0 + 2, attempt=1, reason="no replica"),
        ]
    },
    RunState.node_preempted: {
        "preempted": [
            *_TO_EXECUTING,
            RunPreempted(run_id=RUN, at=T0 + 6, attempt=1, agent_id="agent-a", reason="lost"),
        ]
    },
    RunState.cancelled: {
        "cancelled": [
            *_TO_QUEUED,
            cancel_requested(T0 + 3),
            RunCancelled(run_id=RUN, at=T0 + 4),
        ]
    },
}


def run_in(state: RunState, how: str) -> RunRecord:
    run = fold(PREFIXES[state][how], run_id=RUN)
    assert run.state is state, f"prefix {how!r} folds to {run.state}, not {state}"
    return run


def all_prefixes(states: list[RunState]) -> list[tuple[RunState, str]]:
    return [(state, how) for state in states for how in PREFIXES[state]]


# --- one event of each type, for a given run, and what it must change ----------------------------


def event_for(event_type: type[Event], run: RunRecord, **overrides: Any) -> AnyEvent:
    """An event of ``event_type`` for ``run``'s current attempt, at time ``AT``."""
    base: dict[str, Any] = {"run_id": RUN, "at": AT}
    attempt: dict[str, Any] = {**base, "attempt": run.attempt}
    make: dict[type[Event], Callable[[], AnyEvent]] = {
        RunSubmitted: lambda: submitted(AT),
        RunAdmitted: lambda: admitted(AT),
        RunQueued: lambda: RunQueued(**attempt, waiting_for=WaitingFor.resources),
        RunWaitChanged: lambda: RunWaitChanged(**attempt, waiting_for=WaitingFor.capacity),
        QueueWaitChanged: lambda: QueueWaitChanged(
            run_id=queue_id(run.pipeline),
            at=AT,
            pipeline=run.pipeline,
            waiting_for=WaitingFor.capacity,
        ),
        RunDispatched: lambda: RunDispatched(**attempt, agent_id="agent-z", slot="gpu"),
        RunStarted: lambda: RunStarted(**attempt, agent_id="agent-z"),
        RunOutputProduced: lambda: RunOutputProduced(
            **attempt, index=2, output=RunIO(type=IOType.string, value="third")
        ),
        RunCompleted: lambda: RunCompleted(**attempt, outputs=[from_python(1.5)]),
        RunFailed: lambda: RunFailed(
            **attempt,
            error=RunError(type=ErrorType.pipeline_error, message="ValueError: x", traceback="tb"),
        ),
        RunTimedOut: lambda: RunTimedOut(**attempt, timeout_s=90.0),
        RunPreempted: lambda: RunPreempted(**attempt, agent_id="agent-a", reason="spot recall"),
        RunRequeued: lambda: RunRequeued(**attempt, agent_id="agent-a", reason="node lost"),
        RunNoResourcesAvailable: lambda: RunNoResourcesAvailable(**attempt, reason="none alive"),
        RunCancelRequested: lambda: RunCancelRequested(**base),
        RunCancelled: lambda: RunCancelled(**base),
        SchedulerElected: lambda: SchedulerElected(**base, holder="scheduler-1", term=3),
    }
    event = make[event_type]()
    return msgspec.structs.replace(event, **overrides) if overrides else event


def expected_changes(run: RunRecord, event: AnyEvent) -> dict[str, Any]:
    """The fields ``event`` sets on ``run``, written out by hand from the spec."""
    match event:
        case RunSubmitted():
            return {
                "team": event.team,
                "pipeline": event.pipeline,
                "inputs": event.inputs,
                "created_at": event.at,
                "async_run": event.async_run,
                "wait_for_resources": event.wait_for_resources,
                "idempotency_key": event.idempotency_key,
                "waiting_for": WaitingFor.admission,
            }
        case RunAdmitted():
            return {
                "tier": event.tier,
                "slot": event.slot,
                "attempt": 1,
                "waiting_for": WaitingFor.placement,
            }
        case RunQueued() | RunWaitChanged() | QueueWaitChanged():
            return {"waiting_for": event.waiting_for}
        case RunDispatched():
            return {"agent_id": event.agent_id, "waiting_for": WaitingFor.worker}
        case RunStarted():
            return {"agent_id": event.agent_id, "waiting_for": WaitingFor.execution}
        case RunOutputProduced():
            outputs = list(run.outputs)
            outputs += [RunIO(type=IOType.none)] * (event.index + 1 - len(outputs))
            outputs[event.index] = event.output
            return {"outputs": outputs}
        case RunCompleted():
            return {"outputs": event.outputs, "waiting_for": None}
        case RunFailed():
            return {"error": event.error, "waiting_for": None}
        case RunTimedOut():
            message = "the run exceeded the pipeline's execution timeout of 90 s"
            return {"error": RunError(type=ErrorType.timeout, message=message), "waiting_for": None}
        case RunPreempted():
            error = RunError(type=ErrorType.unknown, message=event.reason)
            return {"preemptions": run.preemptions + 1, "error": error, "waiting_for": None}
        case RunRequeued():
            return {
                "attempt": run.attempt + 1,
                "agent_id": None,
                "outputs": [],
                "preemptions": run.preemptions + 1,
                "waiting_for": WaitingFor.capacity,
            }
        case RunNoResourcesAvailable():
            return {
                "error": RunError(type=event.error_type, message=event.reason),
                "waiting_for": None,
            }
        case RunCancelled():
            return {"waiting_for": None}
        case RunCancelRequested():
            return {"cancel_requested": True, "waiting_for": WaitingFor.cancellation}
    raise AssertionError(f"no expectation for {type(event).__name__}")


LEGAL = [
    (state, how, event_type)
    for state, row in TRANSITIONS.items()
    for how in PREFIXES[state]
    for event_type in row
]
ILLEGAL = [
    (state, how, event_type)
    for state in RunState
    for how in PREFIXES[state]
    for event_type in TABLE_EVENT_TYPES
    if event_type not in TRANSITIONS.get(state, {})
]


def _id(value: object) -> str:
    if isinstance(value, type):
        return value.__name__
    return str(value).replace(" ", "_")


# --- legal transitions ---------------------------------------------------------------------------


def expected_resources_since(run: RunRecord, changes: dict[str, Any], ends: bool) -> float | None:
    """SPEC 3: the resource wait counts from when the run began waiting for a replica."""
    waiting = changes.get("waiting_for", run.waiting_for)
    if ends or waiting not in (
        WaitingFor.resources,
        WaitingFor.cold_start,
        WaitingFor.cancellation,
    ):
        return None
    if run.resources_since is not None or waiting is WaitingFor.cancellation:
        return run.resources_since  # the same wait goes on
    return AT  # a new wait starts with this event


@pytest.mark.parametrize(("state", "how", "event_type"), LEGAL, ids=_id)
def test_legal_transition(state: RunState, how: str, event_type: type[Event]) -> None:
    run = run_in(state, how)
    event = event_for(event_type, run)
    own = (state, event_type) in OWN_SUBJECTS_ONLY  # rule 10: a reader of its own subjects
    after = evolve(run, event, own)

    target = TRANSITIONS[state][event_type]
    changes = expected_changes(run, event)
    changes["resources_since"] = expected_resources_since(run, changes, target.is_terminal)
    if not target.is_terminal and run.cancel_requested:
        changes["waiting_for"] = WaitingFor.cancellation  # a pending cancel outranks the rest
    assert judge(run, event, own) is Verdict.applied
    assert after.state is target
    assert after == msgspec.structs.replace(run, state=target, updated_at=AT, **changes)
    assert evolve_strict(run, event, own) == after
    if own:  # a reader of the whole log saw no dispatch: another agent's event, ignored
        assert judge(run, event) is Verdict.illegal and evolve(run, event) is run


def test_every_state_of_the_table_has_a_prefix() -> None:
    states = set(TRANSITIONS) | {s for row in TRANSITIONS.values() for s in row.values()}
    assert states <= set(PREFIXES)
    assert set(PREFIXES) == set(RunState)


def test_the_table_is_the_specs_lifecycle() -> None:
    """Terminal states have no row; every other reachable state has one."""
    assert not TERMINAL_STATES & set(TRANSITIONS)
    targets = {s for row in TRANSITIONS.values() for s in row.values()}
    assert targets >= TERMINAL_STATES
    assert {s for s in targets if not s.is_terminal} <= set(TRANSITIONS)
    assert RunState.unknown not in targets  # nothing moves a run back to unknown


def test_updated_at_only_moves_forward() -> None:
    run = run_in(RunState.running, "executing with an output")
    late_clock = event_for(RunStarted, run, at=T0 - 50)
    after = evolve(run, late_clock)
    assert after.updated_at == run.updated_at == T0 + 5
    assert after.waiting_for is WaitingFor.execution


def test_outputs_out_of_order_are_placed_by_index() -> None:
    run = fold([*_TO_RUNNING, output(1, "b"), output(0, "a")])
    assert [o.value for o in run.outputs] == ["a", "b"]
    gap = fold([*_TO_RUNNING, output(2, "c")])
    assert gap.outputs == [RunIO(type=IOType.none), RunIO(type=IOType.none), from_python("c")]


def test_cancel_request_marks_every_later_non_terminal_state() -> None:
    events = [submitted(), cancel_requested(T0 + 0.5), admitted(), queued(), dispatched()]
    run = fold([*events, started()])
    assert run.state is RunState.running
    assert run.cancel_requested
    assert run.waiting_for is WaitingFor.cancellation
    ended = evolve(run, RunCancelled(run_id=RUN, at=AT))
    assert ended.state is RunState.cancelled
    assert ended.waiting_for is None


# --- illegal pairs: one explicit rule ------------------------------------------------------------


@pytest.mark.parametrize(("state", "how", "event_type"), ILLEGAL, ids=_id)
def test_illegal_pair_is_ignored(state: RunState, how: str, event_type: type[Event]) -> None:
    run = run_in(state, how)
    event = event_for(event_type, run)  # the current attempt: illegal, not stale

    assert judge(run, event) is Verdict.illegal
    assert evolve(run, event) is run
    with pytest.raises(IllegalTransition) as raised:
        evolve_strict(run, event)
    assert raised.value.verdict is Verdict.illegal
    assert type(event).__name__ in str(raised.value)
    assert f"state {state}" in str(raised.value)


def test_illegal_pairs_cover_terminal_states_and_every_event_type() -> None:
    for state in TERMINAL_STATES:
        assert {t for s, _, t in ILLEGAL if s is state} == set(TABLE_EVENT_TYPES)
    pairs = {(s, t) for s, _, t in LEGAL} | {(s, t) for s, _, t in ILLEGAL}
    assert pairs == {(s, t) for s in RunState for t in TABLE_EVENT_TYPES}


# --- stale attempts ------------------------------------------------------------------------------

ATTEMPT_TRANSITIONS = [
    (state, how, event_type)
    for state, how, event_type in LEGAL
    if issubclass(event_type, AttemptEvent)
]


@pytest.mark.parametrize("offset", [-1, +1], ids=["older", "newer"])
@pytest.mark.parametrize(("state", "how", "event_type"), ATTEMPT_TRANSITIONS, ids=_id)
def test_event_of_another_attempt_is_stale(
    state: RunState, how: str, event_type: type[Event], offset: int
) -> None:
    run = run_in(state, how)
    event = event_for(event_type, run, attempt=run.attempt + offset)
    own = (state, event_type) in OWN_SUBJECTS_ONLY  # rule 10: a reader of its own subjects

    assert judge(run, event, own) is Verdict.stale
    assert evolve(run, event, own) is run
    with pytest.raises(IllegalTransition) as raised:
        evolve_strict(run, event, own)
    assert raised.value.verdict is Verdict.stale
    assert f"attempt {run.attempt}" in str(raised.value)


def test_zombie_completion_of_a_requeued_attempt_is_ignored() -> None:
    run = run_in(RunState.running, "attempt 2")
    zombie = RunCompleted(run_id=RUN, at=AT, attempt=1, outputs=[from_python("stale")])
    assert fold([*PREFIXES[RunState.running]["attempt 2"], zombie]) == run
    assert run.state is RunState.running
    assert run.outputs == []


def test_attempt_events_before_admission_are_stale_or_illegal() -> None:
    run = run_in(RunState.created, "submitted")
    assert run.attempt == 0
    assert judge(run, queued(attempt=1)) is Verdict.illegal
    assert judge(run_in(RunState.routing, "admitted"), queued(attempt=0)) is Verdict.stale


# --- foreign runs --------------------------------------------------------------------------------


@pytest.mark.parametrize(("state", "how", "event_type"), LEGAL, ids=_id)
def test_event_of_another_run_is_foreign(
    state: RunState, how: str, event_type: type[Event]
) -> None:
    run = run_in(state, how)
    other = {"pipeline": "other/p:v1"} if event_type is QueueWaitChanged else {"run_id": "run_o"}
    event = event_for(event_type, run, **other)

    assert judge(run, event) is Verdict.foreign
    assert evolve(run, event) is run
    with pytest.raises(IllegalTransition) as raised:
        evolve_strict(run, event)
    assert raised.value.verdict is Verdict.foreign


def test_fold_with_a_run_id_skips_other_runs() -> None:
    mine = PREFIXES[RunState.running]["executing with an output"]
    theirs = [
        msgspec.structs.replace(e, run_id="run_other") for e in PREFIXES[RunState.failed]["failed"]
    ]
    mixed = [e for pair in zip(theirs, mine, strict=False) for e in pair] + theirs[len(mine) :]
    assert fold(mixed, run_id=RUN) == fold(mine)
    assert fold(mixed).id == "run_other"  # without run_id: the first event's run
    assert fold(mixed).state is RunState.failed


# --- fold ----------------------------------------------------------------------------------------


def test_fold_of_an_empty_log_is_unknown() -> None:
    assert fold([]) == RunRecord(id="")
    assert fold([], run_id="run_x") == RunRecord(id="run_x", state=RunState.unknown)
    assert fold(iter([]), run_id="run_x").waiting_for is None


def test_fold_is_a_loop_over_evolve() -> None:
    events = PREFIXES[RunState.running]["attempt 2"]
    run = RunRecord(id=RUN)
    for event in events:
        run = evolve(run, event)
    assert fold(events) == run
    assert fold(iter(events)) == run
    assert run.attempt == 2
    assert run.preemptions == 1
    assert run.agent_id == "agent-b"
    assert run.created_at == T0
    assert run.updated_at == T0 + 8


def test_evolve_returns_a_new_frozen_record() -> None:
    run = run_in(RunState.queued, "first attempt")
    after = evolve(run, event_for(RunDispatched, run))
    assert after is not run
    assert run.state is RunState.queued  # the old value is untouched
    with pytest.raises(AttributeError):
        after.state = RunState.failed  # type: ignore[misc]


# --- the diagram is generated from the table -----------------------------------------------------


def test_mermaid_diagram_lists_every_transition() -> None:
    diagram = mermaid_diagram()
    assert diagram.startswith("stateDiagram-v2\n")
    edges = [line.strip() for line in diagram.splitlines() if "-->" in line and ":" in line]
    expected = {
        f"{state.value} --> {target.value}: {event_type.kind}"
        for state, row in TRANSITIONS.items()
        for event_type, target in row.items()
    }
    expected.add("unknown --> routing: submitted (admitted)")  # rule 6
    assert set(edges) == expected
    assert len(edges) == len(expected)
    for state in TERMINAL_STATES:
        assert f"    {state.value} --> [*]" in diagram.splitlines()


# --- rule 6: a submission that carries its admission -------------------------------------------


def test_a_submission_with_its_admission_goes_straight_to_routing() -> None:
    slot = AdmissionSlot(stream="JETRUN_ADMIT_3", seq=4)
    event = msgspec.structs.replace(
        submitted(T0), admission=AdmissionGrant(tier="basic", slot=slot)
    )
    run = fold([event])
    two_appends = fold([submitted(T0), RunAdmitted(run_id=RUN, at=T0, tier="basic", slot=slot)])
    assert run.state is RunState.routing and run.attempt == 1
    assert run == two_appends
    assert judge(run, admitted(T0 + 5)) is Verdict.illegal  # a late admitted changes nothing
    assert evolve(run, admitted(T0 + 5)) is run
    assert evolve(run, event) is run  # nor does the same submission again


def test_a_run_never_admitted_can_fail() -> None:
    error = RunError(type=ErrorType.unknown, message="not_admitted: did not go through admission")
    run = fold([submitted(T0), RunFailed(run_id=RUN, at=T0 + 30, attempt=0, error=error)])
    assert run.state is RunState.failed and run.error == error and run.waiting_for is None


# --- rule 7: a restated run ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "how"), all_prefixes([s for s in RunState if s.value != "unknown"])
)
def test_a_restatement_gives_an_unknown_run_its_record_and_changes_nothing_else(
    state: RunState, how: str
) -> None:
    run = run_in(state, how)
    event = restate(run, of_seq=9, at=AT, ticket=(1, 7))
    assert decode_event(encode_event(event)) == event
    assert evolve(run, event) is run  # a reader with the history already has this run
    assert evolve(RunRecord(id=RUN), event) == run  # one without it begins here
    assert evolve(RunRecord(id="another"), event) == RunRecord(id="another")  # foreign


def test_a_restated_run_goes_on_from_there() -> None:
    slot = AdmissionSlot(stream="JETRUN_ADMIT_3", seq=4)
    first = msgspec.structs.replace(
        submitted(T0), admission=AdmissionGrant(tier="basic", slot=slot), callback_url="https://h"
    )
    queued = RunQueued(run_id=RUN, at=T0 + 1, attempt=1, waiting_for=WaitingFor.resources)
    run = fold([first, queued])
    assert run.callback_url == "https://h" and run.resources_since == T0 + 1
    restated = restate(run, of_seq=2, at=T0 + 50, ticket=None)
    assert restated_record(restated) == run and restated.message_id() == f"{RUN}:restated:2"
    later = [RunDispatched(run_id=RUN, at=AT, attempt=1, agent_id="agent-z", slot="gpu")]
    assert fold([queued, restated, *later]) == fold([first, queued, restated, *later])


def test_a_queue_event_is_about_every_run_queued_in_its_pipeline() -> None:
    """Rule 8: ``queue_waiting`` names the pipeline; it changes what each queued run of that
    pipeline waits for (starting a resource wait as a ``waiting`` would), and nothing else."""
    run = run_in(RunState.queued, "first attempt")
    event = QueueWaitChanged(
        run_id=queue_id(run.pipeline), at=AT, pipeline=run.pipeline, waiting_for=WaitingFor.node
    )
    after = evolve(run, event)
    assert after.state is RunState.queued and after.waiting_for is WaitingFor.node
    gone = evolve(after, msgspec.structs.replace(event, waiting_for=WaitingFor.resources))
    assert gone.waiting_for is WaitingFor.resources and gone.resources_since == AT
    running = run_in(RunState.running, "dispatched")
    assert evolve(running, msgspec.structs.replace(event, pipeline=running.pipeline)) is running
    assert queue_id(run.pipeline) != queue_id("other/p:v1")


# --- rule 9: a batch of queued runs ------------------------------------------------------------


@pytest.mark.parametrize(("state", "how"), all_prefixes(list(RunState)))
def test_a_batch_is_each_named_runs_own_queued_and_foreign_to_others(
    state: RunState, how: str
) -> None:
    """In every state, a ``queued_runs`` naming the run does to it exactly what the run's own
    ``queued`` (its attempt, its wait) would: queues it from ``routing``, is ignored (illegal
    or stale) elsewhere; one that does not name it changes nothing."""
    run = run_in(state, how)
    for attempt in {run.attempt, run.attempt + 1}:
        own = RunQueued(run_id=RUN, at=AT, attempt=attempt, waiting_for=WaitingFor.resources)
        batch = queued_runs([RunQueued(run_id="run_a", at=AT, attempt=1), own], AT)
        assert evolve(run, batch) == evolve(run, own)
        assert judge(run, batch) is judge(run, own)
        assert fold([*PREFIXES[state][how], batch], run_id=RUN) == evolve(run, own)
    others = queued_runs([RunQueued(run_id="run_a", at=AT, attempt=1)], AT)
    assert evolve(run, others) is run
    assert judge(run, others) is Verdict.foreign


def test_a_batch_keeps_its_runs_order_and_its_message_id_names_them() -> None:
    """The ``queued`` events a batch stands for come out in order, each as it was decided;
    the same runs and attempts give the same message id (stored once), others another."""
    one = [
        RunQueued(run_id="run_b", at=AT, attempt=2, waiting_for=WaitingFor.cold_start),
        RunQueued(run_id="run_a", at=AT, attempt=1),
    ]
    batch = queued_runs(one, AT)
    assert batch.queued() == one
    assert decode_event(encode_event(batch)) == batch
    assert batch.message_id() == queued_runs(list(one), AT + 5).message_id()
    assert batch.message_id() != queued_runs(one[::-1], AT).message_id()
    assert batch.message_id() != queued_runs(one[:1], AT).message_id()
    bumped = [one[0], msgspec.structs.replace(one[1], attempt=2)]
    assert batch.message_id() != queued_runs(bumped, AT).message_id()


def test_a_restated_ticket_keeps_a_batch_index_only_when_it_is_not_zero() -> None:
    """A reader that knows two-element tickets reads every ticket but a batch's later runs'."""
    run = run_in(RunState.queued, "first attempt")
    assert restate(run, 9, AT, (1, 7, 0)).queue_ticket == [1, 7]
    assert restate(run, 9, AT, (1, 7)).queue_ticket == [1, 7]
    assert restate(run, 9, AT, (1, 7, 3)).queue_ticket == [1, 7, 3]
