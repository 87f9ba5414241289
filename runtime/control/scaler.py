"""The scaler: the process around the pure autoscaler (``runtime.control.autoscaler``).

It runs beside the scheduler and reads what the scheduler reads (the run index, the fleet from
heartbeats, the catalogue the scheduler follows, so settings changes apply without a restart). Every
``tick_s`` it builds the autoscaler's inputs, calls ``plan``, appends the decisions to the
scaling log, and acts on them: a node provider adds or removes nodes; when startup gave up,
the pipeline's waiting runs fail with a ``startup_error``. Agents act on load/unload events
themselves. All it keeps besides the log is demand and idle times, rebuilt from the run log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections import Counter

import anyio
from anyio.abc import TaskGroup, TaskStatus

from contracts.agents import AgentHeartbeat, PipelineStatus
from contracts.errors import ErrorType, RunError
from contracts.events import (
    AnyEvent,
    RunAdmitted,
    RunDispatched,
    RunFailed,
    RunNoResourcesAvailable,
    RunQueued,
)
from contracts.run import RunRecord
from contracts.scaling import (
    AnyScalingEvent,
    NodeReleased,
    NodeRequested,
    ReplicaState,
    StartupGaveUp,
)
from contracts.states import RunState
from runtime.control.autoscaler import (
    Demand,
    Deployed,
    Gpu,
    Memory,
    Node,
    Replica,
    Tuning,
    booting,
    plan,
    remember,
)
from runtime.control.providers import NodeProvider
from runtime.control.scheduler import Scheduler
from runtime.infra.scalinglog import ScalingLog

log = logging.getLogger("jetrun.scaler")

_WANTED = frozenset({RunAdmitted, RunQueued})  # kinds, tested by identity

_STATES = {
    PipelineStatus.loading: ReplicaState.loading,
    PipelineStatus.ready: ReplicaState.ready,
    PipelineStatus.failed: ReplicaState.failed,
    PipelineStatus.draining: ReplicaState.draining,
}


def tuning_of(scheduler: Scheduler, provider: NodeProvider | None) -> Tuning:
    s = scheduler.config.settings
    return Tuning(
        node_cooldown_s=s.node_cooldown_s,
        node_boot_timeout_s=s.node_boot_timeout_s,
        max_nodes=s.max_nodes if provider is not None else 0,
    )


class Scaler:
    def __init__(
        self,
        scheduler: Scheduler,
        provider: NodeProvider | None = None,
        *,
        tick_s: float | None = None,
        tuning: Tuning | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.clock = scheduler.clock
        self.provider = provider
        self.tick_s = tick_s if tick_s is not None else scheduler.config.settings.scale_tick_s
        self.tuning = tuning or tuning_of(scheduler, provider)
        self.scaling = ScalingLog(scheduler.log.js, replicas=scheduler.log.settings.replicas)
        self.memory = Memory()
        self._mine: set[str] = set()  # message ids this process appended and already folded
        self._wanted: dict[str, float] = {}  # pipeline -> when a run last arrived
        self._rejected: dict[str, float] = {}  # pipeline -> when a run was last turned away
        self._busy: dict[tuple[str, str], float] = {}  # (pipeline, agent) -> last run there
        self._seen: dict[tuple[str, str], float] = {}  # (pipeline, agent) -> first seen ready
        self._node_busy: dict[str, float] = {}  # agent -> last time it held a replica or run
        self._tg: TaskGroup | None = None
        self.decisions = 0
        scheduler.index.listen(self._observe)
        scheduler.booting = self.booting

    # --- lifecycle ---------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Replay the scaling log, then decide every ``tick_s`` until cancelled."""
        await self.scaling.require()
        provides = getattr(self.provider, "provides", None)
        if callable(provides):  # nodes it adds can serve only these
            self.tuning = dataclasses.replace(self.tuning, provides=await provides())
        target = await self.scaling.last_seq()
        caught_up = anyio.Event()

        async def on_event(seq: int, event: AnyScalingEvent) -> None:
            self._fold(event)
            if seq >= target:
                caught_up.set()

        if target == 0:
            caught_up.set()
        tail = await self.scaling.tail(self.scheduler.guard.wrap("scaling-log tail", on_event))
        try:
            with anyio.fail_after(120):
                await caught_up.wait()
            await self._forget_lost_nodes()
            async with anyio.create_task_group() as tg:
                self._tg = tg
                task_status.started()
                while True:
                    await self.step()
                    await self.clock.sleep(self.tick_s)
        finally:
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(Exception):  # the connection may be gone
                    await tail.unsubscribe()
                if self.provider is not None:
                    await self.provider.aclose()

    def _fold(self, event: AnyScalingEvent) -> None:
        message_id = event.message_id()
        if message_id in self._mine:
            self._mine.discard(message_id)  # folded when appended
            return
        self.memory = remember(self.memory, event)

    async def _forget_lost_nodes(self) -> None:
        """Nodes a previous local provider started died with it: release their requests
        instead of waiting out the boot timeout."""
        owns = getattr(self.provider, "procs", None)
        if owns is None:
            return
        heard = {b.agent_id for b in self.scheduler.fleet.live()}
        for node_id in list(self.memory.nodes):
            if node_id not in owns and node_id not in heard:
                reason = "started by a provider that is no longer running"
                await self._append(
                    NodeReleased(pipeline="", at=self.clock.now(), node_id=node_id, reason=reason)
                )

    # --- inputs ------------------------------------------------------------------------------

    def _observe(self, seq: int, event: AnyEvent, before: RunRecord | None, run: RunRecord) -> None:
        p, kind = run.pipeline, type(event)  # kinds by identity: ``isinstance`` walks bases
        if kind in _WANTED:
            self._wanted[p] = max(self._wanted.get(p, -math.inf), event.at)
        elif kind is RunNoResourcesAvailable:
            self._wanted[p] = max(self._wanted.get(p, -math.inf), event.at)
            self._rejected[p] = max(self._rejected.get(p, -math.inf), event.at)
        agent = run.agent_id or (before.agent_id if before is not None else None)
        if agent is not None and (kind is RunDispatched or run.is_terminal):
            self._busy[(p, agent)] = max(self._busy.get((p, agent), -math.inf), event.at)

    def booting(self) -> frozenset[str]:
        """The pipelines a node is being added for (their queued runs wait for a ``node``)."""
        if not self.memory.nodes:
            return frozenset()
        nodes, now = self.nodes(), self.clock.now()
        pipelines = {r.pipeline for r in self.memory.nodes.values()}
        return frozenset(
            p for p in pipelines if booting(self.memory, p, nodes, now, self.tuning) > 0
        )

    def deployed(self) -> dict[str, Deployed]:
        out: dict[str, Deployed] = {}
        for info in self.scheduler.catalog.entries():
            d = Deployed.of(info)
            if d is not None:
                out[info.pointer] = d
        return out

    def demand(self, pipelines: dict[str, Deployed]) -> dict[str, Demand]:
        index = self.scheduler.index
        running: Counter[str] = Counter()
        for runs in index.on_agent.values():
            for run_id in runs:
                record = index.records.get(run_id)
                if record is not None and record.state is RunState.running:
                    running[record.pipeline] += 1
        return {
            p: Demand(
                queued=index.queue_depth(p),
                running=running[p],
                wanted_at=self._wanted.get(p, -math.inf),
                rejected_at=self._rejected.get(p, -math.inf),
            )
            for p in pipelines
        }

    def nodes(self) -> list[Node]:
        return [self._node(beat) for beat in self.scheduler.fleet.live()]

    def _forget_gone_agents(self) -> None:
        """Idle clocks of agents no longer alive are dropped (bounded by the live fleet)."""
        live = {beat.agent_id for beat in self.scheduler.fleet.live()}
        for table in (self._busy, self._seen):
            for key in [k for k in table if k[1] not in live]:
                del table[key]
        for agent_id in [a for a in self._node_busy if a not in live]:
            del self._node_busy[agent_id]

    def _node(self, beat: AgentHeartbeat) -> Node:
        now = self.clock.now()
        per_pipeline: Counter[str] = Counter()
        for run_id in beat.running:
            record = self.scheduler.index.get(run_id)
            if record is not None:
                per_pipeline[record.pipeline] += 1
        replicas = []
        for p in beat.pipelines:
            key = (p.pointer, beat.agent_id)
            if p.status is PipelineStatus.ready:
                self._seen.setdefault(key, now)
            else:
                self._seen.pop(key, None)
            idle = max(self._busy.get(key, -math.inf), self._seen.get(key, now))
            state = _STATES.get(p.status, ReplicaState.loading)
            replicas.append(
                Replica(
                    p.pointer,
                    beat.agent_id,
                    state,
                    tuple(p.gpus),
                    per_pipeline[p.pointer],
                    idle,
                    p.error,
                )
            )
        if replicas or beat.running:
            self._node_busy[beat.agent_id] = now
        memory = [a.memory_mb for a in beat.accelerators if a.kind == "gpu" for _ in range(a.slots)]
        return Node(
            beat.agent_id,
            cpu_slots=beat.slots("cpu"),
            gpus=tuple(Gpu(i, mb) for i, mb in enumerate(memory)),
            can_serve=frozenset(beat.can_serve),
            replicas=tuple(replicas),
            running=len(beat.running),
            idle_since=self._node_busy.setdefault(beat.agent_id, now),
        )

    # --- one step ----------------------------------------------------------------------------

    async def step(self) -> list[AnyScalingEvent]:
        """One planning pass: decide, append, act. Returns the decisions."""
        if not self.scheduler.caught_up or not self.scheduler.nc.is_connected:
            return []
        await self._release_dead_nodes()
        self._forget_gone_agents()
        pipelines = self.deployed()
        decisions = plan(
            pipelines,
            self.demand(pipelines),
            self.nodes(),
            self.memory,
            self.clock.now(),
            self.tuning,
        )
        for event in decisions:
            if not await self._append(event):
                break
            await self._act(event)
        if decisions:
            self.scheduler.kick()
        return decisions

    async def _release_dead_nodes(self) -> None:
        """A node whose local agent process exited is released at once (not after the boot
        timeout), so another is asked for."""
        procs = getattr(self.provider, "procs", None) or {}
        for node_id, proc in list(procs.items()):
            if proc.returncode is not None and node_id in self.memory.nodes:
                reason = f"its agent exited with code {proc.returncode}"
                event = NodeReleased(
                    pipeline="", at=self.clock.now(), node_id=node_id, reason=reason
                )
                if await self._append(event):
                    await self._act(event)

    async def _append(self, event: AnyScalingEvent) -> bool:
        try:
            await self.scaling.append(event)
        except Exception as err:
            log.warning("could not record %s for %s: %r", event.kind, event.pipeline, err)
            return False
        self._mine.add(event.message_id())
        self.memory = remember(self.memory, event)
        self.decisions += 1
        log.info("scaling: %s", _describe(event))
        return True

    async def _act(self, event: AnyScalingEvent) -> None:
        if isinstance(event, NodeRequested) and self.provider is not None and self._tg:
            self._tg.start_soon(self._provide, "add", event.node_id, event.accelerator)
        elif isinstance(event, NodeReleased) and self.provider is not None and self._tg:
            self._tg.start_soon(self._provide, "remove", event.node_id, "")
        elif isinstance(event, StartupGaveUp):
            await self._fail_waiting(event)

    async def _provide(self, action: str, node_id: str, accelerator: str) -> None:
        assert self.provider is not None
        try:
            if action == "add":
                await self.provider.add(node_id, accelerator)
            else:
                await self.provider.remove(node_id)
        except Exception as err:  # the request times out and is made again
            log.warning("node provider could not %s %s: %r", action, node_id, err)

    async def _fail_waiting(self, gave_up: StartupGaveUp) -> None:
        message = (
            f"{gave_up.pipeline} failed to start {gave_up.failures} times; last error: "
            f"{gave_up.message}"
        )
        error = RunError(type=ErrorType.startup_error, message=message)
        for run_id in self.scheduler.index.queued(gave_up.pipeline):
            run = self.scheduler.index.records[run_id]
            event = RunFailed(run_id=run_id, at=self.clock.now(), attempt=run.attempt, error=error)
            try:
                await self.scheduler.log.append(event, callback=run.callback_url is not None)
            except Exception as err:
                log.warning("could not fail %s after startup gave up: %r", run_id, err)


def _describe(event: AnyScalingEvent) -> str:
    fields = " ".join(f"{n}={getattr(event, n)}" for n in event.__struct_fields__ if n != "at")
    return f"{event.kind} {fields}"
