"""The event catalogue on the wire: tags, round trips, deterministic message ids, bad input."""

from __future__ import annotations

import functools
import json
import operator
import typing

import msgspec
import pytest
from hypothesis import given, settings

from contracts.errors import ErrorType, RunError
from contracts.events import (
    EVENT_TYPES,
    AdmissionSlot,
    AnyEvent,
    AttemptEvent,
    DispatchedRun,
    Event,
    QueuedRun,
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
    decode_events,
    encode_event,
    to_builtins,
)
from contracts.states import WaitingFor
from contracts.values import File, from_python
from tests.strategies import any_event

RUN = "run_abc"
AT = 1_732_000_000.125

SAMPLES: dict[type[Event], AnyEvent] = {
    RunSubmitted: RunSubmitted(
        run_id=RUN,
        at=AT,
        team="team-a",
        pipeline="demo/echo:v1",
        inputs=[from_python("hi"), from_python(3), from_python(File(url="https://x/y.png"))],
        async_run=True,
        wait_for_resources=True,
        idempotency_key="key-1",
    ),
    RunAdmitted: RunAdmitted(
        run_id=RUN, at=AT, tier="pro", slot=AdmissionSlot(stream="ADMISSION", seq=9)
    ),
    RunQueued: RunQueued(run_id=RUN, at=AT, attempt=1, waiting_for=WaitingFor.cold_start),
    RunWaitChanged: RunWaitChanged(run_id=RUN, at=AT, attempt=1, waiting_for=WaitingFor.capacity),
    RunDispatched: RunDispatched(run_id=RUN, at=AT, attempt=1, agent_id="agent-a", slot="gpu"),
    RunStarted: RunStarted(run_id=RUN, at=AT, attempt=1, agent_id="agent-a"),
    RunOutputProduced: RunOutputProduced(
        run_id=RUN, at=AT, attempt=1, index=2, output=from_python({"k": [1.5, None]})
    ),
    RunCompleted: RunCompleted(
        run_id=RUN, at=AT, attempt=1, outputs=[from_python(True), from_python(None)]
    ),
    RunFailed: RunFailed(
        run_id=RUN,
        at=AT,
        attempt=1,
        error=RunError(type=ErrorType.cuda_oom, message="CUDA out of memory", traceback="tb"),
    ),
    RunTimedOut: RunTimedOut(run_id=RUN, at=AT, attempt=1, timeout_s=300.0),
    RunPreempted: RunPreempted(run_id=RUN, at=AT, attempt=1, agent_id="agent-a", reason="lost"),
    RunRequeued: RunRequeued(run_id=RUN, at=AT, attempt=1, agent_id="agent-a", reason="lost"),
    RunNoResourcesAvailable: RunNoResourcesAvailable(
        run_id=RUN, at=AT, attempt=1, reason="no replica"
    ),
    RunCancelRequested: RunCancelRequested(run_id=RUN, at=AT),
    RunCancelled: RunCancelled(run_id=RUN, at=AT),
    RunRestated: RunRestated(
        run_id=RUN,
        at=AT,
        of_seq=41,
        record={"id": RUN, "state": "queued", "team": "team-a", "inputs": [{"type": "int"}]},
        queue_ticket=[1, 40],
    ),
    QueueWaitChanged: QueueWaitChanged(
        run_id=RUN, at=AT, pipeline="demo/echo:v1", waiting_for=WaitingFor.node, follows=3
    ),
    SchedulerElected: SchedulerElected(run_id=RUN, at=AT, holder="scheduler-1", term=7),
    RunsQueued: RunsQueued(
        run_id=RUN,
        at=AT,
        runs=[
            QueuedRun(run_id="run_a"),
            QueuedRun(run_id="run_b", attempt=2, waiting_for=WaitingFor.resources),
        ],
    ),
    RunsDispatched: RunsDispatched(
        run_id=RUN,
        at=AT,
        agent_id="agent-1",
        runs=[
            DispatchedRun(run_id="run_a"),
            DispatchedRun(
                run_id="run_b",
                attempt=2,
                slot="gpu",
                team="team-a",
                pipeline="demo/echo:v1",
                inputs=[from_python(3)],
                callback=True,
            ),
        ],
    ),
    RunsEnded: RunsEnded(
        run_id=RUN,
        at=AT,
        agent_id="agent-1",
        ends=[
            RunCompleted(run_id="run_a", at=AT, attempt=1, outputs=[from_python(1)], ran_s=0.01),
            RunTimedOut(run_id="run_b", at=AT, attempt=2, timeout_s=1.5),
        ],
    ),
}


def _name(event_type: type[Event]) -> str:
    return event_type.__name__


def test_samples_and_the_union_cover_the_catalogue() -> None:
    assert set(SAMPLES) == set(EVENT_TYPES)
    assert set(typing.get_args(AnyEvent)) == set(EVENT_TYPES)
    assert len(EVENT_TYPES) == len(set(EVENT_TYPES))


def test_tags_and_kinds_are_unique() -> None:
    tags = [t.__struct_config__.tag for t in EVENT_TYPES]
    assert len(set(tags)) == len(tags)
    assert len({t.kind for t in EVENT_TYPES}) == len(EVENT_TYPES)


@pytest.mark.parametrize("event_type", EVENT_TYPES, ids=_name)
def test_round_trip(event_type: type[Event]) -> None:
    event = SAMPLES[event_type]
    data = encode_event(event)
    back = decode_event(data)
    assert type(back) is event_type
    assert back == event
    assert encode_event(back) == data
    wire = json.loads(data)
    assert wire["event"] == event_type.__struct_config__.tag
    assert wire["run_id"] == RUN
    assert wire["at"] == AT
    assert to_builtins(event) == wire


