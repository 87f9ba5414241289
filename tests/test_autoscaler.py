"""The pure autoscaler: decisions from demand, replicas, agents and time; no NATS."""

from __future__ import annotations

import math
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from contracts.scaling import (
    AnyScalingEvent,
    DesiredReplicasChanged,
    NodeReleased,
    NodeRequested,
    ReplicaFailed,
    ReplicaLoadRequested,
    ReplicaReady,
    ReplicaState,
    ReplicaUnloadRequested,
    ScalingSettings,
    SettingsChanged,
    StartupGaveUp,
    WarmWindow,
    decode_scaling,
    encode_scaling,
)
from runtime.control.autoscaler import (
    Demand,
    Deployed,
    Gpu,
    Memory,
    Node,
    Replica,
    Tuning,
    plan,
    remember,
    replay,
    replica_states,
)

P = "team/model:v1"
NOW = 1_000_000.0
DEFAULT_TUNING = Tuning()


def deployed(**kw: object) -> Deployed:
    accel = str(kw.pop("accelerator", "cpu"))
    gpus = int(kw.pop("gpus", 1))  # type: ignore[call-overload]
    mem = int(kw.pop("gpu_memory_mb", 0))  # type: ignore[call-overload]
    pointer = str(kw.pop("pointer", P))
    return Deployed(pointer, ScalingSettings(**kw), accel, gpus, mem)  # type: ignore[arg-type]


def node(agent_id: str, *replicas: Replica, slots: int = 2, **kw: object) -> Node:
    serve = kw.pop("can_serve", frozenset({P}))
    return Node(agent_id, slots, replicas=replicas, can_serve=serve, **kw)  # type: ignore[arg-type]


def ready(agent_id: str, pointer: str = P, idle_since: float = NOW, running: int = 0) -> Replica:
    return Replica(pointer, agent_id, ReplicaState.ready, idle_since=idle_since, running=running)


def of(events: Sequence[AnyScalingEvent], kind: type) -> list:  # type: ignore[type-arg]
    return [e for e in events if isinstance(e, kind)]


def run(
    d: Deployed,
    demand: Demand,
    nodes: Sequence[Node],
    memory: Memory | None = None,
    now: float = NOW,
    tuning: Tuning = DEFAULT_TUNING,
) -> list[AnyScalingEvent]:
    return plan({d.pointer: d}, {d.pointer: demand}, nodes, memory or Memory(), now, tuning)


# --- scaling up -----------------------------------------------------------------------------


def test_waiting_runs_load_a_replica_at_once() -> None:
    events = run(deployed(max_replicas=3), Demand(queued=1), [node("a")])
    loads = of(events, ReplicaLoadRequested)
    assert [(e.pipeline, e.agent_id) for e in loads] == [(P, "a")]
    assert of(events, DesiredReplicasChanged)[0].desired == 1


def test_burst_scales_to_max_replicas_spread_over_agents() -> None:
    nodes = [node("a"), node("b"), node("c"), node("d")]
    events = run(deployed(max_replicas=3), Demand(queued=200), nodes)
    loads = of(events, ReplicaLoadRequested)
    assert len(loads) == 3 and len({e.agent_id for e in loads}) == 3
    assert of(events, DesiredReplicasChanged)[0].desired == 3


def test_target_concurrency_divides_the_demand() -> None:
    nodes = [node(x) for x in "abcdef"]
    events = run(deployed(max_replicas=6, target_concurrency=4), Demand(queued=9), nodes)
    assert len(of(events, ReplicaLoadRequested)) == 3  # ceil(9 / 4)


def test_a_turned_away_run_brings_a_replica_for_the_cooldown() -> None:
    d = deployed(cooldown_s=30)
    assert of(run(d, Demand(rejected_at=NOW - 1), [node("a")]), ReplicaLoadRequested)
    assert not of(run(d, Demand(rejected_at=NOW - 31), [node("a")]), ReplicaLoadRequested)


def test_loading_replica_and_requested_load_are_not_loaded_twice() -> None:
    d = deployed(max_replicas=1)
    loading = Replica(P, "a", ReplicaState.loading)
    assert not of(run(d, Demand(queued=5), [node("a", loading), node("b")]), ReplicaLoadRequested)
    memory = remember(Memory(), ReplicaLoadRequested(pipeline=P, at=NOW - 1, agent_id="a"))
    assert not of(run(d, Demand(queued=5), [node("a"), node("b")], memory), ReplicaLoadRequested)


