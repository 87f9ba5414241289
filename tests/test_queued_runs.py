"""``queued_runs``: one event for the runs a decision pass queued. Pure parts, no NATS: what
the scheduler appends (``packed``) and how every reader of the whole log applies it (the
``RunIndex``, the client's ``RunFollower``), each run exactly as its own ``queued``."""

from __future__ import annotations

from typing import Any

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
from contracts.events import (
    AnyEvent,
    Event,
    QueueWaitChanged,
    RunRestated,
    RunsQueued,
    queue_id,
    queued_runs,
)
from contracts.machine import restate
from contracts.states import WaitingFor
from runtime.clients.client import RunFollower
from runtime.control.passes import packed, runs_of
from runtime.infra.projection import RunIndex

P = "a/b:v1"


def submitted(run_id: str, pipeline: str = P) -> list[AnyEvent]:
    return [
        RunSubmitted(run_id=run_id, at=1.0, team="t", pipeline=pipeline, inputs=[]),
        RunAdmitted(run_id=run_id, at=1.0, tier="basic"),
    ]


def queued(run_id: str, **fields: Any) -> RunQueued:
    return RunQueued(run_id=run_id, at=2.0, attempt=fields.pop("attempt", 1), **fields)


def feed(index: RunIndex, events: list[AnyEvent]) -> None:
    for event in events:
        index.apply(index.last_seq + 1, event)


class Heard:
    """What an index's listeners hear, as (event, state before, state after)."""

    def __init__(self, index: RunIndex) -> None:
        self.calls: list[tuple[AnyEvent, RunState | None, RunState]] = []
        index.listen(
            lambda seq, e, before, after: self.calls.append(
                (e, None if before is None else before.state, after.state)
            )
        )


def test_a_batch_is_applied_as_each_runs_own_queued_in_order() -> None:
    """Two indexes, one fed each run's ``queued``, one the batch: the same records, the same
    queue order and positions, the same calls to every listener; queue order follows the batch
    (not run ids), and runs queued after the batch go behind it."""
    ids = ["r3", "r1", "r2", "r0"]
    own, batched = RunIndex(), RunIndex()
    heard_own, heard_batch = Heard(own), Heard(batched)
    for index in (own, batched):
        feed(index, [e for r in [*ids, "late"] for e in submitted(r)])
    events = [
        queued(r, waiting_for=WaitingFor.resources if r == "r1" else WaitingFor.capacity)
        for r in ids
    ]
    feed(own, list(events))
    feed(batched, [queued_runs(events, 2.0)])
    for index in (own, batched):
        feed(index, [queued("late")])
    assert {r: own.get(r) for r in [*ids, "late"]} == {r: batched.get(r) for r in [*ids, "late"]}
    assert own.queued(P) == batched.queued(P) == [*ids, "late"]
    assert [batched.queue_position(r) for r in [*ids, "late"]] == [0, 1, 2, 3, 4]
    assert heard_own.calls == heard_batch.calls
    assert batched.get("r1").resources_since == 2.0  # type: ignore[union-attr]
    assert batched.queue_version(P) == batched.last_seq - 1  # the batch queued the head


def test_runs_of_a_batch_take_distinct_tickets_in_their_order_behind_requeued_runs() -> None:
    index = RunIndex()
    feed(index, [e for r in ("a", "b", "c", "d") for e in submitted(r)])
    feed(index, [queued("a")])
    feed(index, [RunDispatched(run_id="a", at=3.0, attempt=1, agent_id="x")])
    feed(index, [queued_runs([queued("c"), queued("b"), queued("d")], 3.0)])
    seq = index.last_seq
    assert [index.ticket(r) for r in ("c", "b", "d")] == [(1, seq, 0), (1, seq, 1), (1, seq, 2)]
    feed(index, [RunRequeued(run_id="a", at=4.0, attempt=1, agent_id="x", reason="lost")])
    assert index.queued(P) == ["a", "c", "b", "d"]
    feed(index, [RunCancelled(run_id="b", at=5.0)])
    assert index.queued(P) == ["a", "c", "d"] and index.queue_position("d") == 2


def test_a_run_in_a_later_batch_or_unknown_here_is_left_as_it_is() -> None:
    """A run queued by an earlier batch keeps its place when a second batch names it (the
    same decision taken again from another picture); a run this index does not hold (it began
    before a replay's start) is not created."""
    index = RunIndex()
    feed(index, [e for r in ("a", "b") for e in submitted(r)])
    feed(index, [queued_runs([queued("a"), queued("b")], 2.0)])
    tickets = {r: index.ticket(r) for r in ("a", "b")}
    before = {r: index.get(r) for r in ("a", "b")}
    feed(index, [queued_runs([queued("b"), queued("a"), queued("ghost")], 3.0)])
    assert {r: index.ticket(r) for r in ("a", "b")} == tickets
    assert {r: index.get(r) for r in ("a", "b")} == before
    assert index.get("ghost") is None and index.queued(P) == ["a", "b"]