def test_a_log_decodes_as_a_list() -> None:
    events = list(SAMPLES.values())
    data = b"[" + b",".join(encode_event(e) for e in events) + b"]"
    assert decode_events(data) == events
    assert decode_events(b"[]") == []


def test_fields_with_defaults_may_be_left_out() -> None:
    """Old writers omit fields added later: they decode with their defaults."""
    event = decode_event(b'{"event":"queued","run_id":"r","at":1.0,"attempt":2}')
    assert event == RunQueued(run_id="r", at=1.0, attempt=2, waiting_for=WaitingFor.capacity)
    submitted = decode_event(
        b'{"event":"submitted","run_id":"r","at":1,"team":"t","pipeline":"p","inputs":[]}'
    )
    assert isinstance(submitted, RunSubmitted)
    assert submitted.async_run is False
    assert submitted.idempotency_key is None


@settings(max_examples=300, deadline=None)
@given(any_event)
def test_any_event_round_trips(event: AnyEvent) -> None:
    assert decode_event(encode_event(event)) == event


# --- message ids ---------------------------------------------------------------------------------


@pytest.mark.parametrize("event_type", EVENT_TYPES, ids=_name)
def test_message_id_is_deterministic(event_type: type[Event]) -> None:
    event = SAMPLES[event_type]
    again = decode_event(encode_event(event))
    assert again.message_id() == event.message_id()
    republished = msgspec.structs.replace(event, at=AT + 60)  # the same fact, restamped
    assert republished.message_id() == event.message_id()
    assert RUN in event.message_id()


def test_message_ids_differ_per_kind_run_attempt_and_output_index() -> None:
    ids: list[str] = []
    for run_id in [RUN, "run_other"]:
        for event in SAMPLES.values():
            variants = [event]
            if isinstance(event, AttemptEvent):
                variants += [msgspec.structs.replace(event, attempt=a) for a in (2, 3)]
            if isinstance(event, RunOutputProduced):
                variants += [
                    msgspec.structs.replace(v, index=i) for v in list(variants) for i in (0, 1)
                ]
            ids += [msgspec.structs.replace(v, run_id=run_id).message_id() for v in variants]
    per_attempt = sum(issubclass(t, AttemptEvent) for t in EVENT_TYPES)
    assert per_attempt == 11
    per_run = len(EVENT_TYPES) + 2 * per_attempt + 3 * 2  # kinds, attempts 2 and 3, indices 0, 1
    assert len(ids) == 2 * per_run
    assert len(set(ids)) == len(ids)


def test_a_batch_is_written_compactly_and_an_older_reader_refuses_it_as_unknown() -> None:
    """A ``queued_runs`` entry leaves out what a run's ``queued`` usually says (attempt 1,
    waiting for capacity). A reader from before the event (its catalogue without the tag)
    refuses it as it refuses any unknown kind: it skips that message (``RunIndex.skip``)."""
    data = encode_event(SAMPLES[RunsQueued])
    assert b'{"run_id":"run_a"}' in data
    known = [t for t in EVENT_TYPES if t is not RunsQueued]
    union = functools.reduce(operator.or_, known)
    older = msgspec.json.Decoder(union)
    with pytest.raises(msgspec.ValidationError):
        older.decode(data)


def test_output_message_id_names_attempt_and_index() -> None:
    event = SAMPLES[RunOutputProduced]
    assert event.message_id() == f"{RUN}:output:1:2"
    assert SAMPLES[RunQueued].message_id() == f"{RUN}:queued:1"
    assert SAMPLES[RunCancelled].message_id() == f"{RUN}:cancelled"


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"", b"{", b"not json", b'{"event":"queued",}', b"[1, 2"],
    ids=["empty", "open brace", "text", "trailing comma", "open list"],
)
def test_malformed_json_raises_decode_error(data: bytes) -> None:
    with pytest.raises(msgspec.DecodeError):
        decode_event(data)
    with pytest.raises(msgspec.DecodeError):
        decode_events(b"[" + data)


@pytest.mark.parametrize(
    "data",
    [
        b'{"event":"exploded","run_id":"r","at":1.0}',
        b'{"run_id":"r","at":1.0}',
        b'{"event":"queued","run_id":"r","at":1.0}',  # attempt is required
        b'{"event":"queued","run_id":"r","at":"soon","attempt":1}',
        b'{"event":"queued","run_id":"r","at":1.0,"attempt":1,"waiting_for":"godot"}',
        b'{"event":"failed","run_id":"r","at":1.0,"attempt":1,"error":{"type":"bad","message":""}}',
        b'{"event":"output","run_id":"r","at":1.0,"attempt":1,"index":-1,"output":{"type":"none"}}',
        b"[]",
        b"42",
    ],
    ids=[
        "unknown tag",
        "no tag",
        "missing field",
        "wrong type",
        "bad enum",
        "bad error type",
        "negative output index",
        "list",
        "number",
    ],
)
def test_invalid_event_raises_validation_error(data: bytes) -> None:
    with pytest.raises(msgspec.ValidationError):
        decode_event(data)


def test_unknown_tag_in_a_log_raises_validation_error() -> None:
    good = encode_event(SAMPLES[RunCancelled])
    with pytest.raises(msgspec.ValidationError, match="exploded"):
        decode_events(b"[" + good + b',{"event":"exploded","run_id":"r","at":1.0}]')
