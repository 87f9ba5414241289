"""The fold behind ``RunEvents.watch``: what each event changes, and memory bounded by the runs
that can still change (no NATS)."""

from __future__ import annotations

from contracts import RunAdmitted, RunCompleted, RunDispatched, RunQueued, RunState, RunSubmitted
from contracts.events import AnyEvent, QueueWaitChanged, RunCancelRequested, queue_id
from contracts.states import WaitingFor
from runtime.clients.client import RunFollower


def history(run_id: str, pipeline: str = "a/x:v1") -> list[AnyEvent]:
    return [
        RunSubmitted(run_id=run_id, at=1.0, team="acme", pipeline=pipeline, inputs=[]),
        RunAdmitted(run_id=run_id, at=2.0, tier="pro"),
        RunQueued(run_id=run_id, at=3.0, attempt=1),
        RunDispatched(run_id=run_id, at=4.0, attempt=1, agent_id="a"),
        RunCompleted(run_id=run_id, at=5.0, attempt=1, outputs=[]),
    ]


def test_each_event_yields_the_run_it_changed_and_an_ended_run_changes_no_more() -> None:
    follower = RunFollower()
    states = [[r.state for r in follower.apply(e)] for e in history("r1")]
    assert states == [
        [RunState.created],
        [RunState.routing],
        [RunState.queued],
        [RunState.running],
        [RunState.completed],
    ]
    late = RunCancelRequested(run_id="r1", at=6.0)
    assert follower.apply(late) == []
    assert follower.apply(history("r1")[0]) == []  # a repeated submission changes nothing


def test_memory_holds_live_runs_and_a_bounded_number_of_ended_ids() -> None:
    follower = RunFollower(remember_ended=100)
    for n in range(5_000):
        for event in history(f"r{n}"):
            follower.apply(event)
    follower.apply(history("live")[0])
    assert list(follower.runs) == ["live"]
    assert len(follower.ended) == 100
    assert not follower.queued
    assert not follower.unseen("r4999") and follower.unseen("r0")  # the oldest ids went first


def test_a_queue_event_changes_only_the_runs_queued_in_that_pipeline() -> None:
    follower = RunFollower()
    for run_id, pipeline in [("q1", "a/x:v1"), ("q2", "a/x:v1"), ("other", "a/y:v1")]:
        for event in history(run_id, pipeline)[:3]:  # queued
            follower.apply(event)
    follower.apply(history("q2")[3])  # q2 leaves the queue: dispatched
    change = QueueWaitChanged(
        run_id=queue_id("a/x:v1"), at=9.0, pipeline="a/x:v1", waiting_for=WaitingFor.resources
    )
    changed = follower.apply(change)
    assert [(r.id, r.waiting_for) for r in changed] == [("q1", WaitingFor.resources)]


def test_a_run_loaded_from_the_log_is_kept_and_an_ended_one_known() -> None:
    follower = RunFollower()
    live = RunFollower()
    for event in history("r1")[:3]:
        live.apply(event)
    follower.load("r1", live.runs["r1"])
    assert not follower.unseen("r1")
    assert [r.state for r in follower.apply(history("r1")[3])] == [RunState.running]
    follower.load("old", None)
    assert follower.unseen("old")
