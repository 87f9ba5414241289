"""``dispatched_runs``: one event for the runs a decision pass dispatched to one agent. Pure
parts, no NATS: what the scheduler appends (``packed``), how every reader of the whole log
applies it (the ``RunIndex`` and its listeners: the scheduler's worklist, slots and drain
rates, metrics; the client's ``RunFollower``; bench_stages), each run exactly as its own
``dispatched``, and what a reader of one run's own subjects (which never hold a batch) makes
of the agent's events that follow (rule 10 of the state machine)."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.bench_stages import stage_durations
from contracts import (
    RunAdmitted,
    RunCancelled,
    RunCompleted,
    RunDispatched,
    RunFailed,
    RunPreempted,
    RunQueued,
    RunRequeued,
    RunStarted,
    RunState,
    RunSubmitted,
)
from contracts.errors import ErrorType, RunError
from contracts.events import (
    DISPATCHED_RUNS_ID,
    AnyEvent,
    Event,
    RunOutputProduced,
    RunsDispatched,
    RunsQueued,
    RunTimedOut,
    decode_event,
    dispatched_runs,
    encode_event,
)
from contracts.machine import Verdict, evolve, fold, judge
from contracts.states import WaitingFor
from contracts.values import from_python
from runtime.clients.client import RunFollower
from runtime.control.passes import Worklist, packed, runs_of
from runtime.infra.event_subjects import agent_dispatches, kind_subjects, subject_of
from runtime.infra.metrics import RunMetrics
from runtime.infra.projection import RunIndex

P = "a/b:v1"


def submitted(run_id: str, pipeline: str = P) -> list[AnyEvent]:
    return [
        RunSubmitted(run_id=run_id, at=1.0, team="t", pipeline=pipeline, inputs=[]),
        RunAdmitted(run_id=run_id, at=1.0, tier="basic"),
    ]


def dispatched(run_id: str, agent: str = "agent-x", **fields: Any) -> RunDispatched:
    return RunDispatched(
        run_id=run_id,
        at=fields.pop("at", 2.0),
        attempt=fields.pop("attempt", 1),
        agent_id=agent,
        **fields,
    )


def feed(index: RunIndex, events: list[AnyEvent]) -> None:
    for event in events:
        index.apply(index.last_seq + 1, event)


class Readers:
    """An index with what the scheduler and metrics hang on it, and what its listeners hear."""

    def __init__(self) -> None:
        self.index = RunIndex()
        self.work = Worklist()
        self.metrics = RunMetrics(self.index, caught_up=lambda: True, phases=True)
        self.heard: list[tuple[int, AnyEvent, RunState | None, RunState]] = []

        def listen(seq: int, e: AnyEvent, before: Any, after: Any) -> None:
            self.heard.append((seq, e, None if before is None else before.state, after.state))
            self.work.observe(seq, e, after, 0.0)

        self.index.listen(listen)

    def picture(self, ids: list[str]) -> dict[str, Any]:
        return {
            "runs": {r: self.index.get(r) for r in ids},
            "queued": self.index.queued(P),
            "on_agent": {a: sorted(rs) for a, rs in self.index.on_agent.items()},
            "heard": [(e, b, a) for _, e, b, a in self.heard],
            "dispatched_at": dict(self.work.dispatched_at),
            "agent_load": {a: dict(n) for a, n in self.work.agent_load.items()},
            "metric_slots": dict(self.metrics.slots),
            "metric_dispatched_at": dict(self.metrics.dispatched_at),
            "counts": dict(self.metrics.counts.items()),
        }


def test_a_batch_is_applied_as_each_runs_own_dispatched_in_order() -> None:
    """Two sets of readers, one fed each run's ``dispatched``, one the batch: the same
    records, queues, runs on the agent, worklist (slots in use), metrics and the same calls to
    every listener, each run at the batch's sequence; then the same ends and drain rate."""
    ids = ["r3", "r1", "r2"]
    own, batched = Readers(), Readers()
    for readers in (own, batched):
        feed(readers.index, [e for r in ids for e in submitted(r)])
        feed(readers.index, [RunQueued(run_id="r2", at=1.5, attempt=1)])
    events = [dispatched(r, slot="gpu" if r == "r1" else "cpu") for r in ids]
    for one in events:
        own.index.apply(own.index.last_seq + 1, one)  # one sequence each
    feed(batched.index, [dispatched_runs(events, 2.0)])
    seq = batched.index.last_seq
    assert [s for s, *_ in batched.heard[-3:]] == [seq, seq, seq]
    own_picture, batch_picture = own.picture(ids), batched.picture(ids)
    assert own_picture.pop("dispatched_at") == {
        r: own.index.last_seq - 2 + i for i, r in enumerate(ids)
    }
    assert batch_picture.pop("dispatched_at") == dict.fromkeys(ids, seq)
    assert own_picture == batch_picture
    assert batched.index.get("r1").agent_id == "agent-x"  # type: ignore[union-attr]
    assert batched.index.queued(P) == []
    for readers in (own, batched):
        for i, r in enumerate(ids):
            readers.index.apply(
                readers.index.last_seq + 1,
                RunCompleted(run_id=r, at=3.0 + i, attempt=1, outputs=[]),
            )
    assert own.picture(ids)["runs"] == batched.picture(ids)["runs"]
    for kind in ("cpu", "gpu"):
        rates = [r.work.durations.drain_rate("agent-x", kind, 9.0, 1) for r in (own, batched)]
        assert rates[0] == rates[1]


