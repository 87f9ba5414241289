"""What node agents say about themselves: accelerators, slots and loaded pipelines."""

from __future__ import annotations

import enum

import msgspec

from contracts.scaling import ScalingSettings


class Accelerator(msgspec.Struct, frozen=True, kw_only=True):
    """A group of identical slots on a node: ``kind`` is ``cpu`` or ``gpu``.

    ``queue``: how many dispatches beyond ``slots`` the agent takes and holds, first come first
    served, until one of these slots is free (0, what an agent from before it says: none).
    Only CPU slots have one: the scheduler never uses a GPU group's."""

    kind: str
    model: str = ""
    memory_mb: int | None = None
    slots: int = 1
    queue: int = 0


class PipelineStatus(enum.StrEnum):
    loading = "loading"  # the startup step (cold start) is running
    ready = "ready"
    failed = "failed"  # the startup step raised; the agent will not serve it
    draining = "draining"  # being unloaded: finishes its runs, takes no new ones


class PipelineInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A pipeline as its agents register it in the catalogue."""

    pointer: str
    accelerator: str = "cpu"  # which slot kind its runs need
    timeout_s: float | None = None  # execution timeout of one attempt
    max_retries: int = 0  # automatic requeues after a node is lost or preempted
    gpus: int = 1  # accelerators of ``accelerator`` kind one replica needs (GPU pipelines)
    gpu_memory_mb: int = 0  # GPU memory one replica needs on each of its GPUs (0: unknown)
    # None: every agent that can serve it keeps a replica loaded (always on); settings: the
    # autoscaler decides where replicas load and unload
    scaling: ScalingSettings | None = None


class LoadedPipeline(msgspec.Struct, frozen=True, kw_only=True):
    pointer: str
    status: PipelineStatus
    accelerator: str = "cpu"  # which slot kind its runs need
    error: str | None = None
    gpus: list[int] = msgspec.field(default_factory=list)  # GPU indices it was loaded on


class AgentHeartbeat(msgspec.Struct, frozen=True, kw_only=True):
    """Published by every agent every heartbeat interval on ``jetrun.agents.heartbeat.<id>``.

    ``draining`` agents take no new work (a preemption notice is being honoured)."""

    agent_id: str
    at: float
    started_at: float
    accelerators: list[Accelerator]
    pipelines: list[LoadedPipeline]
    draining: bool = False
    running: list[str] = msgspec.field(default_factory=list)
    # the last event-log sequence the agent has processed: a run it does not list although
    # its dispatch is at or below this sequence is not running there
    seen_seq: int = 0
    # pointers this agent could load (code present, hardware fits), loaded or not
    can_serve: list[str] = msgspec.field(default_factory=list)
    # it takes ``dispatched_runs`` batches (a release before them skips one as an unknown
    # kind and never runs its runs: the scheduler sends such an agent each dispatch alone)
    batches: bool = False

    def slots(self, kind: str) -> int:
        return sum(a.slots for a in self.accelerators if a.kind == kind)

    def queue(self, kind: str) -> int:
        """Dispatches of ``kind`` the agent holds waiting for a slot, at most."""
        return sum(a.queue for a in self.accelerators if a.kind == kind)

    def ready(self, pointer: str) -> bool:
        return any(
            p.pointer == pointer and p.status is PipelineStatus.ready for p in self.pipelines
        )


class SchedulerHeartbeat(msgspec.Struct, frozen=True, kw_only=True):
    """Published by the scheduler every heartbeat interval on ``jetrun.scheduler.heartbeat``
    once it has caught up with the log: a run admitted now will be placed."""

    scheduler_id: str
    at: float
    started_at: float
    seen_seq: int = 0
    # it reads ``queued_runs`` and ``dispatched_runs`` (one of a release before them, were it to
    # lead, would read a batched dispatch's runs as routing and dispatch them again)
    batches: bool = False
