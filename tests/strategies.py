"""Hypothesis strategies for the contracts tests: wire values, single events, and realistic
run histories (the event logs that the control plane and the agents really write).

``histories()`` walks the lifecycle of one run by hand (it is a second, independent description
of the legal paths, not a copy of ``TRANSITIONS``) and says where the walk ended, so a test can
compare the fold with it.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Any

from hypothesis import assume
from hypothesis import strategies as st

from contracts.errors import ErrorType, RunError
from contracts.events import (
    AdmissionGrant,
    AdmissionSlot,
    AnyEvent,
    AttemptEvent,
    Event,
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
    RunStarted,
    RunSubmitted,
    RunTimedOut,
    RunWaitChanged,
)
from contracts.states import RunState, WaitingFor
from contracts.values import File, RunIO, from_python

RUN_ID = "run_0001"
OTHER_RUN_ID = "run_0002"
MAX_ATTEMPTS = 3

# --- wire values ----------------------------------------------------------------------------

_ints = st.integers(min_value=-(2**53), max_value=2**53)
_floats = st.floats(allow_nan=False, allow_infinity=False)
_short_text = st.text(max_size=6)
_scalars = st.one_of(st.none(), st.booleans(), _ints, _floats, _short_text)
_json = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(_short_text, inner, max_size=3)
    ),
    max_leaves=6,
)
files = st.builds(
    File,
    url=st.one_of(st.none(), st.just("https://example.com/cat.png")),
    path=st.one_of(st.none(), st.just("/data/cat.png")),
    name=st.one_of(st.none(), st.just("cat.png")),
)

#: Python values that have a wire type, with their JSON-safe contents.
python_values = st.one_of(
    _scalars,
    st.lists(_json, max_size=3),
    st.dictionaries(_short_text, _json, max_size=3),
    files,
)
run_ios: st.SearchStrategy[RunIO] = python_values.map(from_python)

run_errors = st.builds(
    RunError,
    type=st.sampled_from(ErrorType),
    message=_short_text,
    traceback=st.one_of(st.none(), st.just('Traceback (most recent call last):\n  File "p.py"')),
)
agent_ids = st.sampled_from(["agent-a", "agent-b", "agent-c"])
reasons = st.sampled_from(["node lost", "spot instance recalled", "heartbeat missed"])
timestamps = st.integers(min_value=0, max_value=2_000_000).map(lambda ms: 1_700_000_000 + ms / 1000)

# Histories draw payloads from fixed samples: cheap to generate, and still every wire type.
_SAMPLE_IOS = [
    from_python(value)
    for value in [
        None,
        True,
        False,
        0,
        -7,
        2**53,
        0.1,
        -2.5e-300,
        "",
        "a cat in a hat",
        "ünïcødé ✓",
        [1, "two", 3.0, None],
        {"k": [1, {"nested": True}], "": None},
        File(url="https://example.com/cat.png", name="cat.png"),
        File(path="/data/out.bin"),
    ]
]
_SAMPLE_ERRORS = [
    RunError(type=ErrorType.input_error, message="input 'prompt': expected string, got integer"),
    RunError(
        type=ErrorType.pipeline_error,
        message="ValueError: bad shape",
        traceback='Traceback (most recent call last):\n  File "pipeline.py", line 3',
    ),
    RunError(type=ErrorType.startup_error, message="model weights missing"),
    RunError(type=ErrorType.pipeline_loading, message="pipeline is not loaded"),
    RunError(type=ErrorType.cuda_oom, message="CUDA out of memory"),
]
sample_ios = st.sampled_from(_SAMPLE_IOS)


# --- single events, any field values -------------------------------------------------------

_GRANTS = [
    AdmissionGrant(tier="pro", slot=AdmissionSlot(stream="JETRUN_ADMIT_12", seq=42)),
    AdmissionGrant(tier="startup"),
]

_FIELDS: dict[type[Event], st.SearchStrategy[dict[str, Any]]] = {
    RunSubmitted: st.fixed_dictionaries(
        {
            "team": st.sampled_from(["team-a", "team-b"]),
            "pipeline": st.sampled_from(["demo/echo:v1", "demo/sd:v2"]),
            "inputs": st.lists(sample_ios, max_size=2),
            "async_run": st.booleans(),
            "wait_for_resources": st.booleans(),
            "idempotency_key": st.sampled_from([None, "key-1"]),
            "admission": st.sampled_from([None, *_GRANTS]),
        }
    ),
    RunAdmitted: st.fixed_dictionaries(
        {
            "tier": st.sampled_from(["free", "pro"]),
            "slot": st.sampled_from([None, AdmissionSlot(stream="ADMISSION", seq=42)]),
        }
    ),
    RunQueued: st.fixed_dictionaries({"waiting_for": st.sampled_from(WaitingFor)}),
    RunWaitChanged: st.fixed_dictionaries({"waiting_for": st.sampled_from(WaitingFor)}),
    RunDispatched: st.fixed_dictionaries(
        {"agent_id": agent_ids, "slot": st.sampled_from(["cpu", "gpu"])}
    ),
    RunStarted: st.fixed_dictionaries({"agent_id": agent_ids}),
    RunOutputProduced: st.fixed_dictionaries({"index": st.integers(0, 3), "output": sample_ios}),
    RunCompleted: st.fixed_dictionaries({"outputs": st.lists(sample_ios, max_size=2)}),
    RunFailed: st.fixed_dictionaries({"error": st.sampled_from(_SAMPLE_ERRORS)}),
    RunTimedOut: st.fixed_dictionaries({"timeout_s": st.sampled_from([1.0, 300.0, 0.25])}),
    RunPreempted: st.fixed_dictionaries({"agent_id": agent_ids, "reason": reasons}),
    RunRequeued: st.fixed_dictionaries({"agent_id": agent_ids, "reason": reasons}),
    RunNoResourcesAvailable: st.fixed_dictionaries({"reason": reasons}),
    RunCancelRequested: st.fixed_dictionaries({}),
    RunCancelled: st.fixed_dictionaries({}),
}
EVENT_TYPE_LIST: list[type[Event]] = list(_FIELDS)
_attempts = st.integers(0, MAX_ATTEMPTS + 1)


def make_event(
    event_type: type[Event], fields: dict[str, Any], run_id: str, at: float, attempt: int
) -> AnyEvent:
    if issubclass(event_type, AttemptEvent):
        fields = {**fields, "attempt": attempt}
    event: AnyEvent = event_type(run_id=run_id, at=at, **fields)  # type: ignore[assignment]
    return event


@st.composite
def events_of(
    draw: st.DrawFn,
    event_type: type[Event],
    run_id: str = RUN_ID,
    attempt: int | None = None,
    at: float | None = None,
) -> AnyEvent:
    """One event of ``event_type``; random attempt (0..4) and time unless given."""
    attempt = draw(_attempts) if attempt is None else attempt
    at = draw(timestamps) if at is None else at
    return make_event(event_type, draw(_FIELDS[event_type]), run_id, at, attempt)


#: Any event of the catalogue, about run ``RUN_ID``, with any attempt and time.
any_event: st.SearchStrategy[AnyEvent] = st.sampled_from(EVENT_TYPE_LIST).flatmap(events_of)


_junk_run_ids = st.sampled_from([RUN_ID, RUN_ID, RUN_ID, OTHER_RUN_ID])


@st.composite
def junk_events(draw: st.DrawFn) -> AnyEvent:
    """Events a log can hold besides the valid ones: any type, any attempt, sometimes about
    another run."""
    run_id = draw(_junk_run_ids)
    event_type = draw(st.sampled_from(EVENT_TYPE_LIST))
    return draw(events_of(event_type, run_id=run_id))


# --- realistic histories ---------------------------------------------------------------------


@dataclass(frozen=True)
class History:
    """A valid event log of one run, and where the lifecycle it walks ended."""

    events: tuple[AnyEvent, ...]
    state: RunState
    attempt: int

    @property
    def is_terminal(self) -> bool:
        return self.state.is_terminal


class _Walk:
    """Appends events in lifecycle order, with a clock that mostly moves forward (services'
    clocks may disagree by a little)."""

    def __init__(self, draw: st.DrawFn) -> None:
        self.draw = draw
        self.now = draw(timestamps)
        self.events: list[AnyEvent] = []
        self.attempt = 0
        self.cancel_requested = False

    def tick(self) -> float:
        self.now += self.draw(_ticks) / 1000
        return self.now

    def add(self, event_type: type[Event], **fields: Any) -> AnyEvent:
        drawn = self.draw(_FIELDS[event_type])
        event = make_event(event_type, {**drawn, **fields}, RUN_ID, self.tick(), self.attempt)
        self.events.append(event)
        return event

    def maybe_cancel_request(self) -> None:
        if not self.cancel_requested and self.draw(_one_in_six) == 0:
            self.cancel_requested = True
            self.add(RunCancelRequested)

    def choose(self, *options: str) -> str:
        choice: str = self.draw(_choices(options))
        return choice


_output_counts = st.integers(0, 3)
_output_orders = {n: st.sampled_from(list(itertools.permutations(range(n)))) for n in range(4)}
_ticks = st.integers(min_value=-200, max_value=5000)
_one_in_six = st.integers(0, 5)


@functools.cache
def _choices(options: tuple[str, ...]) -> st.SearchStrategy[str]:
    return st.sampled_from(options)


@st.composite
def histories(draw: st.DrawFn, terminal: bool | None = None) -> History:
    """A valid history of run ``RUN_ID``: every event is legal where it stands.

    ``terminal=True`` only gives runs that ended, ``False`` only runs still in flight."""
    walk = _Walk(draw)
    state = _walk(walk)
    history = History(events=tuple(walk.events), state=state, attempt=walk.attempt)
    assume(terminal is None or history.is_terminal is terminal)
    return history


def _walk(walk: _Walk) -> RunState:
    if walk.choose("one append", "two appends") == "one append":
        # a gateway's submission carries its admission: the run starts in routing
        walk.add(RunSubmitted, admission=walk.draw(st.sampled_from(_GRANTS)))
        walk.attempt = 1
        return _from_routing(walk)
    walk.add(RunSubmitted, admission=None)
    walk.maybe_cancel_request()
    match walk.choose("admit", "admit", "admit", "cancel", "not admitted", "stop"):
        case "cancel":
            walk.add(RunCancelled)
            return RunState.cancelled
        case "not admitted":
            walk.add(RunFailed)
            return RunState.failed
        case "stop":
            return RunState.created
    walk.add(RunAdmitted)
    walk.attempt = 1
    return _from_routing(walk)


def _from_routing(walk: _Walk) -> RunState:
    walk.maybe_cancel_request()
    match walk.choose("queue", "queue", "queue", "no_resources", "fail", "cancel", "stop"):
        case "no_resources":
            walk.add(RunNoResourcesAvailable)
            return RunState.no_resources_available
        case "fail":
            walk.add(RunFailed)
            return RunState.failed
        case "cancel":
            walk.add(RunCancelled)
            return RunState.cancelled
        case "stop":
            return RunState.routing
    walk.add(RunQueued)
    return _from_queued(walk)


def _from_queued(walk: _Walk) -> RunState:
    while True:
        walk.maybe_cancel_request()
        match walk.choose("dispatch", "dispatch", "dispatch", "no_resources", "fail", "cancel"):
            case "no_resources":
                walk.add(RunNoResourcesAvailable)
                return RunState.no_resources_available
            case "fail":
                walk.add(RunFailed)
                return RunState.failed
            case "cancel":
                walk.add(RunCancelled)
                return RunState.cancelled
        if walk.choose("go", "go", "go", "go", "stop") == "stop":
            return RunState.queued
        dispatched = walk.add(RunDispatched)
        assert isinstance(dispatched, RunDispatched)
        state = _running(walk, dispatched.agent_id)
        if state is not RunState.queued:
            return state
        walk.attempt += 1


def _running(walk: _Walk, agent_id: str) -> RunState:
    """The events of one attempt after dispatch; ``queued`` means it was requeued."""
    walk.maybe_cancel_request()
    if walk.choose("start", "start", "start", "skip") == "start":
        walk.add(RunStarted, agent_id=agent_id)
    order = walk.draw(_output_orders[walk.draw(_output_counts)])
    for index in order:
        walk.maybe_cancel_request()
        walk.add(RunOutputProduced, index=index)
    walk.maybe_cancel_request()
    endings = ["complete", "complete", "fail", "time_out", "preempt", "cancel", "stop"]
    if walk.attempt < MAX_ATTEMPTS:
        endings.append("requeue")
    match walk.choose(*endings):
        case "complete":
            walk.add(RunCompleted)
            return RunState.completed
        case "fail":
            walk.add(RunFailed)
            return RunState.failed
        case "time_out":
            walk.add(RunTimedOut)
            return RunState.failed
        case "preempt":
            walk.add(RunPreempted, agent_id=agent_id)
            return RunState.node_preempted
        case "cancel":
            walk.add(RunCancelled)
            return RunState.cancelled
        case "requeue":
            walk.add(RunRequeued, agent_id=agent_id)
            return RunState.queued
    return RunState.running


# --- valid histories, then damaged the way a real log is --------------------------------------


@st.composite
def with_duplicates(draw: st.DrawFn, events: tuple[AnyEvent, ...]) -> list[AnyEvent]:
    """``events`` with 1..5 redeliveries, each inserted anywhere after its first occurrence."""
    log = list(events)
    for _ in range(draw(st.integers(1, 5))):
        first = draw(st.integers(0, len(log) - 1))
        log.insert(draw(st.integers(first + 1, len(log))), log[first])
    return log


@st.composite
def mixed_logs(draw: st.DrawFn) -> list[AnyEvent]:
    """A valid history with redeliveries, junk (stale attempts, other runs, events out of
    place) anywhere, and late events after its end."""
    log = list(draw(histories()).events)
    for _ in range(draw(st.integers(0, 8))):
        match draw(st.sampled_from(["duplicate", "junk", "late"])):
            case "duplicate":
                first = draw(st.integers(0, len(log) - 1))
                log.insert(draw(st.integers(first + 1, len(log))), log[first])
            case "junk":
                log.insert(draw(st.integers(1, len(log))), draw(junk_events()))
            case "late":
                log.append(draw(any_event))
    return log


_COMMUTES_WITH_CANCEL_REQUEST = (
    RunAdmitted,
    RunQueued,
    RunWaitChanged,
    RunDispatched,
    RunStarted,
    RunOutputProduced,
    RunRequeued,
)


def independent(a: Event, b: Event) -> bool:
    """Whether two adjacent events of a valid history may arrive in either order: a cancel
    request races with every non-terminal step, and outputs race with each other and with the
    started report."""
    if isinstance(a, RunCancelRequested):
        return isinstance(b, _COMMUTES_WITH_CANCEL_REQUEST)
    if isinstance(b, RunCancelRequested):
        return isinstance(a, _COMMUTES_WITH_CANCEL_REQUEST)
    if isinstance(a, RunOutputProduced) and isinstance(b, RunOutputProduced):
        return a.index != b.index
    return {type(a), type(b)} == {RunStarted, RunOutputProduced}


@st.composite
def reordered(draw: st.DrawFn, events: tuple[AnyEvent, ...]) -> list[AnyEvent]:
    """``events`` after 1..4 swaps of adjacent independent events (at least one)."""
    log = list(events)
    swaps = 0
    for _ in range(draw(st.integers(1, 4))):
        candidates = [i for i in range(len(log) - 1) if independent(log[i], log[i + 1])]
        if not candidates:
            break
        i = draw(st.sampled_from(candidates))
        log[i], log[i + 1] = log[i + 1], log[i]
        swaps += 1
    assume(swaps > 0)
    return log
