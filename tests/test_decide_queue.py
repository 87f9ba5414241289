"""Dispatching into agents' queues, as pure decisions: a run goes into an agent's queue room
only when no agent has a free slot for it, only for a first attempt, only for a CPU pipeline
whose typical attempt is short, and the agent with the fewest waiting first."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts.agents import Accelerator, AgentHeartbeat, LoadedPipeline, PipelineStatus
from contracts.events import (
    RunCancelled,
    RunCompleted,
    RunDispatched,
    RunFailed,
    RunRequeued,
    RunTimedOut,
)
from contracts.states import RunState, WaitingFor
from runtime.control.durations import SAMPLES, AttemptDurations
from tests.test_decide import CONFIG, World

P, GPU, RETRY = "t/p:v1", "t/gpu:v1", "t/retry:v1"
SHORT = CONFIG.settings.short_attempt_s


def beat(
    agent_id: str, *pointers: str, slots: int = 1, queue: int = 1, gpus: int = 0
) -> AgentHeartbeat:
    accelerators = [Accelerator(kind="cpu", slots=slots, queue=queue)]
    if gpus:
        accelerators.append(Accelerator(kind="gpu", slots=gpus, queue=queue))
    return AgentHeartbeat(
        agent_id=agent_id,
        at=0.0,
        started_at=0.0,
        accelerators=accelerators,
        pipelines=[LoadedPipeline(pointer=p, status=PipelineStatus.ready) for p in pointers],
    )


def dispatches(w: World, d: object) -> dict[str, str]:
    return {e.run_id: e.agent_id for e in d.events if isinstance(e, RunDispatched)}  # type: ignore[attr-defined]


def ran(w: World, run_id: str, pointer: str, seconds: float) -> None:
    """``run_id`` is submitted, dispatched and completed ``seconds`` later (by event time)."""
    w.submit(run_id, pointer)
    w.settle()
    run = w.run(run_id)
    assert run.state is RunState.running, run
    w.advance(seconds)
    w.append(RunCompleted(run_id=run_id, at=w.wall, attempt=run.attempt, outputs=[]))


def busy(w: World, run_id: str, pointer: str = P) -> str:
    """A run dispatched and still running; returns its agent."""
    w.submit(run_id, pointer)
    w.settle()
    run = w.run(run_id)
    assert run.state is RunState.running and run.agent_id is not None
    return run.agent_id


def test_a_pipeline_with_no_attempt_seen_gets_no_queue_room() -> None:
    w = World()
    w.fleet.observe(beat("a1", P))
    busy(w, "r1")
    w.submit("r2")
    w.settle()
    assert w.state("r2") is RunState.queued
    assert w.index.queue_position("r2") == 0


def test_a_short_pipeline_fills_the_queue_room_then_queues() -> None:
    w = World()
    w.fleet.observe(beat("a1", P, slots=1, queue=2))
    ran(w, "warm", P, 0.005)
    busy(w, "r1")
    for run_id in ("r2", "r3", "r4"):
        w.submit(run_id)
    w.settle()
    for run_id in ("r2", "r3"):  # dispatched to wait at a1: running, waiting for a worker
        run = w.run(run_id)
        assert (run.state, run.agent_id, run.waiting_for) == (
            RunState.running,
            "a1",
            WaitingFor.worker,
        )
        assert w.index.queue_position(run_id) is None
    assert w.state("r4") is RunState.queued and w.index.queue_position("r4") == 0


def test_a_free_slot_anywhere_comes_before_queue_room() -> None:
    w = World()
    w.fleet.observe(beat("a1", P, slots=1, queue=4))
    ran(w, "warm", P, 0.005)
    assert busy(w, "r1") == "a1"
    w.fleet.observe(beat("a2", P, slots=2, queue=0))
    w.submit("r2")
    w.submit("r3")
    w.submit("r4")
    d = w.decide()
    assert dispatches(w, d) == {"r2": "a2", "r3": "a2", "r4": "a1"}


def test_queue_room_goes_to_the_agent_with_the_fewest_waiting() -> None:
    w = World()
    w.fleet.observe(beat("a1", P, slots=1, queue=3))
    w.fleet.observe(beat("a2", P, slots=1, queue=3))
    ran(w, "warm", P, 0.005)
    for run_id in ("b1", "b2"):
        busy(w, run_id)
    for n in range(4):
        w.submit(f"r{n}")
    d = w.decide()
    placed = list(dispatches(w, d).values())
    assert sorted(placed) == ["a1", "a1", "a2", "a2"]  # alternating, never 3 behind one


def test_a_long_pipeline_never_gets_queue_room() -> None:
    w = World()
    w.fleet.observe(beat("a1", P, slots=1, queue=4))
    ran(w, "long", P, 2 * SHORT)
    busy(w, "r1")
    w.submit("r2")
    w.submit("r3")
    w.settle()
    assert [w.state(r) for r in ("r2", "r3")] == [RunState.queued, RunState.queued]
    assert [w.index.queue_position(r) for r in ("r2", "r3")] == [0, 1]


def test_a_requeued_run_takes_only_a_real_slot() -> None:
    w = World()
    w.fleet.observe(beat("a1", RETRY, slots=1, queue=2))
    ran(w, "warm", RETRY, 0.005)
    busy(w, "r0", RETRY)
    busy(w, "r1", RETRY)  # waits at a1 behind r0
    w.append(RunRequeued(run_id="r1", at=w.wall, attempt=1, agent_id="a1", reason="test"))
    w.settle()
    run = w.run("r1")
    assert (run.state, run.attempt) == (RunState.queued, 2)  # a1's queue room is not for it
    w.submit("r2", RETRY)  # behind it in the queue: FIFO, although a1 has queue room
    w.settle()
    assert w.state("r2") is RunState.queued and w.index.queue_position("r2") == 1
    w.append(RunCompleted(run_id="r0", at=w.wall, attempt=1, outputs=[]))
    w.settle()  # the slot r0 frees: r1 takes it, and r2 the queue room behind it
    assert (w.run("r1").state, w.run("r1").agent_id) == (RunState.running, "a1")
    assert (w.run("r2").state, w.run("r2").agent_id) == (RunState.running, "a1")


def test_gpu_runs_never_wait_at_an_agent() -> None:
    w = World()
    w.fleet.observe(beat("g", GPU, slots=0, queue=4, gpus=1))
    ran(w, "warm", GPU, 0.005)
    busy(w, "r1", GPU)
    w.submit("r2", GPU)
    w.settle()
    assert w.state("r2") is RunState.queued


def test_an_agent_that_advertises_no_queue_gets_no_more_than_its_slots() -> None:
    w = World()
    w.fleet.observe(beat("old", P, slots=2, queue=0))
    ran(w, "warm", P, 0.005)
    for n in range(3):
        w.submit(f"r{n}")
    w.settle()
    assert [w.state(f"r{n}") for n in range(3)] == [
        RunState.running,
        RunState.running,
        RunState.queued,
    ]


def test_queued_runs_are_dispatched_into_queue_room_head_first() -> None:
    w = World()
    w.fleet.observe(beat("warmer", P, slots=1, queue=0))
    ran(w, "warm", P, 0.005)
    w.fleet.recall("warmer")  # no agent takes work: everything queues
    for n in range(4):
        w.submit(f"r{n}")
    w.settle()
    assert all(w.state(f"r{n}") is RunState.queued for n in range(4))
    w.fleet.observe(beat("a1", P, slots=1, queue=1))
    d = w.decide()
    assert list(dispatches(w, d)) == ["r0", "r1"]
    assert [w.index.queue_position(f"r{n}") for n in (2, 3)] == [0, 1]


def test_the_typical_attempt_is_the_median_of_the_recent_ones() -> None:
    w = World()
    w.fleet.observe(beat("a1", P, slots=1, queue=1))
    durations = w.work.durations
    assert durations.typical(P) is None
    for n, seconds in enumerate([0.001, 5.0, 0.002]):
        ran(w, f"w{n}", P, seconds)
    assert durations.typical(P) == pytest.approx(0.002)  # one long attempt does not make it long
    for n in range(SAMPLES):
        w.fleet.observe(beat("a1", P, slots=1, queue=1))  # heard from within the loss timeout
        ran(w, f"x{n}", P, 1.0)
    assert durations.typical(P) == pytest.approx(1.0)  # only the last SAMPLES count


def test_only_attempts_that_ran_to_their_end_are_counted() -> None:
    w = World()
    w.fleet.observe(beat("a1", P, RETRY, slots=4, queue=0))
    for run_id, pointer in [("c", P), ("q", RETRY), ("f", P), ("t", P)]:
        busy(w, run_id, pointer)
    w.advance(3.0)
    w.append(RunCancelled(run_id="c", at=w.wall))
    w.append(RunRequeued(run_id="q", at=w.wall, attempt=1, agent_id="a1", reason="lost"))
    assert w.work.durations.typical(P) is None and w.work.durations.typical(RETRY) is None
    w.append(RunFailed(run_id="f", at=w.wall, attempt=1, error=w.run("c").error or _error()))
    assert w.work.durations.typical(P) == pytest.approx(3.0)
    w.append(RunTimedOut(run_id="t", at=w.wall + 1.0, attempt=1, timeout_s=4.0))
    assert w.work.durations.typical(P) == pytest.approx(3.5)
    stale = RunCompleted(run_id="t", at=w.wall + 9, attempt=1, outputs=[])
    w.append(stale)  # a second end of an ended run: nothing
    assert w.work.durations.typical(P) == pytest.approx(3.5)


def _error():  # type: ignore[no-untyped-def]
    from contracts.errors import ErrorType, RunError

    return RunError(type=ErrorType.pipeline_error, message="boom")


def test_a_replay_of_the_log_gives_the_same_durations() -> None:
    w = World()
    w.fleet.observe(beat("a1", P, slots=1, queue=1))
    seen: list[tuple[object, object]] = []
    w.index.listen(lambda seq, e, before, run: seen.append((e, run)))
    for n, seconds in enumerate([0.01, 0.03, 0.02]):
        ran(w, f"r{n}", P, seconds)
    again = AttemptDurations()
    for event, run in seen:
        again.observe(event, run)  # type: ignore[arg-type]
    assert again.typical(P) == w.work.durations.typical(P) == pytest.approx(0.02)


@settings(max_examples=100, deadline=None)
@given(
    slots=st.integers(0, 3),
    queue=st.integers(0, 3),
    warm_s=st.sampled_from([None, 0.001, 1.0]),
    runs=st.integers(1, 12),
)
def test_an_agent_never_holds_more_than_its_slots_and_queue(
    slots: int, queue: int, warm_s: float | None, runs: int
) -> None:
    w = World()
    w.fleet.observe(beat("a1", P, slots=max(slots, 1), queue=queue))
    if warm_s is not None:
        ran(w, "warm", P, warm_s)
    w.fleet.observe(beat("a1", P, slots=slots, queue=queue))
    for n in range(runs):
        w.submit(f"r{n}")
        w.settle()
    on_agent = [r for r in w.index.records.values() if r.state is RunState.running]
    room = queue if warm_s is not None and warm_s < SHORT else 0
    assert len(on_agent) == min(runs, slots + room) if slots else not on_agent
    queued = [f"r{n}" for n in range(runs) if w.state(f"r{n}") is RunState.queued]
    assert [w.index.queue_position(r) for r in queued] == list(range(len(queued)))
