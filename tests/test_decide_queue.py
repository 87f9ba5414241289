"""Dispatching into agents' queues, as pure decisions: a run goes into an agent's queue room
only when no agent has a free slot for it, only for a first attempt, only for a CPU pipeline
whose typical attempt is short, only while its expected wait there (the runs ahead of it over
the agent's drain rate) is under ``agent_queue_wait_s``, and to the agent where it would start
soonest."""

from __future__ import annotations

from collections import Counter

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
from runtime.control.durations import DRAIN_SAMPLES, SAMPLES, AttemptDurations
from runtime.infra.config import parse
from tests.test_decide import CONFIG, World

P, Q, GPU, RETRY = "t/p:v1", "t/q:v1", "t/gpu:v1", "t/retry:v1"
SHORT = CONFIG.settings.short_attempt_s
BOUND = CONFIG.settings.agent_queue_wait_s


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


def ran(w: World, run_id: str, pointer: str, seconds: float, ran_s: float | None = None) -> None:
    """``run_id`` is submitted, dispatched and completed ``seconds`` later (by event time),
    its worker having run it ``ran_s`` (None: the agent did not say)."""
    w.submit(run_id, pointer)
    w.settle()
    run = w.run(run_id)
    assert run.state is RunState.running, run
    w.advance(seconds)
    done = RunCompleted(run_id=run_id, at=w.wall, attempt=run.attempt, outputs=[], ran_s=ran_s)
    w.append(done)


def drained(
    w: World,
    agent_id: str,
    pointer: str = P,
    every: float = 0.005,
    n: int = 3,
    ran_s: float | None = None,
) -> None:
    """``n`` runs of ``pointer`` dispatched to ``agent_id`` one after the other, each ending
    ``every`` seconds after the one before (by event time): ``agent_id`` drains 1 / ``every``
    attempts a second, and they took ``ran_s`` each (None: ``every``, dispatched to end)."""
    for _ in range(n):
        run_id = f"drained-{agent_id}-{w.seq}"
        w.submit(run_id, pointer)
        w.append(RunDispatched(run_id=run_id, at=w.wall, attempt=1, agent_id=agent_id))
        w.advance(every)
        w.append(RunCompleted(run_id=run_id, at=w.wall, attempt=1, outputs=[], ran_s=ran_s))


def drained_together(w: World, every: dict[str, float], n: int = 3) -> None:
    """Each agent in ``every`` ends ``n`` runs of P, ``every[agent]`` seconds apart, the last
    ones all now: each drains 1 / ``every[agent]`` attempts a second, as of now."""
    last = w.wall + max(every.values()) * (n - 1) + 0.001
    ends = sorted((last - k * e, a) for a, e in every.items() for k in range(n))
    for at, agent_id in ends:
        run_id = f"drained-{agent_id}-{w.seq}"
        w.submit(run_id, P)
        w.append(RunDispatched(run_id=run_id, at=w.wall, attempt=1, agent_id=agent_id))
        w.advance(at - w.wall)
        w.append(RunCompleted(run_id=run_id, at=at, attempt=1, outputs=[]))


def on_agents(w: World) -> Counter[str]:
    return Counter(
        r.agent_id for r in w.index.records.values() if r.state is RunState.running and r.agent_id
    )


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
    drained(w, "a1")
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
    drained(w, "a1")
    assert busy(w, "r1") == "a1"
    w.fleet.observe(beat("a2", P, slots=2, queue=0))
    w.submit("r2")
    w.submit("r3")
    w.submit("r4")
    d = w.decide()
    assert dispatches(w, d) == {"r2": "a2", "r3": "a2", "r4": "a1"}


def test_queue_room_goes_to_the_agent_where_the_run_starts_soonest() -> None:
    w = World()
    w.fleet.observe(beat("a1", P, slots=1, queue=3))
    w.fleet.observe(beat("a2", P, slots=1, queue=3))
    drained_together(w, {"a1": 0.005, "a2": 0.005})  # both end an attempt every 5 ms
    for run_id in ("b1", "b2"):
        busy(w, run_id)
    for n in range(4):
        w.submit(f"r{n}")
    d = w.decide()
    placed = list(dispatches(w, d).values())
    assert sorted(placed) == ["a1", "a1", "a2", "a2"]  # alternating, never 3 behind one