def test_a_run_the_index_does_not_hold_or_already_dispatched_is_left_as_it_is() -> None:
    """A batch naming a run this index does not hold (it began before a replay's start)
    creates nothing; a run already running (the same dispatch decided again) is unchanged."""
    index = RunIndex()
    feed(index, [e for r in ("a", "b") for e in submitted(r)])
    feed(index, [dispatched_runs([dispatched("a"), dispatched("b")], 2.0)])
    before = {r: index.get(r) for r in ("a", "b")}
    feed(index, [dispatched_runs([dispatched("b", "agent-y"), dispatched("ghost")], 3.0)])
    assert {r: index.get(r) for r in ("a", "b")} == before
    assert index.get("ghost") is None


def test_a_restatement_expects_the_runs_own_last_event_not_the_batch() -> None:
    index = RunIndex()
    feed(index, [e for r in ("a", "b") for e in submitted(r)])
    own_last = {"a": 2, "b": 4}
    feed(index, [dispatched_runs([dispatched("a"), dispatched("b")], 2.0)])
    assert dict((run.id, seq) for run, seq in index.restatable(10.0, 10)) == own_last
    feed(index, [RunStarted(run_id="b", at=3.0, attempt=1, agent_id="agent-x")])
    assert dict((run.id, seq) for run, seq in index.restatable(10.0, 10))["b"] == index.last_seq


def test_the_run_follower_yields_each_runs_own_dispatched() -> None:
    one, batched = RunFollower(), RunFollower()
    for follower in (one, batched):
        for event in [e for r in ("a", "b") for e in submitted(r)]:
            follower.apply(event)
    events = [dispatched("b"), dispatched("a", slot="gpu")]
    expected = [run for e in events for run in one.apply(e)]
    assert batched.apply(dispatched_runs(events, 2.0)) == expected
    assert [r.state for r in expected] == [RunState.running, RunState.running]


def test_stages_read_a_batch_as_each_runs_dispatch() -> None:
    def log(batch: bool) -> list[AnyEvent]:
        events: list[AnyEvent] = [e for r in ("a", "b") for e in submitted(r)]
        sent = [dispatched("a", at=1.25), dispatched("b", at=1.25)]
        events += [dispatched_runs(sent, 1.25)] if batch else sent
        return [
            *events,
            *(RunCompleted(run_id=r, at=1.5, attempt=1, outputs=[]) for r in ("a", "b")),
        ]

    assert stage_durations(log(True)) == stage_durations(log(False))


# --- the event, its subject, its message id ----------------------------------------------------


