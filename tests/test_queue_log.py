"""A queue's event (``queue_waiting``) is kept once for the queue: applying it touches no run,
and every read of a queued run shows it exactly as the machine's fold of that run would."""

from __future__ import annotations

import random

import pytest

from contracts import RunAdmitted, RunDispatched, RunQueued, RunRequeued, RunSubmitted
from contracts.events import (
    AnyEvent,
    QueueWaitChanged,
    RunCancelRequested,
    RunWaitChanged,
    queue_id,
)
from contracts.machine import evolve
from contracts.run import RunRecord
from contracts.states import RunState, WaitingFor
from runtime.control.passes import Worklist
from runtime.infra import projection
from runtime.infra.projection import RunIndex

PIPELINES = ("t/a:v1", "t/b:v1")


def queue_event(pipeline: str, waiting: WaitingFor, at: float) -> QueueWaitChanged:
    return QueueWaitChanged(
        run_id=queue_id(pipeline), at=at, pipeline=pipeline, waiting_for=waiting
    )


def test_one_queue_event_over_100k_queued_runs_touches_no_run() -> None:
    index = RunIndex()
    changed: list[str] = []
    told: list[int] = []
    index.listen(lambda seq, event, before, after: changed.append(after.id))
    index.listen_queue(lambda seq, event, queued: told.append(len(queued)))
    seq = 0
    for n in range(100_000):
        run_id = f"r{n}"
        for event in (
            RunSubmitted(run_id=run_id, at=1.0, team="t", pipeline="t/a:v1", inputs=[]),
            RunAdmitted(run_id=run_id, at=1.0, tier="basic"),
            RunQueued(run_id=run_id, at=2.0, attempt=1, waiting_for=WaitingFor.resources),
        ):
            seq += 1
            index.apply(seq, event)
    stored = dict(index.stored)
    changed.clear()
    index.apply(seq + 1, queue_event("t/a:v1", WaitingFor.cold_start, 5.0))
    assert changed == [] and told == [100_000]  # no run heard of; the queue once
    assert all(index.stored[r] is record for r, record in stored.items())  # none rewritten
    for run_id in ("r0", "r50000", "r99999"):
        run = index.records[run_id]
        assert run.waiting_for is WaitingFor.cold_start and run.updated_at == 5.0
        assert run.resources_since == 2.0  # the same wait for a replica goes on
        assert index.get(run_id) == run
    index.apply(seq + 2, RunDispatched(run_id="r7", at=6.0, attempt=1, agent_id="a1"))
    assert index.records["r7"].waiting_for is WaitingFor.worker
    assert index.records["r8"].waiting_for is WaitingFor.cold_start


def own_event(rng: random.Random, run: RunRecord) -> AnyEvent | None:
    at = rng.uniform(0, 100)
    waiting = rng.choice(list(WaitingFor))
    match run.state:
        case RunState.queued:
            choice = rng.randrange(4)
            if choice == 0:
                return RunDispatched(run_id=run.id, at=at, attempt=run.attempt, agent_id="a1")
            if choice == 1:
                return RunCancelRequested(run_id=run.id, at=at)
            return RunWaitChanged(run_id=run.id, at=at, attempt=run.attempt, waiting_for=waiting)
        case RunState.routing:
            return RunQueued(run_id=run.id, at=at, attempt=run.attempt, waiting_for=waiting)
        case RunState.running:
            return RunRequeued(
                run_id=run.id, at=at, attempt=run.attempt, agent_id="a1", reason="node lost"
            )
    return None


@pytest.mark.parametrize("seed", range(12))
def test_reads_match_the_fold_of_each_run(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Random histories of queued runs and queue events (times out of order included, and
    queues long enough to be compacted): every read equals the run folded event by event, as
    rule 8 applies the queue's events to it; the scheduler's resource waits follow too."""
    monkeypatch.setattr(projection, "COMPACT_AFTER", 5)
    rng = random.Random(seed)
    index = RunIndex()
    work = Worklist()
    index.listen(lambda seq, event, before, run: work.observe(seq, event, run, 0.0))
    index.listen_queue(lambda seq, event, queued: work.observe_queue(event, queued))
    folded: dict[str, RunRecord] = {}
    seq = waited = 0
    for _ in range(600):
        seq += 1
        event: AnyEvent | None = None
        if folded and rng.random() < 0.6:
            event = own_event(rng, folded[rng.choice(list(folded))])
        elif rng.random() < 0.5 or not folded:
            run_id = f"r{len(folded)}"
            pipeline = rng.choice(PIPELINES)
            event = RunSubmitted(run_id=run_id, at=1.0, team="t", pipeline=pipeline, inputs=[])
            folded[run_id] = evolve(RunRecord(id=run_id), event)
            index.apply(seq, event)
            seq += 1
            event = RunAdmitted(run_id=run_id, at=1.0, tier="basic")
        else:
            waiting = rng.choice(list(WaitingFor))
            event = queue_event(rng.choice(PIPELINES), waiting, rng.uniform(0, 100))
        if event is None:
            index.skip(seq)
            continue
        index.apply(seq, event)
        if isinstance(event, QueueWaitChanged):
            folded = {r: evolve(run, event) for r, run in folded.items()}
        else:
            folded[event.run_id] = evolve(folded[event.run_id], event)
        if rng.random() < 0.05:  # a read stores what it took on: read seldom, chains grow
            assert dict(index.records) == folded
        waits = {
            r: (run.pipeline, run.resources_since)
            for r, run in folded.items()
            if run.state is RunState.queued and run.resources_since is not None
        }
        assert work._waiting == waits
        waited += bool(waits)
    assert waited > 100  # the histories did wait for replicas, not just pass through
    assert dict(index.records) == folded