def test_an_agent_that_drains_faster_takes_more_of_the_queue_room() -> None:
    w = World()
    w.fleet.observe(beat("slow", P, slots=1, queue=8))
    w.fleet.observe(beat("fast", P, slots=4, queue=8))
    drained_together(w, {"slow": 0.0045, "fast": 0.001}, n=5)  # more ends than slots: a pace
    for n in range(5):
        busy(w, f"b{n}")
    assert on_agents(w) == {"slow": 1, "fast": 4}
    for n in range(5):
        w.submit(f"r{n}")
    d = w.decide()
    # runs waiting at "fast" start 1, 2, 3, 4 ms from now, the first at "slow" 4.5 ms from now
    assert Counter(dispatches(w, d).values()) == {"slow": 1, "fast": 4}


def test_an_agents_first_ends_give_no_pace_until_more_than_its_slots_ended() -> None:
    """Two slots ending their first attempts 1 ms apart say nothing of how fast the agent
    drains (its attempts may take 40 ms each): no queue room until a third end."""
    w = World()
    w.fleet.observe(beat("a1", P, slots=2, queue=8))
    drained_together(w, {"a1": 0.001}, n=2)
    assert w.work.durations.drain_rate("a1", "cpu", w.wall) is not None  # 2 ends: a "pace"
    busy(w, "b0"), busy(w, "b1")
    w.submit("r0")
    w.settle()
    assert w.state("r0") is RunState.queued  # not trusted for an agent of 2 slots
    drained(w, "a1", every=0.001, n=1)
    w.settle()
    assert w.run("r0").agent_id == "a1" and w.run("r0").waiting_for is WaitingFor.worker


def test_an_agent_that_has_ended_nothing_gets_no_queue_room() -> None:
    w = World()
    w.fleet.observe(beat("new", P, slots=1, queue=8))
    drained(w, "gone")  # the pipeline is known to be short, but not how fast "new" drains
    busy(w, "r1")
    w.submit("r2")
    w.settle()
    assert w.state("r2") is RunState.queued


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
    drained(w, "a1", RETRY)
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
    drained(w, "a1")
    w.fleet.observe(beat("warmer", P, slots=1, queue=0))
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


def test_an_agents_drain_rate_is_measured_over_its_recent_ends_of_one_kind() -> None:
    w = World()
    durations = w.work.durations
    drained(w, "a1", n=1)
    assert durations.drain_rate("a1", "cpu", w.wall) is None  # one end says nothing of a pace
    drained(w, "a1", every=1.0, n=2)
    assert durations.drain_rate("a1", "cpu", w.wall) == pytest.approx(1.0)  # 3 ends over 2 s
    drained(w, "a1", every=0.002, n=DRAIN_SAMPLES)  # only the last DRAIN_SAMPLES count
    assert durations.drain_rate("a1", "cpu", w.wall) == pytest.approx(500)
    w.advance(0.062)  # nothing ended since: counted until now, 31 ends in 124 ms
    assert durations.drain_rate("a1", "cpu", w.wall) == pytest.approx(250)
    assert durations.drain_rate("a1", "cpu", w.wall - 1) == pytest.approx(500)  # clocks apart
    assert durations.drain_rate("a1", "gpu", w.wall) is None
    assert durations.drain_rate("a2", "cpu", w.wall) is None


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
    assert again.drain_rate("a1", "cpu", w.wall) == w.work.durations.drain_rate("a1", "cpu", w.wall)


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
    if warm_s is not None:
        drained(w, "a1", every=warm_s, n=slots + 2)
    w.fleet.observe(beat("a1", P, slots=slots, queue=queue))
    for n in range(runs):
        w.submit(f"r{n}")
        w.settle()
    on_agent = [r for r in w.index.records.values() if r.state is RunState.running]
    room = queue if warm_s is not None and warm_s < SHORT else 0
    assert len(on_agent) == min(runs, slots + room) if slots else not on_agent
    queued = [f"r{n}" for n in range(runs) if w.state(f"r{n}") is RunState.queued]
    assert [w.index.queue_position(r) for r in queued] == list(range(len(queued)))