def test_a_batch_goes_where_its_agents_dispatches_go_and_round_trips() -> None:
    inputs = [from_python("x" * 10)]
    events = [dispatched("b", attempt=2, team="t", pipeline=P, inputs=inputs, callback=True)]
    batch = dispatched_runs([dispatched("a"), *events], 2.0)
    assert batch.dispatched() == [dispatched("a"), *events]
    assert decode_event(encode_event(batch)) == batch
    subject = subject_of(batch)
    assert subject == f"jetrun.ev.{DISPATCHED_RUNS_ID}.dispatched.agent-x"
    filters = [agent_dispatches("agent-x"), kind_subjects("dispatched")]
    assert all(_matches(f, subject) for f in filters)
    assert not _matches(agent_dispatches("agent-y"), subject)
    assert _matches(kind_subjects(RunsDispatched.kind), subject)
    assert not _matches(kind_subjects(RunsDispatched.kind), subject_of(dispatched("a")))


def _matches(pattern: str, subject: str) -> bool:
    p, s = pattern.split("."), subject.split(".")
    if p[-1] == ">":
        return len(s) >= len(p) and all(a in ("*", b) for a, b in zip(p[:-1], s, strict=False))
    return len(p) == len(s) and all(a in ("*", b) for a, b in zip(p, s, strict=True))


def test_the_message_id_is_short_and_names_the_agent_runs_and_attempts() -> None:
    runs = [dispatched(f"run_{i:040}") for i in range(200)]
    batch = dispatched_runs(runs, 2.0)
    assert len(batch.message_id()) < 80
    assert batch.message_id() == dispatched_runs(list(runs), 7.0).message_id()  # restamped
    others = [
        dispatched_runs(runs[::-1], 2.0),
        dispatched_runs(runs[1:], 2.0),
        dispatched_runs([dispatched(r.run_id, "agent-y") for r in runs], 2.0),
        dispatched_runs([runs[0], dispatched(runs[1].run_id, attempt=2), *runs[2:]], 2.0),
    ]
    assert len({batch.message_id(), *(o.message_id() for o in others)}) == 5


# --- what the scheduler appends ------------------------------------------------------------


def test_packed_puts_each_agents_dispatches_in_one_event_where_the_first_stood() -> None:
    cancelled = RunCancelled(run_id="c", at=2.0)
    lone = dispatched("l", "agent-y")
    events: list[Event] = [
        cancelled,
        dispatched("d1"),
        RunQueued(run_id="q1", at=2.0, attempt=1),
        lone,
        dispatched("d2"),
        RunQueued(run_id="q2", at=2.0, attempt=1),
        dispatched("d3"),
    ]
    out = packed(events)
    assert [type(e) for e in out] == [RunCancelled, RunsDispatched, RunsQueued, RunDispatched]
    batch = out[1]
    assert isinstance(batch, RunsDispatched) and batch.agent_id == "agent-x"
    assert batch.dispatched() == [dispatched("d1"), dispatched("d2"), dispatched("d3")]
    assert out[3] == lone  # alone for its agent: the plain event, as on the sync path
    assert sorted(r for e in out for r in runs_of(e)) == sorted(e.run_id for e in events)
    assert packed(list(events))[1].message_id() == batch.message_id()  # one picture, one id
    single: list[Event] = [dispatched("s"), RunCancelled(run_id="c", at=2.0)]
    assert packed(single) == single


def test_packed_cuts_an_agents_dispatches_by_count_bytes_and_time() -> None:
    many: list[Event] = [dispatched(f"d{i}") for i in range(7)]
    out = packed(many, dispatched_per_event=3)
    assert [len(e.runs) if isinstance(e, RunsDispatched) else 1 for e in out] == [3, 3, 1]
    assert isinstance(out[2], RunDispatched)  # a last chunk of one: the plain event
    assert [r for e in out for r in runs_of(e)] == [f"d{i}" for i in range(7)]
    big = [from_python("x" * 60_000)]  # near the 64 KiB a dispatch carries inline
    heavy: list[Event] = [dispatched(f"h{i}", inputs=big, pipeline=P, team="t") for i in range(9)]
    out = packed(heavy, dispatched_bytes=256 * 1024)
    assert [len(e.runs) for e in out if isinstance(e, RunsDispatched)] == [4, 4]
    assert all(len(encode_event(e)) < 256 * 1024 for e in out)
    assert [r for e in out for r in runs_of(e)] == [f"h{i}" for i in range(9)]
    stamped: list[Event] = [dispatched("t0"), dispatched("t1"), dispatched("t2", at=3.0)]
    assert [type(e) for e in packed(stamped)] == [RunsDispatched, RunDispatched]


