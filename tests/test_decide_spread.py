"""A burst of runs over several agents of the same pipelines (``jetrun up --agents N``), as pure
decisions: the burst is split evenly over agents of equal slots and pace, each agent's share goes
as one batch, and while runs wait in the scheduler's queue no agent has a free slot, however the
agents' ends interleave."""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from contracts.events import RunCompleted, RunDispatched, RunsDispatched
from contracts.states import RunState
from runtime.control.passes import packed
from tests.test_decide import World
from tests.test_decide_queue import P, beat, dispatches, drained_together, on_agents

SLOTS, QUEUE = 4, 64


def two_agents(w: World, *agents: str) -> None:
    for agent_id in agents:
        w.fleet.observe(beat(agent_id, P, slots=SLOTS, queue=QUEUE))
    # more ends than slots, 1 ms apart on each: both drain 1,000 attempts a second, as of now
    drained_together(w, dict.fromkeys(agents, 0.001), n=SLOTS + 2)


def waiting_in_scheduler(w: World) -> int:
    return sum(1 for r in w.index.records.values() if r.state is RunState.queued)


def test_a_burst_is_split_evenly_and_goes_as_one_batch_per_agent() -> None:
    w = World()
    two_agents(w, "a1", "a2")
    for n in range(200):
        w.submit(f"r{n}")
    d = w.decide()
    placed = Counter(dispatches(w, d).values())
    # 4 slots each, then queue room while a run would start within the wait bound (20 ms at
    # 1,000 a second: about 20 each); the rest waits in the scheduler's queue
    assert set(placed) == {"a1", "a2"} and abs(placed["a1"] - placed["a2"]) <= 1, placed
    assert placed["a1"] > SLOTS
    batches = [e for e in packed(d.events) if isinstance(e, RunsDispatched)]
    assert sorted(b.agent_id for b in batches) == ["a1", "a2"]
    assert {b.agent_id: len(b.runs) for b in batches} == placed
    assert not [e for e in packed(d.events) if isinstance(e, RunDispatched)]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), fast=st.sampled_from([1, 2, 3]))
def test_no_agent_has_a_free_slot_while_runs_wait_in_the_scheduler(seed: int, fast: int) -> None:
    """The agents end their oldest attempts in random bursts (``a1`` up to ``fast`` times as
    many per step): after every pass, while any run waits in the scheduler's queue, every agent
    holds at least its slots; and both run a share of the burst."""
    rng = random.Random(seed)
    w = World()
    two_agents(w, "a1", "a2")
    burst = [f"r{n}" for n in range(150)]
    for run_id in burst:
        w.submit(run_id)
    w.settle()
    ran: Counter[str] = Counter()
    for _ in range(2000):
        queued = waiting_in_scheduler(w)
        load = on_agents(w)
        if queued:
            assert all(load[a] >= SLOTS for a in ("a1", "a2")), (queued, load)
        if not queued and not load:
            break
        agent_id = rng.choice(["a1", "a2"])
        ends = rng.randint(1, SLOTS * (fast if agent_id == "a1" else 1))
        held = sorted(
            (r for r in w.index.records.values() if r.state is RunState.running),
            key=lambda r: w.work.dispatched_at.get(r.id, 0),
        )
        w.advance(0.001)
        for run in [r for r in held if r.agent_id == agent_id][:ends]:
            w.append(RunCompleted(run_id=run.id, at=w.wall, attempt=run.attempt, outputs=[]))
            ran[agent_id] += 1
        w.settle()
    assert all(w.state(r) is RunState.completed for r in burst)
    assert ran["a1"] > 0 and ran["a2"] > 0, ran
