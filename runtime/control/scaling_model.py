"""What the autoscaler reads: deployed pipelines, demand, nodes and their replicas, and its own
memory (folded from the scaling events it decided before). Pure: no nats, no anyio, no clock."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from contracts.agents import PipelineInfo
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
    ScalingEvent,
    ScalingSettings,
    SettingsChanged,
    StartupGaveUp,
)

Key = tuple[str, str]  # (pipeline, agent id)


@dataclass(frozen=True)
class Deployed:
    """An autoscaled pipeline and what one replica needs."""

    pointer: str
    settings: ScalingSettings
    accelerator: str = "cpu"
    gpus: int = 1
    gpu_memory_mb: int = 0

    @classmethod
    def of(cls, info: PipelineInfo) -> Deployed | None:
        if info.scaling is None:
            return None
        return cls(info.pointer, info.scaling, info.accelerator, info.gpus, info.gpu_memory_mb)


@dataclass(frozen=True)
class Demand:
    queued: int = 0
    running: int = 0
    wanted_at: float = -math.inf  # when a run last arrived (queued or turned away)
    rejected_at: float = -math.inf  # when a run was last turned away for lack of replicas


@dataclass(frozen=True)
class Gpu:
    index: int
    memory_mb: int | None = None


@dataclass(frozen=True)
class Replica:
    pipeline: str
    agent_id: str
    state: ReplicaState
    gpus: tuple[int, ...] = ()
    running: int = 0
    idle_since: float = -math.inf  # when it last finished a run (or became ready)
    error: str | None = None


@dataclass(frozen=True)
class Node:
    agent_id: str
    cpu_slots: int = 0
    gpus: tuple[Gpu, ...] = ()
    can_serve: frozenset[str] = frozenset()
    replicas: tuple[Replica, ...] = ()
    running: int = 0
    idle_since: float = -math.inf  # when it last held a replica or a run
    draining: bool = False


@dataclass(frozen=True)
class Tuning:
    load_grace_s: float = 60.0  # a requested load not in any heartbeat counts this long
    unload_grace_s: float = 60.0  # a replica told to unload counts as draining this long
    node_boot_timeout_s: float = 600.0  # a requested node not heard from by then is released
    node_cooldown_s: float = 60.0  # an added node idle this long is released
    max_nodes: int = 8  # nodes a provider may add at once
    provides: frozenset[str] | None = None  # pipelines a provider's nodes can serve (None: any)


DEFAULT_TUNING = Tuning()


@dataclass(frozen=True)
class Failures:
    count: int
    last_at: float
    message: str


@dataclass(frozen=True)
class Memory:
    """What the autoscaler has decided before, folded from its own events."""

    loads: Mapping[Key, float] = field(default_factory=dict)
    unloads: Mapping[Key, float] = field(default_factory=dict)
    nodes: Mapping[str, NodeRequested] = field(default_factory=dict)
    nodes_requested: int = 0
    failures: Mapping[str, Failures] = field(default_factory=dict)
    gave_up: Mapping[str, float] = field(default_factory=dict)
    desired: Mapping[str, int] = field(default_factory=dict)


def remember(memory: Memory, event: ScalingEvent) -> Memory:
    """``memory`` with ``event`` folded in (a new value; ``memory`` is not changed)."""
    loads, unloads = dict(memory.loads), dict(memory.unloads)
    nodes, failures = dict(memory.nodes), dict(memory.failures)
    gave_up, desired = dict(memory.gave_up), dict(memory.desired)
    count = memory.nodes_requested
    p = event.pipeline
    match event:
        case DesiredReplicasChanged():
            desired[p] = event.desired
        case ReplicaLoadRequested():
            loads[(p, event.agent_id)] = event.at
            unloads.pop((p, event.agent_id), None)
        case ReplicaReady():
            loads.pop((p, event.agent_id), None)
            failures.pop(p, None)
        case ReplicaFailed():
            loads.pop((p, event.agent_id), None)
            failures[p] = Failures(event.failures, event.at, event.message)
        case ReplicaUnloadRequested():
            unloads[(p, event.agent_id)] = event.at
            loads.pop((p, event.agent_id), None)
        case StartupGaveUp():
            failures.pop(p, None)
            gave_up[p] = event.at
        case NodeRequested():
            nodes[event.node_id] = event
            count = max(count + (event.node_id not in memory.nodes), _number(event.node_id))
        case NodeReleased():
            nodes.pop(event.node_id, None)
        case SettingsChanged():
            failures.pop(p, None)
            gave_up.pop(p, None)
    return Memory(loads, unloads, nodes, count, failures, gave_up, desired)


def _number(node_id: str) -> int:
    """``node-7`` -> 7 (0 for other names): folding a request twice does not count it twice."""
    tail = node_id.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def replay(events: Iterable[AnyScalingEvent], memory: Memory | None = None) -> Memory:
    memory = memory or Memory()
    for event in events:
        memory = remember(memory, event)
    return memory


def booting(memory: Memory, pointer: str, nodes: Sequence[Node], now: float, t: Tuning) -> int:
    """Nodes requested for ``pointer`` that have not registered yet (nor timed out)."""
    heard = {n.agent_id for n in nodes}
    return sum(
        1
        for r in memory.nodes.values()
        if r.pipeline == pointer and r.node_id not in heard and now - r.at < t.node_boot_timeout_s
    )


def replica_states(
    pointer: str, nodes: Sequence[Node], memory: Memory, now: float, tuning: Tuning = DEFAULT_TUNING
) -> list[tuple[str, ReplicaState]]:
    """Each replica of ``pointer`` and its state, as the scaling endpoint shows them."""
    out: list[tuple[str, ReplicaState]] = []
    reported: set[str] = set()
    for node in nodes:
        for r in node.replicas:
            if r.pipeline != pointer:
                continue
            reported.add(node.agent_id)
            at = memory.unloads.get((pointer, node.agent_id))
            draining = at is not None and now - at < tuning.unload_grace_s
            state = (
                ReplicaState.draining
                if draining and r.state is not ReplicaState.failed
                else r.state
            )
            out.append((node.agent_id, state))
    for (p, agent_id), at in sorted(memory.loads.items()):
        if p == pointer and agent_id not in reported and now - at < tuning.load_grace_s:
            out.append((agent_id, ReplicaState.loading))
    heard = {n.agent_id for n in nodes}
    for node_id, request in sorted(memory.nodes.items()):
        fresh = now - request.at < tuning.node_boot_timeout_s
        if request.pipeline == pointer and node_id not in heard and fresh:
            out.append((node_id, ReplicaState.booting))
    return out