# --- the state machine: rule 9 for dispatches, rule 10 -----------------------------------------


@pytest.mark.parametrize("state", ["routing", "queued", "running", "completed"])
def test_a_batch_is_each_named_runs_own_dispatched_and_foreign_to_others(state: str) -> None:
    history: list[AnyEvent] = [*submitted("r")]
    if state == "queued":
        history.append(RunQueued(run_id="r", at=1.5, attempt=1))
    if state in ("running", "completed"):
        history.append(dispatched("r", "agent-z"))
    if state == "completed":
        history.append(RunCompleted(run_id="r", at=1.7, attempt=1, outputs=[]))
    run = fold(history)
    assert run.state.value == state
    for attempt in (1, 2):
        own = dispatched("r", attempt=attempt, slot="gpu")
        batch = dispatched_runs([dispatched("other"), own], 2.0)
        assert evolve(run, batch) == evolve(run, own)
        assert judge(run, batch) is judge(run, own)
    others = dispatched_runs([dispatched("other"), dispatched("more")], 2.0)
    assert evolve(run, others) is run and judge(run, others) is Verdict.foreign


def own_subjects(*after: AnyEvent, queued: bool = False) -> list[AnyEvent]:
    """What a reader of run ``r``'s own subjects reads when a batch dispatched it."""
    head: list[AnyEvent] = [*submitted("r")]
    if queued:
        head.append(RunQueued(run_id="r", at=1.5, attempt=1))
    return [*head, *after]


@pytest.mark.parametrize("queued", [False, True])
def test_one_runs_own_events_after_a_batched_dispatch_fold_as_the_whole_log_does(
    queued: bool,
) -> None:
    """Rule 10: the agent's events of the current attempt, and its loss, take the run from
    ``routing`` or ``queued`` as the dispatch they imply; the whole log (with the batch) and
    the run's own subjects (without it) agree on where the run ends."""
    ends: list[list[AnyEvent]] = [
        [RunStarted(run_id="r", at=3.0, attempt=1, agent_id="agent-x")],
        [RunCompleted(run_id="r", at=3.0, attempt=1, outputs=[from_python(1)])],
        [
            RunStarted(run_id="r", at=3.0, attempt=1, agent_id="agent-x"),
            RunOutputProduced(run_id="r", at=3.1, attempt=1, index=0, output=from_python(2)),
            RunCompleted(run_id="r", at=3.2, attempt=1, streamed=1, outputs=[]),
        ],
        [RunTimedOut(run_id="r", at=3.0, attempt=1, timeout_s=1.0)],
        [RunPreempted(run_id="r", at=3.0, attempt=1, agent_id="agent-x", reason="spot recall")],
        [RunRequeued(run_id="r", at=3.0, attempt=1, agent_id="agent-x", reason="node lost")],
    ]
    for after in ends:
        alone = fold(own_subjects(*after, queued=queued))
        whole = fold(
            own_subjects(
                dispatched_runs([dispatched("o"), dispatched("r")], 2.0), *after, queued=queued
            ),
            run_id="r",
        )
        assert alone.state is whole.state, after
        assert alone.outputs == whole.outputs and alone.attempt == whole.attempt
    started = fold(own_subjects(*ends[0], queued=queued))
    assert started.state is RunState.running and started.agent_id == "agent-x"
    assert started.waiting_for is WaitingFor.execution


def test_an_agents_event_of_another_attempt_still_changes_nothing() -> None:
    """Rule 4 holds for rule 10's rows: a zombie's result of attempt 1 does not end a run
    requeued to attempt 2 and waiting in its queue."""
    requeued = fold(
        [
            *submitted("r"),
            dispatched("r"),
            RunRequeued(run_id="r", at=3.0, attempt=1, agent_id="agent-x", reason="node lost"),
        ]
    )
    assert requeued.state is RunState.queued and requeued.attempt == 2
    for late in (
        RunCompleted(run_id="r", at=4.0, attempt=1, outputs=[]),
        RunStarted(run_id="r", at=4.0, attempt=1, agent_id="agent-x"),
        RunFailed(
            run_id="r",
            at=4.0,
            attempt=1,
            error=RunError(type=ErrorType.pipeline_error, message="x"),
        ),
    ):
        assert evolve(requeued, late, True) is requeued
        assert judge(requeued, late, True) is Verdict.stale
        assert evolve(requeued, late) is requeued  # the whole log: not its rows at all