def test_queue_room_is_filled_only_while_the_wait_there_stays_under_the_bound() -> None:
    w = World()
    w.fleet.observe(beat("a1", P, slots=2, queue=50))
    drained(w, "a1", every=0.0026, n=9)  # it ends an attempt every 2.6 ms: 385 a second
    for n in range(20):
        w.submit(f"r{n}")
    w.settle()
    # a run joining the line starts after those waiting there and one more end: (waiting + 1)
    # x 2.6 ms is under 20 ms while 6 or fewer wait, so 2 run and 7 wait: 9 of the 52 it takes
    assert on_agents(w) == {"a1": 9}
    queued = [f"r{n}" for n in range(9, 20)]
    assert all(w.state(r) is RunState.queued for r in queued)
    assert [w.index.queue_position(r) for r in queued] == list(range(11))
    w.advance(0.0026)
    w.append(RunCompleted(run_id="r0", at=w.wall, attempt=1, outputs=[]))
    w.settle()  # one ended, at the same pace: one more may wait there, the head of the queue
    assert on_agents(w) == {"a1": 9} and w.run("r9").agent_id == "a1"


def test_an_agent_that_stops_ending_attempts_gets_a_shorter_line() -> None:
    """A pipeline whose attempts were short and turned long (slow on purpose, or stuck): the
    agent's runs stop ending, its drain rate falls as the silence lasts, and so does how many
    more runs may wait there, other teams' included."""
    w = World()
    w.fleet.observe(beat("a1", P, slots=1, queue=50))
    drained(w, "a1", every=0.00105, n=DRAIN_SAMPLES, ran_s=0.0005)
    busy(w, "stuck")
    for n in range(10):
        w.submit(f"r{n}")
    w.settle()  # 952 ends a second: up to 19 may wait (the 19th starts within 19.95 ms)
    assert on_agents(w) == {"a1": 11}
    w.advance(0.031)  # nothing ended for 31 ms: 488 a second, so 9 may wait, not 19
    w.fleet.observe(beat("a1", P, slots=1, queue=50))
    w.submit("late")
    w.settle()
    assert on_agents(w) == {"a1": 11} and w.state("late") is RunState.queued


@pytest.mark.parametrize(("silent_s", "joins"), [(0.6, True), (0.621, False)])
def test_no_run_joins_a_line_once_its_agent_has_ended_nothing_for_long_enough(
    silent_s: float, joins: bool
) -> None:
    """However fast an agent drained, (DRAIN_SAMPLES - 1) x ``agent_queue_wait_s`` after its
    last end (0.62 s by default) its drain rate leaves room for no one (docs/security.md)."""
    w = World()
    w.fleet.observe(beat("a1", P, slots=1, queue=50))
    drained(w, "a1", every=0.00001, n=DRAIN_SAMPLES, ran_s=0.00001)
    busy(w, "stuck")
    w.advance(silent_s)
    w.fleet.observe(beat("a1", P, slots=1, queue=50))
    w.submit("next")
    w.settle()
    assert (w.state("next") is RunState.running) is joins
    assert pytest.approx(0.62) == (DRAIN_SAMPLES - 1) * BOUND


def test_no_queue_room_with_a_bound_of_zero() -> None:
    w = World(parse({"settings": {"agent_queue_wait_s": 0}}))
    w.fleet.observe(beat("a1", P, slots=1, queue=8))
    drained(w, "a1", every=0.0001)
    busy(w, "r1")
    w.submit("r2")
    w.settle()
    assert w.state("r2") is RunState.queued