def test_a_requested_load_never_heard_of_is_decided_again_after_the_grace() -> None:
    memory = remember(Memory(), ReplicaLoadRequested(pipeline=P, at=NOW - 61, agent_id="a"))
    # the stale request still keeps "a" from a second replica of the same pipeline ...
    events = run(deployed(), Demand(queued=1), [node("a"), node("b")], memory)
    assert [e.agent_id for e in of(events, ReplicaLoadRequested)] == ["b"]


def test_floor_and_warm_window_keep_replicas_without_traffic() -> None:
    assert (
        len(
            of(
                run(deployed(min_replicas=2, max_replicas=3), Demand(), [node("a"), node("b")]),
                ReplicaLoadRequested,
            )
        )
        == 2
    )
    minute = int(NOW // 60) % 1440
    start = f"{minute // 60:02d}:{minute % 60:02d}"
    end = f"{(minute + 5) // 60 % 24:02d}:{(minute + 5) % 60:02d}"
    d = deployed(max_replicas=2, warm=[WarmWindow(start=start, end=end, replicas=1)])
    assert len(of(run(d, Demand(), [node("a")]), ReplicaLoadRequested)) == 1
    assert not of(run(d, Demand(), [node("a")], now=NOW + 3600), ReplicaLoadRequested)


def test_warm_window_across_midnight() -> None:
    w = WarmWindow(start="23:00", end="01:00")
    assert w.covers(23.5 * 3600) and w.covers(0.5 * 3600) and not w.covers(12 * 3600)


# --- scaling down ---------------------------------------------------------------------------


def test_idle_replica_is_unloaded_only_after_cooldown() -> None:
    d = deployed(cooldown_s=60)
    fresh = [node("a", ready("a", idle_since=NOW - 59))]
    assert not of(run(d, Demand(), fresh), ReplicaUnloadRequested)
    old = [node("a", ready("a", idle_since=NOW - 60))]
    unloads = of(run(d, Demand(), old), ReplicaUnloadRequested)
    assert [e.agent_id for e in unloads] == ["a"]


def test_busy_replica_is_never_unloaded_and_min_replicas_is_kept() -> None:
    d = deployed(cooldown_s=0, min_replicas=1, max_replicas=3)
    nodes = [node("a", ready("a", running=1)), node("b", ready("b")), node("c", ready("c"))]
    unloads = of(run(d, Demand(running=1), nodes), ReplicaUnloadRequested)
    assert sorted(e.agent_id for e in unloads) == ["b", "c"]
    nodes = [node("a", ready("a")), node("b", ready("b"))]
    assert len(of(run(d, Demand(), nodes), ReplicaUnloadRequested)) == 1


def test_lowering_max_replicas_unloads_idle_replicas_at_once() -> None:
    d = deployed(cooldown_s=3600, max_replicas=1)
    nodes = [node("a", ready("a")), node("b", ready("b"))]
    assert len(of(run(d, Demand(queued=3), nodes), ReplicaUnloadRequested)) == 1


def test_a_replica_being_unloaded_is_draining_and_not_counted() -> None:
    d = deployed(cooldown_s=0)
    memory = remember(Memory(), ReplicaUnloadRequested(pipeline=P, at=NOW - 1, agent_id="a"))
    nodes = [node("a", ready("a"))]
    assert not of(run(d, Demand(), nodes, memory), ReplicaUnloadRequested)
    assert replica_states(P, nodes, memory, NOW) == [("a", ReplicaState.draining)]


# --- placement ------------------------------------------------------------------------------


def gpu_node(agent_id: str, *replicas: Replica, gpus: int = 2, mem: int | None = 80_000) -> Node:
    return Node(
        agent_id,
        0,
        tuple(Gpu(i, mem) for i in range(gpus)),
        frozenset({P, "team/other:v1"}),
        replicas,
    )


def test_gpu_replicas_take_free_gpus_and_respect_count() -> None:
    d = deployed(accelerator="gpu", gpus=2, max_replicas=2)
    events = run(d, Demand(queued=2), [gpu_node("a", gpus=1), gpu_node("b", gpus=2)])
    loads = of(events, ReplicaLoadRequested)
    assert [(e.agent_id, e.gpus) for e in loads] == [("b", [0, 1])]
    assert of(events, NodeRequested)  # the second replica needs a node


def test_two_replicas_share_a_gpu_only_when_both_fit() -> None:
    other = Replica("team/other:v1", "a", ReplicaState.ready, gpus=(0,))
    pipelines = {
        P: deployed(accelerator="gpu", gpu_memory_mb=30_000),
        "team/other:v1": deployed(pointer="team/other:v1", accelerator="gpu", gpu_memory_mb=40_000),
    }
    events = plan(pipelines, {P: Demand(queued=1)}, [gpu_node("a", other, gpus=1)], Memory(), NOW)
    assert [(e.agent_id, e.gpus) for e in of(events, ReplicaLoadRequested)] == [("a", [0])]
    pipelines[P] = deployed(accelerator="gpu", gpu_memory_mb=50_000)
    events = plan(pipelines, {P: Demand(queued=1)}, [gpu_node("a", other, gpus=1)], Memory(), NOW)
    assert not of(events, ReplicaLoadRequested) and of(events, NodeRequested)


def test_unknown_memory_means_a_gpu_is_not_shared() -> None:
    other = Replica("team/other:v1", "a", ReplicaState.ready, gpus=(0,))
    pipelines = {
        P: deployed(accelerator="gpu", gpu_memory_mb=1),
        "team/other:v1": deployed(pointer="team/other:v1", accelerator="gpu"),
    }
    events = plan(pipelines, {P: Demand(queued=1)}, [gpu_node("a", other, gpus=1)], Memory(), NOW)
    assert not of(events, ReplicaLoadRequested)


def test_an_agent_that_cannot_serve_or_is_draining_gets_nothing() -> None:
    nodes = [node("a", can_serve=frozenset()), node("b", draining=True)]
    events = run(deployed(), Demand(queued=1), nodes)
    assert not of(events, ReplicaLoadRequested) and of(events, NodeRequested)


def test_cpu_replicas_are_limited_by_slots() -> None:
    other = "team/other:v1"
    pipelines = {P: deployed(), other: deployed(pointer=other)}
    full = node("a", ready("a", other), slots=1, can_serve=frozenset({P, other}))
    events = plan(pipelines, {P: Demand(queued=1)}, [full], Memory(), NOW)
    assert not of(events, ReplicaLoadRequested)
    assert [e.node_id for e in of(events, NodeRequested)] == ["node-1"]


def test_spread_prefers_the_agent_with_fewer_replicas() -> None:
    other = "team/other:v1"
    pipelines = {P: deployed(), other: deployed(pointer=other)}
    serve = frozenset({P, other})
    nodes = [node("a", ready("a", other), can_serve=serve), node("b", can_serve=serve)]
    events = plan(pipelines, {P: Demand(queued=1)}, nodes, Memory(), NOW)
    assert [e.agent_id for e in of(events, ReplicaLoadRequested)] == ["b"]


# --- nodes ----------------------------------------------------------------------------------


def test_node_requested_once_while_it_boots_then_used() -> None:
    d = deployed()
    events = run(d, Demand(queued=1), [])
    (request,) = of(events, NodeRequested)
    memory = replay(events)
    again = run(d, Demand(queued=1), [], memory, now=NOW + 5)
    assert not of(again, NodeRequested)
    assert replica_states(P, [], memory, NOW + 5) == [(request.node_id, ReplicaState.booting)]
    booted = run(d, Demand(queued=1), [node(request.node_id)], memory, now=NOW + 6)
    assert [e.agent_id for e in of(booted, ReplicaLoadRequested)] == [request.node_id]


def test_no_node_is_requested_for_a_pipeline_the_provider_cannot_serve() -> None:
    t = Tuning(provides=frozenset({"team/other:v1"}))
    assert not of(run(deployed(), Demand(queued=1), [], tuning=t), NodeRequested)
    t = Tuning(provides=frozenset({P}))
    assert of(run(deployed(), Demand(queued=1), [], tuning=t), NodeRequested)


def test_max_nodes_bounds_requests() -> None:
    events = run(deployed(max_replicas=10), Demand(queued=10), [], tuning=Tuning(max_nodes=2))
    assert len(of(events, NodeRequested)) == 2


def test_idle_added_node_is_released_after_its_cooldown_others_never() -> None:
    memory = remember(Memory(), NodeRequested(pipeline=P, at=NOW - 100, node_id="node-1"))
    t = Tuning(node_cooldown_s=30)
    idle = [node("node-1", idle_since=NOW - 31), node("static", idle_since=NOW - 1000)]
    released = of(run(deployed(), Demand(), idle, memory, tuning=t), NodeReleased)
    assert [e.node_id for e in released] == ["node-1"]
    recent = [node("node-1", idle_since=NOW - 29)]
    assert not of(run(deployed(), Demand(), recent, memory, tuning=t), NodeReleased)
    busy = [node("node-1", ready("node-1", idle_since=NOW - 31), idle_since=NOW - 31)]
    assert not of(run(deployed(cooldown_s=3600), Demand(), busy, memory, tuning=t), NodeReleased)


def test_a_node_that_never_registers_is_released() -> None:
    memory = remember(Memory(), NodeRequested(pipeline=P, at=NOW - 601, node_id="node-1"))
    events = run(deployed(), Demand(queued=1), [], memory)
    assert [e.node_id for e in of(events, NodeReleased)] == ["node-1"]
    assert [e.node_id for e in of(events, NodeRequested)] == ["node-2"]


# --- startup failures -----------------------------------------------------------------------


def failed(agent_id: str) -> Replica:
    return Replica(P, agent_id, ReplicaState.failed, error="RuntimeError: no weights")


def test_failed_startup_is_retried_with_backoff_then_gives_up() -> None:
    d = deployed(startup_retries=2, startup_backoff_s=10)
    demand = Demand(queued=1, wanted_at=NOW - 1)
    memory = replay(run(d, demand, [node("a")]))
    now = NOW
    for attempt in (1, 2, 3):
        events = run(d, demand, [node("a", failed("a"))], memory, now=now)
        (failure,) = of(events, ReplicaFailed)
        assert failure.failures == attempt and "no weights" in failure.message
        assert of(events, ReplicaUnloadRequested)
        memory = replay(events, memory)
        if attempt == 3:
            (gave_up,) = of(events, StartupGaveUp)
            assert "no weights" in gave_up.message
            break
        backoff = 10 * 2 ** (attempt - 1)
        early = run(d, demand, [node("a")], memory, now=now + backoff - 1)
        assert not of(early, ReplicaLoadRequested)
        now += backoff
        retry = run(d, demand, [node("a")], memory, now=now)
        assert of(retry, ReplicaLoadRequested)
        memory = replay(retry, memory)
    # given up: nothing more until a run arrives after that
    assert not of(run(d, demand, [node("a")], memory, now=now + 100), ReplicaLoadRequested)
    later = Demand(queued=1, wanted_at=now + 50)
    assert of(run(d, later, [node("a")], memory, now=now + 100), ReplicaLoadRequested)


def test_ready_replica_is_recorded_with_its_load_time_and_clears_failures() -> None:
    memory = replay(
        [
            ReplicaFailed(pipeline=P, at=NOW - 20, agent_id="a", message="x"),
            ReplicaLoadRequested(pipeline=P, at=NOW - 4, agent_id="a"),
        ]
    )
    events = run(deployed(), Demand(queued=1), [node("a", ready("a"))], memory)
    (ok,) = of(events, ReplicaReady)
    assert ok.load_s == 4
    assert P not in replay(events, memory).failures


def test_settings_change_clears_a_give_up() -> None:
    memory = replay([StartupGaveUp(pipeline=P, at=NOW, message="x", failures=4)])
    assert P in memory.gave_up
    changed = remember(memory, SettingsChanged(pipeline=P, at=NOW, settings=ScalingSettings()))
    assert P not in changed.gave_up


# --- wire and settings ----------------------------------------------------------------------


def test_scaling_events_round_trip() -> None:
    events = run(deployed(max_replicas=2), Demand(queued=2), [node("a")])
    assert events and all(decode_scaling(encode_scaling(e)) == e for e in events)
    assert len({e.message_id() for e in events}) == len(events)


def test_settings_reject_min_above_max() -> None:
    import msgspec
    import pytest

    with pytest.raises(msgspec.ValidationError, match="min_replicas"):
        msgspec.convert({"min_replicas": 3, "max_replicas": 2}, ScalingSettings)
    with pytest.raises(msgspec.ValidationError, match="HH:MM"):
        msgspec.convert({"warm": [{"start": "25:00", "end": "01:00"}]}, ScalingSettings)


# --- properties -----------------------------------------------------------------------------

settings_st = st.builds(
    lambda lo, extra, cooldown, target: ScalingSettings(
        min_replicas=lo,
        max_replicas=max(lo + extra, 1),
        cooldown_s=cooldown,
        target_concurrency=target,
    ),
    st.integers(0, 3),
    st.integers(0, 4),
    st.sampled_from([0.0, 10.0, 60.0]),
    st.integers(1, 4),
)


@st.composite
def worlds(draw: st.DrawFn) -> tuple[Deployed, Demand, list[Node]]:
    s = draw(settings_st)
    d = Deployed(P, s)
    nodes = []
    for i in range(draw(st.integers(0, 6))):
        agent = f"a{i}"
        replicas: tuple[Replica, ...] = ()
        if draw(st.booleans()):
            state = draw(st.sampled_from([ReplicaState.ready, ReplicaState.loading]))
            idle = NOW - draw(st.sampled_from([0.0, 5.0, 100.0]))
            running = draw(st.integers(0, 2)) if state is ReplicaState.ready else 0
            replicas = (Replica(P, agent, state, running=running, idle_since=idle),)
        nodes.append(
            Node(agent, draw(st.integers(0, 2)), can_serve=frozenset({P}), replicas=replicas)
        )
    demand = Demand(
        queued=draw(st.integers(0, 30)),
        running=sum(r.running for n in nodes for r in n.replicas),
    )
    return d, demand, nodes


def after(nodes: list[Node], events: list[AnyScalingEvent]) -> int:
    """Live replicas once the decisions took effect."""
    live = {n.agent_id for n in nodes for r in n.replicas}
    for e in events:
        if isinstance(e, ReplicaLoadRequested):
            live.add(e.agent_id)
        elif isinstance(e, ReplicaUnloadRequested):
            live.discard(e.agent_id)
    return len(live)


@settings(max_examples=300, deadline=None)
@given(worlds())
def test_property_never_above_max_never_below_min_with_room(
    world: tuple[Deployed, Demand, list[Node]],
) -> None:
    d, demand, nodes = world
    events = run(d, demand, nodes)
    live_after = after(nodes, events)
    before = sum(1 for n in nodes for _ in n.replicas)
    assert live_after <= max(d.settings.max_replicas, before)
    if before <= d.settings.max_replicas:
        assert live_after <= d.settings.max_replicas
    requested = len(of(events, NodeRequested))
    assert live_after + requested >= min(d.settings.min_replicas, d.settings.max_replicas) or (
        len(nodes) + requested >= Tuning().max_nodes
    )


@settings(max_examples=300, deadline=None)
@given(worlds())
def test_property_waiting_runs_scale_up_at_once(
    world: tuple[Deployed, Demand, list[Node]],
) -> None:
    d, demand, nodes = world
    events = run(d, demand, nodes)
    need = math.ceil((demand.queued + demand.running) / d.settings.target_concurrency)
    want = min(max(need, d.settings.min_replicas), d.settings.max_replicas)
    live = sum(1 for n in nodes for _ in n.replicas)
    if live < want:
        grew = of(events, ReplicaLoadRequested) + of(events, NodeRequested)
        assert len(grew) == want - live
        assert not of(events, ReplicaUnloadRequested)


@settings(max_examples=300, deadline=None)
@given(worlds())
def test_property_down_only_idle_past_cooldown_and_load_spreads(
    world: tuple[Deployed, Demand, list[Node]],
) -> None:
    d, demand, nodes = world
    events = run(d, demand, nodes)
    replicas = {r.agent_id: r for n in nodes for r in n.replicas}
    over_max = len(replicas) > d.settings.max_replicas  # then idle ones go at once
    for e in of(events, ReplicaUnloadRequested):
        r = replicas[e.agent_id]
        assert r.running == 0 and (over_max or NOW - r.idle_since >= d.settings.cooldown_s)
    loads = [e.agent_id for e in of(events, ReplicaLoadRequested)]
    assert len(loads) == len(set(loads))  # never two replicas of one pipeline on an agent
    slots = {n.agent_id: n.cpu_slots for n in nodes}
    assert all(slots[a] >= 1 for a in loads)
    if len(loads) > 1:  # spread: no agent got a second new replica while another had none
        counts = {a: (1 if a in replicas else 0) for a in slots}
        assert max(counts[a] for a in loads) == 0