@pytest.mark.parametrize("queued", [False, True])
def test_a_reader_of_the_whole_log_takes_no_agent_event_for_a_run_not_dispatched(
    queued: bool,
) -> None:
    """Rule 10 is for readers of a run's own subjects only. In the whole log every dispatch
    comes before its attempt's events, so an agent's event for a run still routing or queued
    there is one no dispatch implies: another agent's forgery (attempt 1 is easy to guess).
    The index (what the scheduler decides from, what gateways answer) and a whole-log watch
    leave the run as it is; before rule 10 they did too."""
    forged: list[AnyEvent] = [
        RunStarted(run_id="r", at=3.0, attempt=1, agent_id="rogue"),
        RunOutputProduced(run_id="r", at=3.0, attempt=1, index=0, output=from_python(9)),
        RunCompleted(run_id="r", at=3.0, attempt=1, outputs=[from_python(9)]),
        RunTimedOut(run_id="r", at=3.0, attempt=1, timeout_s=1.0),
    ]
    for event in forged:
        index = RunIndex()
        feed(index, own_subjects(queued=queued))
        before = index.records["r"]
        feed(index, [event])
        assert index.records["r"] == before, event
        assert index.queue_position("r") == (0 if queued else None)
        follower = RunFollower()
        for one in own_subjects(queued=queued):
            follower.apply(one)
        assert follower.apply(event) == [], event
        assert follower.runs["r"].state is before.state
        assert evolve(before, event) is before and judge(before, event) is Verdict.illegal
    # a reader of the run's own subjects alone still takes them (rule 10)
    assert fold(own_subjects(forged[2], queued=queued)).state is RunState.completed


def test_a_watch_that_loaded_a_run_from_its_own_subjects_takes_its_agents_events() -> None:
    """A watch from a later sequence loads a run's earlier events from its own subjects: a
    batch before that may have dispatched it, so rule 10 applies to that run until it leaves
    ``routing`` or ``queued`` (and only to it)."""
    follower = RunFollower()
    follower.load("r", fold(own_subjects(queued=True)))
    done = RunCompleted(run_id="r", at=3.0, attempt=1, outputs=[from_python(1)])
    [after] = follower.apply(done)
    assert after.state is RunState.completed
    follower.load("s", fold(submitted("s")))
    follower.apply(dispatched("s"))
    assert "s" not in follower.loaded  # moved on: the whole log's rules from here
    follower.apply(RunSubmitted(run_id="t", at=1.0, team="t", pipeline=P, inputs=[]))
    assert follower.apply(RunCompleted(run_id="t", at=3.0, attempt=1, outputs=[])) == []


def test_packed_leaves_the_dispatch_of_a_run_with_a_callback_alone() -> None:
    """The webhook outbox reads a run's own subjects: a run with a callback URL is dispatched
    there (its dispatch plain, where it stood), so the outbox needs no rule 10."""
    hooked = dispatched("h", callback=True)
    events: list[Event] = [
        dispatched("d1"),
        hooked,
        dispatched("d2"),
        dispatched("h2", callback=True),
    ]
    out = packed(events)
    assert [type(e) for e in out] == [RunsDispatched, RunDispatched, RunDispatched]
    assert out[1:] == [hooked, events[3]]
    assert [r for e in out for r in runs_of(e)] == ["d1", "d2", "h", "h2"]


def test_packed_batches_only_to_the_agents_that_take_batches() -> None:
    """An agent of a release before ``dispatched_runs`` (its heartbeat says no ``batches``)
    gets each dispatch plain; the others' are batched as before."""
    events: list[Event] = [dispatched("x1"), dispatched("y1", "agent-y"), dispatched("x2")]
    events.append(dispatched("y2", "agent-y"))
    out = packed(events, batches_to=lambda agent: agent != "agent-x")
    assert [type(e) for e in out] == [RunDispatched, RunsDispatched, RunDispatched]
    assert [r for e in out for r in runs_of(e)] == ["x1", "y1", "y2", "x2"]
