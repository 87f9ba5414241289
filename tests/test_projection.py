"""RunIndex: records, exact queue positions, replays."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import msgspec
import pytest

from contracts import (
    RunAdmitted,
    RunCancelled,
    RunDispatched,
    RunQueued,
    RunRequeued,
    RunState,
    RunSubmitted,
)
from contracts.events import AnyEvent, QueueWaitChanged, queue_id
from contracts.states import WaitingFor
from runtime.infra.projection import IndexLagging, RunIndex


def admit(run_id: str, pipeline: str = "a/b:v1") -> list[AnyEvent]:
    return [
        RunSubmitted(run_id=run_id, at=1.0, team="t", pipeline=pipeline, inputs=[]),
        RunAdmitted(run_id=run_id, at=1.0, tier="basic"),
        RunQueued(run_id=run_id, at=2.0, attempt=1),
    ]


def feed(index: RunIndex, events: list[AnyEvent]) -> None:
    for event in events:
        index.apply(index.last_seq + 1, event)


def test_positions_are_exact_and_move_up() -> None:
    index = RunIndex()
    ids = [f"r{i}" for i in range(20)]
    for run_id in ids:
        feed(index, admit(run_id))
    assert [index.queue_position(r) for r in ids] == list(range(20))
    feed(index, [RunDispatched(run_id="r0", at=3.0, attempt=1, agent_id="a")])
    assert index.queue_position("r0") is None
    assert [index.queue_position(r) for r in ids[1:]] == list(range(19))
    feed(index, [RunCancelled(run_id="r5", at=3.0)])
    assert index.queue_position("r6") == 4
    assert index.queue_depth("a/b:v1") == 18
    assert index.queued("a/b:v1", limit=2) == ["r1", "r2"]


def test_queues_are_per_pipeline() -> None:
    index = RunIndex()
    feed(index, admit("x1", "a/x:v1") + admit("y1", "a/y:v1") + admit("x2", "a/x:v1"))
    assert index.queue_position("x2") == 1
    assert index.queue_position("y1") == 0


def test_a_requeued_run_goes_first_and_others_move_back() -> None:
    index = RunIndex()
    feed(index, admit("r0") + admit("r1") + admit("r2"))
    feed(index, [RunDispatched(run_id="r0", at=3.0, attempt=1, agent_id="a")])
    assert index.on_agent["a"] == {"r0"}
    assert index.queue_position("r1") == 0
    feed(index, [RunRequeued(run_id="r0", at=4.0, attempt=1, agent_id="a", reason="lost")])
    assert index.queue_position("r0") == 0
    assert index.queue_position("r1") == 1  # it may grow when a run is requeued
    assert index.get("r0").attempt == 2  # type: ignore[union-attr]
    assert index.on_agent["a"] == set()


def test_sequences_already_applied_are_skipped() -> None:
    index = RunIndex()
    events = admit("r0")
    for seq, event in enumerate(events, start=1):
        index.apply(seq, event)
    before = index.get("r0")
    assert index.apply(2, events[1]) is None
    assert index.get("r0") is before
    assert index.statistics().queues[0].depth == 1


def test_events_for_unknown_runs_create_nothing() -> None:
    index = RunIndex()
    assert index.apply(1, RunCancelled(run_id="ghost", at=1.0)) is None
    assert index.get("ghost") is None and index.last_seq == 1


@pytest.mark.anyio
async def test_waiting_for_a_state_and_a_sequence() -> None:
    index = RunIndex()
    feed(index, admit("r0"))
    results: list[RunState] = []

    async def waiter() -> None:
        run = await index.wait_until("r0", lambda r: r.state is RunState.running, 5.0)
        assert run is not None
        results.append(run.state)

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.wait_all_tasks_blocked()
        assert not await index.wait_for_seq(10, timeout=0)
        feed(index, [RunDispatched(run_id="r0", at=3.0, attempt=1, agent_id="a")])
    assert results == [RunState.running]
    assert await index.wait_for_seq(4, timeout=0)


@pytest.mark.anyio
async def test_a_skipped_sequence_wakes_its_waiters_and_replays_have_a_deadline() -> None:
    index = RunIndex()
    feed(index, admit("r0"))
    async with anyio.create_task_group() as tg:

        async def wait() -> None:
            await index.catch_up(5, timeout=5.0)

        tg.start_soon(wait)
        await anyio.wait_all_tasks_blocked()
        index.skip(4)  # a message this release cannot decode
        index.skip(5)
    assert index.last_seq == 5
    index.skip(2)  # an old sequence moves nothing back
    assert index.last_seq == 5
    with pytest.raises(IndexLagging, match="reached sequence 5 of 6"):
        await index.catch_up(6, timeout=0)


@pytest.mark.anyio
async def test_seq_waiters_wake_when_their_sequence_is_applied_and_not_before() -> None:
    index = RunIndex()
    woken: list[int] = []

    async def wait(seq: int) -> None:
        assert await index.wait_for_seq(seq, timeout=5)
        woken.append(seq)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for seq in (5, 2, 9, 2, 7):
                tg.start_soon(wait, seq)
            await anyio.wait_all_tasks_blocked()
            feed(index, admit("r0"))  # sequences 1-3
            await anyio.wait_all_tasks_blocked()
            assert sorted(woken) == [2, 2]
            index.skip(6)  # a message this release cannot read still moves waiters on
            await anyio.wait_all_tasks_blocked()
            assert sorted(woken) == [2, 2, 5]
            feed(index, admit("r1"))  # sequences 7-9
    assert sorted(woken) == [2, 2, 5, 7, 9]


def until_running(index: RunIndex, woken: list[RunState]) -> Callable[[], Awaitable[None]]:
    """A request waiting until run r0 runs; what it found goes to ``woken``."""

    async def wait() -> None:
        run = await index.wait_until("r0", lambda r: r.state is RunState.running, 5.0)
        assert run is not None
        woken.append(run.state)

    return wait


@pytest.mark.anyio
async def test_a_cancelled_wait_leaves_the_others_on_the_same_run_waiting() -> None:
    index = RunIndex()
    feed(index, admit("r0"))
    woken: list[RunState] = []
    wait = until_running(index, woken)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            async with anyio.create_task_group() as gone:  # a client that went away
                gone.start_soon(wait)
                await anyio.wait_all_tasks_blocked()
                gone.cancel_scope.cancel()
            assert woken == []
            feed(index, [RunDispatched(run_id="r0", at=3.0, attempt=1, agent_id="a")])
    assert woken == [RunState.running]
    assert index._changed == {}
    late = await index.wait_until("r0", lambda r: r.state is RunState.completed, 0.01)
    assert late is not None and late.state is RunState.running  # timed out: as it is then
    assert await index.wait_until("nope", lambda r: True, 0.01) is None
    assert index._changed == {} and not await index.wait_for_seq(99, timeout=0.01)


@pytest.mark.anyio
async def test_a_wait_is_woken_only_by_the_change_it_waits_for() -> None:
    """A waiting request's task is not woken by its run's other events (submitted, admitted,
    queued): its one waiter stays in place until the run is as it waits for."""
    index = RunIndex()
    woken: list[RunState] = []
    wait = until_running(index, woken)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await anyio.wait_all_tasks_blocked()
            (first,) = index._changed["r0"]  # the run does not exist yet
            feed(index, admit("r0"))
            await anyio.wait_all_tasks_blocked()
            assert index._changed["r0"] == [first] and not first.future.done()
            assert woken == []
            feed(index, [RunDispatched(run_id="r0", at=3.0, attempt=1, agent_id="a")])
    assert woken == [RunState.running] and index._changed == {}


@pytest.mark.anyio
async def test_a_queue_event_wakes_a_wait_it_satisfies() -> None:
    """A queue's event changes its runs as read (not as stored): a wait on a queued run is
    asked about the run with it, and woken once it holds."""
    index = RunIndex()
    feed(index, admit("r0"))
    woken: list[WaitingFor | None] = []

    async def wait() -> None:
        run = await index.wait_until("r0", lambda r: r.waiting_for is WaitingFor.resources, 5.0)
        assert run is not None
        woken.append(run.waiting_for)

    change = QueueWaitChanged(
        run_id=queue_id("a/b:v1"), at=3.0, pipeline="a/b:v1", waiting_for=WaitingFor.capacity
    )
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await anyio.wait_all_tasks_blocked()
            feed(index, [change])  # not what it waits for
            await anyio.wait_all_tasks_blocked()
            assert woken == [] and len(index._changed["r0"]) == 1
            wanted = msgspec.structs.replace(change, waiting_for=WaitingFor.resources, at=4.0)
            feed(index, [wanted])
    assert woken == [WaitingFor.resources] and index._changed == {}


def test_new_and_end_listeners_hear_each_run_once() -> None:
    """``listen_new`` hears a run's first event and ``listen_ended`` its end, once each,
    after the per-event listeners; a replayed (already applied) event is heard by none."""
    index = RunIndex()
    heard: list[tuple[str, str, str]] = []
    index.listen(lambda seq, event, before, after: heard.append(("event", event.kind, after.id)))
    index.listen_new(lambda seq, event, run: heard.append(("new", event.kind, run.id)))
    index.listen_ended(lambda run: heard.append(("ended", run.state, run.id)))
    feed(index, admit("r0"))
    index.apply(1, admit("r0")[0])  # already applied: skipped
    feed(index, [RunCancelled(run_id="r0", at=3.0)])
    feed(index, [RunCancelled(run_id="r0", at=4.0)])  # illegal once ended: no change
    assert heard == [
        ("event", "submitted", "r0"),
        ("new", "submitted", "r0"),
        ("event", "admitted", "r0"),
        ("event", "queued", "r0"),
        ("event", "cancelled", "r0"),
        ("ended", RunState.cancelled, "r0"),
    ]