def test_an_agent_held_up_by_long_attempts_gets_a_short_line() -> None:
    w = World()
    w.fleet.observe(beat("a1", P, Q, slots=2, queue=10))
    drained(w, "a1", every=0.001, ran_s=0.001)
    drained(w, "a1", Q, every=0.012, n=4)  # then only an end every 12 ms: Q's are long
    busy(w, "long", Q)
    busy(w, "short", P)
    for n in range(3):
        w.submit(f"r{n}")
    w.settle()  # 7 ends in 50 ms: 120 a second, so 2 may wait (2 / 120 s = 17 ms; 3: 25 ms)
    assert on_agents(w) == {"a1": 4}
    assert [w.state(f"r{n}") for n in range(3)] == [RunState.running] * 2 + [RunState.queued]


def test_a_completed_attempt_counts_what_its_worker_ran_not_what_it_waited() -> None:
    w = World()
    w.fleet.observe(beat("a1", P, slots=4, queue=0))
    ran(w, "r1", P, 2.0, ran_s=0.003)
    assert w.work.durations.typical(P) == pytest.approx(0.003)
    ran(w, "r2", P, 0.004)  # an older agent's completion: dispatched to end
    ran(w, "r3", P, 3.0, ran_s=0.002)
    assert w.work.durations.typical(P) == pytest.approx(0.003)


@settings(max_examples=150, deadline=None)
@given(
    agents=st.lists(
        st.tuples(
            st.integers(1, 4),
            st.integers(0, 12),
            st.sampled_from([None, 0.0003, 0.0013, 0.0047, 0.011, 0.03]),
        ),
        min_size=1,
        max_size=3,
    ),
    attempt_s=st.sampled_from([0.0005, 0.0031, 0.2]),
    runs=st.integers(1, 40),
    one_pass=st.booleans(),
)
def test_runs_wait_at_agents_only_within_the_bound(
    agents: list[tuple[int, int, float | None]], attempt_s: float, runs: int, one_pass: bool
) -> None:
    """Whatever the fleet, how fast each agent drains and how long the attempts are: no agent
    holds more than its slots and its queue; the last run waiting at an agent was dispatched
    there when the runs ahead of it (those waiting there and one more end) over the agent's
    drain rate came to less than the bound; a run left in the scheduler's queue found no
    agent with room within the bound; queue positions are exact."""
    w = World()
    beats = [beat(f"a{i}", P, slots=s, queue=q) for i, (s, q, _) in enumerate(agents)]
    for b, (_, _, every) in zip(beats, agents, strict=True):
        if every is not None:
            drained(w, b.agent_id, every=every, n=b.slots("cpu") + 2, ran_s=attempt_s)
    if all(every is None for _, _, every in agents):
        drained(w, "gone", ran_s=attempt_s)
    for b in beats:
        w.fleet.observe(b)
    for n in range(runs):
        w.submit(f"r{n}")
        if not one_pass:
            w.settle()
    w.settle()
    held = on_agents(w)
    short = attempt_s < SHORT

    def room(agent_id: str, slots: int, queue: int) -> int:  # how many more may wait there
        rate = w.work.durations.drain_rate(agent_id, "cpu", w.wall, slots + 1)
        fits = 0
        if short and rate is not None:
            fits = sum(1 for ahead in range(1, queue + 1) if ahead / rate < BOUND)
        return fits - max(held[agent_id] - slots, 0)

    for b in beats:
        slots, queue = b.slots("cpu"), b.queue("cpu")
        assert held[b.agent_id] <= slots + queue
        assert room(b.agent_id, slots, queue) >= 0  # never more waiting than fit the bound
    queued = [f"r{n}" for n in range(runs) if w.state(f"r{n}") is RunState.queued]
    assert [w.index.queue_position(r) for r in queued] == list(range(len(queued)))
    if queued:  # nowhere left with a free slot, nor room within the bound
        for b in beats:
            assert held[b.agent_id] >= b.slots("cpu")
            assert room(b.agent_id, b.slots("cpu"), b.queue("cpu")) == 0
    assert sum(held.values()) + len(queued) == runs