def test_queue_events_before_a_batch_do_not_apply_to_its_runs_and_later_ones_do() -> None:
    index = RunIndex()
    feed(index, [e for r in ("old", "a", "b") for e in submitted(r)])
    feed(index, [queued("old")])
    change = QueueWaitChanged(
        run_id=queue_id(P), at=3.0, pipeline=P, waiting_for=WaitingFor.resources
    )
    feed(index, [change])
    feed(index, [queued_runs([queued("a"), queued("b")], 4.0)])
    assert index.get("old").waiting_for is WaitingFor.resources  # type: ignore[union-attr]
    assert index.get("a").waiting_for is WaitingFor.capacity  # type: ignore[union-attr]
    feed(index, [msgspec.structs.replace(change, at=5.0, waiting_for=WaitingFor.node)])
    assert {index.get(r).waiting_for for r in ("old", "a", "b")} == {WaitingFor.node}  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_a_batch_wakes_each_runs_wait_and_the_waits_for_its_sequence() -> None:
    """An async POST waits for its run to be placed: the batch wakes it as its own ``queued``
    would; the scheduler waits for its append's sequence."""
    index = RunIndex()
    feed(index, [e for r in ("a", "b") for e in submitted(r)])

    def placed(run: Any) -> bool:
        return bool(run.state is RunState.queued)

    found: dict[str, Any] = {}
    async with anyio.create_task_group() as tg:

        async def wait(run_id: str) -> None:
            found[run_id] = await index.wait_until(run_id, placed, timeout=5.0)

        async def seq() -> None:
            found["seq"] = await index.wait_for_seq(index.last_seq + 1, timeout=5.0)

        for run_id in ("a", "b"):
            tg.start_soon(wait, run_id)
        tg.start_soon(seq)
        await anyio.sleep(0.01)
        feed(index, [queued_runs([queued("a"), queued("b")], 2.0)])
    assert found["seq"] is True
    assert {found[r].state for r in ("a", "b")} == {RunState.queued}


def test_a_restatement_expects_the_runs_own_last_event_not_the_batch() -> None:
    """A batch is not on the run's own subjects: a restatement of a run the batch left queued
    expects (``of_seq``) the run's last own event, until the run has one again."""
    index = RunIndex()
    feed(index, [e for r in ("a", "b") for e in submitted(r)])
    own_last = index.last_seq
    feed(index, [queued_runs([queued("a"), queued("b")], 2.0)])
    assert [(run.id, seq) for run, seq in index.restatable(10.0, 10)] == [
        ("a", 2),
        ("b", own_last),
    ]
    feed(index, [RunDispatched(run_id="b", at=3.0, attempt=1, agent_id="x")])
    assert dict((run.id, seq) for run, seq in index.restatable(10.0, 10))["b"] == index.last_seq


def test_a_replay_from_a_restatement_keeps_a_batched_runs_place() -> None:
    """A reader that starts after the runs' first events (a checkpoint past them) reads their
    restatements: each takes the place the batch gave it, ahead of runs queued later."""
    index = RunIndex()
    ids = ["a", "b", "c"]
    feed(index, [e for r in ids for e in submitted(r)])
    feed(index, [queued_runs([queued(r) for r in ids], 2.0)])
    restated = [restate(run, s, 9.0, index.ticket(run.id)) for run, s in index.restatable(10, 10)]
    assert [e.queue_ticket for e in restated] == [[1, 7], [1, 7, 1], [1, 7, 2]]
    fresh = RunIndex()
    fresh.start_at(index.last_seq)
    feed(fresh, [*submitted("d"), queued("d")])
    for event in reversed(restated):  # in any order: the tickets say where each stands
        fresh.apply(fresh.last_seq + 1, event)
    assert fresh.queued(P) == ["a", "b", "c", "d"]
    two = msgspec.structs.replace(restated[2], queue_ticket=[1, 7])  # an older writer's form
    older = RunIndex()
    older.start_at(100)
    older.apply(101, two)
    assert older.ticket("c") == (1, 7, 0)


def test_the_run_follower_yields_each_runs_own_queued() -> None:
    one, batched = RunFollower(), RunFollower()
    for follower in (one, batched):
        for event in [e for r in ("a", "b") for e in submitted(r)]:
            follower.apply(event)
    events = [queued("b"), queued("a", waiting_for=WaitingFor.node)]
    expected = [run for e in events for run in one.apply(e)]
    assert batched.apply(queued_runs(events, 2.0)) == expected
    assert [r.state for r in expected] == [RunState.queued, RunState.queued]


# --- what the scheduler appends ------------------------------------------------------------


def test_packed_puts_a_passes_queued_runs_in_one_event_where_the_first_stood() -> None:
    dispatched = RunDispatched(run_id="d", at=2.0, attempt=1, agent_id="x")
    cancelled = RunCancelled(run_id="c", at=2.0)
    events: list[Event] = [cancelled, queued("q1"), dispatched, queued("q2"), queued("q3")]
    out = packed(events)
    assert out[0] == cancelled and out[2] == dispatched and len(out) == 3
    batch = out[1]
    assert isinstance(batch, RunsQueued) and batch.queued() == [
        queued("q1"),
        queued("q2"),
        queued("q3"),
    ]
    assert [r for e in out for r in runs_of(e)] == ["c", "q1", "q2", "q3", "d"]
    assert packed(list(events))[1].message_id() == batch.message_id()  # one picture, one id


def test_packed_leaves_a_lone_queued_and_cuts_long_passes() -> None:
    lone: list[Event] = [queued("q1"), RunCancelled(run_id="c", at=2.0)]
    assert packed(lone) == lone
    many: list[Event] = [queued(f"q{i}") for i in range(7)]
    out = packed(many, per_event=3)
    assert [len(e.runs) for e in out if isinstance(e, RunsQueued)] == [3, 3, 1]
    assert [r for e in out for r in runs_of(e)] == [f"q{i}" for i in range(7)]
    assert len({e.message_id() for e in out}) == 3


def test_a_restated_event_of_a_batched_run_round_trips() -> None:
    index = RunIndex()
    feed(index, [e for r in ("a", "b") for e in submitted(r)])
    feed(index, [queued_runs([queued("a"), queued("b")], 2.0)])
    run, seq = index.restatable(10.0, 10)[1]
    event = restate(run, seq, 9.0, index.ticket(run.id))
    assert isinstance(event, RunRestated) and event.queue_ticket == [1, index.last_seq, 1]
