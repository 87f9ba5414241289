"""The replica autoscaler: demand, replicas, agents and time in; scaling events out.

Pure: no nats, no anyio, no clock. ``plan(...)`` looks at one moment and returns the decisions
(``contracts.scaling`` events); ``remember(memory, event)`` folds a decision into the
``Memory`` the next ``plan`` needs, so replaying the scaling stream rebuilds it after a restart.
Its inputs and memory live in ``runtime.control.scaling_model`` (re-exported here).

Rules, per autoscaled pipeline:
- wanted = ceil((queued + running) / target_concurrency), at least 1 while a run was turned
  away (503) within ``cooldown_s``; kept between the floor (``min_replicas`` or a warm window)
  and ``max_replicas``.
- Fewer live replicas than wanted: load at once, on the agent that can serve it, has room and
  holds the fewest replicas (spread); no agent has room: ask for a node.
- More than wanted: unload replicas idle for ``cooldown_s`` (at once above ``max_replicas``).
- A failed startup is unloaded and retried after a doubling back-off, ``startup_retries``
  times; then ``StartupGaveUp`` (waiting runs fail with its message) until new runs arrive.
- Added nodes with no replica and no run for ``node_cooldown_s`` are released.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

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
    StartupGaveUp,
)
from runtime.control.scaling_model import (
    DEFAULT_TUNING,
    Demand,
    Deployed,
    Failures,
    Gpu,
    Key,
    Memory,
    Node,
    Replica,
    Tuning,
    booting,
    remember,
    replay,
    replica_states,
)

__all__ = [
    "Demand",
    "Deployed",
    "Failures",
    "Gpu",
    "Memory",
    "Node",
    "Replica",
    "Tuning",
    "booting",
    "plan",
    "remember",
    "replay",
    "replica_states",
    "wanted",
]


def plan(
    pipelines: Mapping[str, Deployed],
    demand: Mapping[str, Demand],
    nodes: Sequence[Node],
    memory: Memory,
    now: float,
    tuning: Tuning = DEFAULT_TUNING,
) -> list[AnyScalingEvent]:
    """Every scaling decision at ``now``. Pure; deterministic for the same arguments."""
    planner = _Planner(pipelines, nodes, memory, now, tuning)
    for pointer in sorted(pipelines):
        planner.scale(pipelines[pointer], demand.get(pointer, Demand()))
    planner.release_nodes()
    return planner.events


def wanted(deployed: Deployed, demand: Demand, now: float) -> int:
    """Replicas the pipeline should have now, before the cooldown is considered."""
    s = deployed.settings
    need = math.ceil((demand.queued + demand.running) / s.target_concurrency)
    if now - demand.rejected_at < s.cooldown_s:
        need = max(need, 1)
    return min(max(need, s.floor(now)), s.max_replicas)


class _Planner:
    def __init__(
        self,
        pipelines: Mapping[str, Deployed],
        nodes: Sequence[Node],
        memory: Memory,
        now: float,
        tuning: Tuning,
    ) -> None:
        self.pipelines, self.memory, self.now, self.t = pipelines, memory, now, tuning
        self.nodes = {n.agent_id: n for n in nodes}
        self.events: list[AnyScalingEvent] = []
        # replicas placed in this pass: agent id -> [(pipeline, gpus)]
        self.placed: dict[str, list[tuple[str, tuple[int, ...]]]] = {}

    def emit(self, event: AnyScalingEvent) -> None:
        self.events.append(event)
        self.memory = remember(self.memory, event)

    # --- one pipeline ------------------------------------------------------------------------

    def scale(self, d: Deployed, demand: Demand) -> None:
        self.observe(d)
        live = self.live(d.pointer)
        target = wanted(d, demand, self.now)
        if len(live) < target and self.may_load(d, demand):
            self.scale_up(d, target - len(live))
        elif len(live) > target:
            self.scale_down(d, live, len(live) - target)
        desired = max(target, len(self.live(d.pointer)))
        if self.memory.desired.get(d.pointer, 0) != desired:
            reason = f"{demand.queued} queued, {demand.running} running"
            self.emit(
                DesiredReplicasChanged(
                    pipeline=d.pointer,
                    at=self.now,
                    desired=desired,
                    current=len(live),
                    reason=reason,
                )
            )

    def observe(self, d: Deployed) -> None:
        """Record replicas that became ready or failed since they were asked for; unload
        failed ones; give up after too many failures."""
        for r in self.replicas(d.pointer):
            key = (d.pointer, r.agent_id)
            if r.state is ReplicaState.ready and key in self.memory.loads:
                load_s = self.now - self.memory.loads[key]
                self.emit(
                    ReplicaReady(
                        pipeline=d.pointer, at=self.now, agent_id=r.agent_id, load_s=load_s
                    )
                )
            elif r.state is ReplicaState.failed and not self.unloading(key):
                prior = self.memory.failures.get(d.pointer)
                count = (prior.count if prior else 0) + 1
                message = r.error or "startup failed"
                self.emit(
                    ReplicaFailed(
                        pipeline=d.pointer,
                        at=self.now,
                        agent_id=r.agent_id,
                        message=message,
                        failures=count,
                    )
                )
                self.emit(
                    ReplicaUnloadRequested(
                        pipeline=d.pointer,
                        at=self.now,
                        agent_id=r.agent_id,
                        reason="startup failed",
                    )
                )
        failures = self.memory.failures.get(d.pointer)
        if failures is not None and failures.count > d.settings.startup_retries:
            self.emit(
                StartupGaveUp(
                    pipeline=d.pointer,
                    at=self.now,
                    message=failures.message,
                    failures=failures.count,
                )
            )

    def may_load(self, d: Deployed, demand: Demand) -> bool:
        gave_up = self.memory.gave_up.get(d.pointer)
        if gave_up is not None and demand.wanted_at <= gave_up:
            return False  # no new runs since startup gave up
        failures = self.memory.failures.get(d.pointer)
        if failures is None:
            return True
        return self.now >= failures.last_at + d.settings.backoff_s(failures.count)

    def scale_up(self, d: Deployed, missing: int) -> None:
        for _ in range(missing):
            choice = self.choose(d)
            if choice is None:
                break
            agent_id, gpus = choice
            self.placed.setdefault(agent_id, []).append((d.pointer, gpus))
            self.emit(
                ReplicaLoadRequested(
                    pipeline=d.pointer,
                    at=self.now,
                    agent_id=agent_id,
                    gpus=list(gpus),
                    reason="runs waiting",
                )
            )
            missing -= 1
        boots = booting(self.memory, d.pointer, list(self.nodes.values()), self.now, self.t)
        if self.t.provides is not None and d.pointer not in self.t.provides:
            return  # no node the provider adds could serve it
        for _ in range(missing - boots):
            if len(self.memory.nodes) >= self.t.max_nodes:
                return
            node_id = f"node-{self.memory.nodes_requested + 1}"
            self.emit(
                NodeRequested(
                    pipeline=d.pointer,
                    at=self.now,
                    node_id=node_id,
                    accelerator=d.accelerator,
                    reason="no agent has room for a replica",
                )
            )

    def scale_down(self, d: Deployed, live: list[Replica], excess: int) -> None:
        over_max = len(live) > d.settings.max_replicas
        idle = [
            r
            for r in live
            if r.running == 0
            and r.state in (ReplicaState.ready, ReplicaState.loading)
            and (over_max or self.now - r.idle_since >= d.settings.cooldown_s)
        ]
        idle.sort(key=lambda r: (r.idle_since, r.agent_id))
        for r in idle[:excess]:
            reason = "above max_replicas" if over_max else f"idle for {d.settings.cooldown_s:g} s"
            self.emit(
                ReplicaUnloadRequested(
                    pipeline=d.pointer, at=self.now, agent_id=r.agent_id, reason=reason
                )
            )

    # --- what exists -------------------------------------------------------------------------

    def replicas(self, pointer: str) -> list[Replica]:
        return [r for n in self.nodes.values() for r in n.replicas if r.pipeline == pointer]

    def unloading(self, key: Key) -> bool:
        at = self.memory.unloads.get(key)
        return at is not None and self.now - at < self.t.unload_grace_s

    def live(self, pointer: str) -> list[Replica]:
        """Loading or ready replicas not told to unload, and loads asked for but not heard of
        yet (within the grace)."""
        seen = [
            r
            for r in self.replicas(pointer)
            if r.state in (ReplicaState.loading, ReplicaState.ready)
            and not self.unloading((pointer, r.agent_id))
        ]
        reported = {r.agent_id for r in self.replicas(pointer)}
        for (p, agent_id), at in sorted(self.memory.loads.items()):
            if p == pointer and agent_id not in reported and self.now - at < self.t.load_grace_s:
                seen.append(Replica(p, agent_id, ReplicaState.loading, idle_since=at))
        return seen

    # --- placement ---------------------------------------------------------------------------

    def choose(self, d: Deployed) -> tuple[str, tuple[int, ...]] | None:
        """The agent (and GPUs) for a new replica of ``d``: among agents with room, the one
        holding the fewest replicas, then running the fewest runs."""
        options = []
        for node in self.nodes.values():
            gpus = self.fit(node, d)
            if gpus is not None:
                load = len(self.held(node)) + len(self.placed.get(node.agent_id, []))
                options.append(((load, node.running, node.agent_id), node.agent_id, gpus))
        if not options:
            return None
        _, agent_id, gpus = min(options)
        return agent_id, gpus

    def held(self, node: Node) -> list[Replica]:
        """The node's replicas of autoscaled pipelines, failed ones excepted."""
        return [
            r
            for r in node.replicas
            if r.pipeline in self.pipelines and r.state is not ReplicaState.failed
        ]

    def fit(self, node: Node, d: Deployed) -> tuple[int, ...] | None:
        """The GPUs a replica of ``d`` would use on ``node`` (``()`` for CPU), or None when
        the node cannot take it."""
        if node.draining or d.pointer not in node.can_serve:
            return None
        mine = {r.pipeline for r in node.replicas}
        mine.update(p for p, _ in self.placed.get(node.agent_id, []))
        mine.update(p for (p, a), _ in self.memory.loads.items() if a == node.agent_id)
        if d.pointer in mine:
            return None  # one replica of a pipeline per agent
        if d.accelerator == "gpu":
            return self.fit_gpus(node, d)
        used = sum(1 for r in self.held(node) if self.kind(r.pipeline) == d.accelerator)
        used += sum(
            1 for p, _ in self.placed.get(node.agent_id, []) if self.kind(p) == d.accelerator
        )
        slots = node.cpu_slots if d.accelerator == "cpu" else 0
        return () if used < slots else None

    def kind(self, pointer: str) -> str:
        deployed = self.pipelines.get(pointer)
        return deployed.accelerator if deployed is not None else "cpu"

    def fit_gpus(self, node: Node, d: Deployed) -> tuple[int, ...] | None:
        """GPUs with room: free ones, or shared ones whose known memory holds every replica
        on them plus this one. Emptiest first."""
        on_gpu: dict[int, list[int]] = {g.index: [] for g in node.gpus}
        holders = [(r.pipeline, r.gpus) for r in self.held(node)]
        holders += self.placed.get(node.agent_id, [])
        for pointer, gpus in holders:
            need = self.pipelines[pointer].gpu_memory_mb if pointer in self.pipelines else 0
            for index in gpus:
                on_gpu.setdefault(index, []).append(need)
        free = []
        for gpu in node.gpus:
            taken = on_gpu[gpu.index]
            shareable = gpu.memory_mb is not None and d.gpu_memory_mb > 0 and all(taken)
            room = (gpu.memory_mb or 0) - sum(taken)
            if not taken or (shareable and room >= d.gpu_memory_mb):
                free.append((len(taken), -room, gpu.index))
        if len(free) < d.gpus:
            return None
        return tuple(sorted(index for _, _, index in sorted(free)[: d.gpus]))

    # --- nodes -------------------------------------------------------------------------------

    def release_nodes(self) -> None:
        for node_id, request in sorted(self.memory.nodes.items()):
            node = self.nodes.get(node_id)
            if node is None:
                if self.now - request.at >= self.t.node_boot_timeout_s:
                    self.emit(
                        NodeReleased(
                            pipeline="", at=self.now, node_id=node_id, reason="never registered"
                        )
                    )
                continue
            busy = self.held(node) or self.placed.get(node_id) or node.running
            if not busy and self.now - node.idle_since >= self.t.node_cooldown_s:
                reason = f"idle for {self.t.node_cooldown_s:g} s"
                self.emit(NodeReleased(pipeline="", at=self.now, node_id=node_id, reason=reason))
