"""Properties of the fold over realistic, damaged event logs (hypothesis, 1,000 examples each)."""

from __future__ import annotations

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts.events import (
    AnyEvent,
    AttemptEvent,
    RunAdmitted,
    RunCancelRequested,
    RunOutputProduced,
    RunSubmitted,
    decode_event,
    decode_events,
    encode_event,
)
from contracts.machine import (
    OWN_SUBJECTS_ONLY,
    TRANSITIONS,
    Verdict,
    evolve,
    evolve_strict,
    fold,
    judge,
)
from contracts.run import RunRecord
from contracts.states import RunState
from tests.strategies import (
    MAX_ATTEMPTS,
    RUN_ID,
    History,
    any_event,
    events_of,
    histories,
    mixed_logs,
    reordered,
    with_duplicates,
)


def _reachable() -> set[RunState]:
    seen, todo = {RunState.unknown}, [RunState.unknown]
    while todo:
        for target in TRANSITIONS.get(todo.pop(), {}).values():
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


REACHABLE = _reachable()
ATTEMPT_EVENT_TYPES = sorted(
    {t for row in TRANSITIONS.values() for t in row if issubclass(t, AttemptEvent)},
    key=lambda t: t.__name__,
)


def prefix_runs(events: list[AnyEvent], own_subjects: bool = True) -> list[RunRecord]:
    """``fold(events[:k])`` for every k, computed in one pass (``own_subjects`` False: as a
    reader of the whole log reads them, without rule 10's rows)."""
    runs = [RunRecord(id=events[0].run_id if events else "")]
    for event in events:
        runs.append(evolve(runs[-1], event, own_subjects))
    return runs


def test_reachable_states_are_the_lifecycle() -> None:
    assert set(RunState) == REACHABLE  # every state, and only these, can be reached


@settings(max_examples=1000, deadline=None)
@given(histories())
def test_a_valid_history_is_legal_everywhere_and_ends_where_it_walked(history: History) -> None:
    run = RunRecord(id=RUN_ID)
    for event in history.events:
        run = evolve_strict(run, event)  # raises if any step is illegal, stale or foreign
    assert run == fold(history.events)
    assert run.state is history.state
    assert run.attempt == history.attempt
    assert (run.waiting_for is None) is history.is_terminal
    assert run.cancel_requested is any(isinstance(e, RunCancelRequested) for e in history.events)


@settings(max_examples=1000, deadline=None)
@given(mixed_logs())
def test_a_terminal_run_never_moves(events: list[AnyEvent]) -> None:
    for own_subjects in (True, False):
        runs = prefix_runs(events, own_subjects)
        ended = next((run for run in runs if run.is_terminal), None)
        if ended is not None:
            later = runs[runs.index(ended) :]
            assert all(run == ended for run in later)
    assert fold(events) == prefix_runs(events)[-1]


@settings(max_examples=1000, deadline=None)
@given(mixed_logs())
def test_only_the_table_moves_a_run(events: list[AnyEvent]) -> None:
    runs = prefix_runs(events)
    for before, event, after in zip(runs[:-1], events, runs[1:], strict=True):
        assert after.state in REACHABLE
        if judge(before, event, own_subjects=True) is Verdict.applied:
            expected = TRANSITIONS[before.state][type(event)]
            if isinstance(event, RunSubmitted) and event.admission is not None:
                expected = TRANSITIONS[expected][RunAdmitted]  # rule 6: it implies admitted
            assert after.state is expected
        else:
            assert after is before
    whole = prefix_runs(events, own_subjects=False)  # rule 10's rows left out
    for before, event, after in zip(whole[:-1], events, whole[1:], strict=True):
        if judge(before, event) is Verdict.applied:
            assert (before.state, type(event)) not in OWN_SUBJECTS_ONLY
        else:
            assert after is before


@settings(max_examples=1000, deadline=None)
@given(st.data())
def test_a_duplicate_anywhere_after_the_original_changes_nothing(data: st.DataObject) -> None:
    history = data.draw(histories())
    redelivered = data.draw(with_duplicates(history.events))
    assert len(redelivered) > len(history.events)
    assert fold(redelivered) == fold(history.events)


@settings(max_examples=1000, deadline=None)
@given(mixed_logs())
def test_fold_is_deterministic_also_across_the_wire(events: list[AnyEvent]) -> None:
    run = fold(events)
    assert fold(list(events)) == run
    one_by_one = [decode_event(encode_event(event)) for event in events]
    assert one_by_one == events
    assert fold(one_by_one) == run
    as_array = decode_events(msgspec.json.encode(events))
    assert fold(as_array) == run


@settings(max_examples=1000, deadline=None)
@given(st.data())
def test_events_of_a_non_current_attempt_change_nothing(data: st.DataObject) -> None:
    history = data.draw(histories())
    events = list(history.events)
    runs = prefix_runs(events)
    inserts = data.draw(
        st.lists(
            st.tuples(st.integers(0, len(events)), st.sampled_from(ATTEMPT_EVENT_TYPES)),
            min_size=1,
            max_size=6,
        )
    )
    log = list(events)
    for position, event_type in sorted(inserts, key=lambda p: p[0], reverse=True):
        run = runs[position]
        others = [a for a in range(MAX_ATTEMPTS + 2) if a != run.attempt]
        attempt = data.draw(st.sampled_from(others))
        stale = data.draw(events_of(event_type, attempt=attempt))
        for own_subjects in (True, False):
            assert judge(run, stale, own_subjects) in (Verdict.stale, Verdict.illegal)
            assert evolve(run, stale, own_subjects) is run
        log.insert(position, stale)
    assert fold(log) == fold(events)


@settings(max_examples=1000, deadline=None)
@given(histories(terminal=True), st.lists(any_event, min_size=1, max_size=6))
def test_late_events_after_the_end_change_nothing(history: History, late: list[AnyEvent]) -> None:
    ended = fold(history.events)
    assert ended.is_terminal
    current = [
        msgspec.structs.replace(e, attempt=ended.attempt) if isinstance(e, AttemptEvent) else e
        for e in late
    ]
    assert fold([*history.events, *late]) == ended
    assert fold([*history.events, *current]) == ended  # even for the run's own attempt


@settings(max_examples=1000, deadline=None)
@given(st.data())
def test_independent_events_commute(data: st.DataObject) -> None:
    history = data.draw(histories())
    swapped = data.draw(reordered(history.events))
    assert sorted(map(encode_event, swapped)) == sorted(map(encode_event, history.events))
    assert fold(swapped) == fold(history.events)


@settings(max_examples=1000, deadline=None)
@given(st.data())
def test_outputs_stream_in_by_index_whatever_their_order(data: st.DataObject) -> None:
    history = data.draw(histories())
    run = fold(history.events)
    outputs = [e for e in history.events if isinstance(e, RunOutputProduced)]
    current = [e for e in outputs if e.attempt == run.attempt]
    if run.state is RunState.running and current:
        assert len(run.outputs) == len(current)  # the walk streams indices 0..n-1
        assert run.outputs == [e.output for e in sorted(current, key=lambda e: e.index)]
