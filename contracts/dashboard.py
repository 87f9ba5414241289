"""``GET /v4/dashboard``: what the dashboard page shows, for one team or (admin) for all."""

from __future__ import annotations

import msgspec

from contracts.agents import Accelerator
from contracts.errors import RunError
from contracts.scaling import AnyScalingEvent
from contracts.states import RunState, WaitingFor


class LiveRun(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    team: str
    pipeline: str
    state: RunState
    queue_position: int | None
    waiting_for: WaitingFor | None
    attempt: int
    created_at: float
    updated_at: float


class QueueView(msgspec.Struct, frozen=True, kw_only=True):
    pipeline: str
    depth: int
    oldest_wait_s: float | None  # how long the head of the queue has waited
    replicas: dict[str, int]  # status -> live replicas (ready, loading, failed)


class AgentView(msgspec.Struct, frozen=True, kw_only=True):
    agent_id: str
    accelerators: list[Accelerator]  # GPUs (model, memory) and CPU slots
    # slot kind -> runs dispatched there: running, or (past its slots) waiting in its queue
    used_slots: dict[str, int]
    pipelines: dict[str, str]  # pointer -> status
    draining: bool


class FailedRun(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    team: str
    pipeline: str
    state: RunState
    error: RunError | None
    ended_at: float
    logs_url: str | None  # the run's logs, where this gateway serves them


class Dashboard(msgspec.Struct, frozen=True, kw_only=True):
    """``team`` is None in the admin view (every team's runs)."""

    team: str | None
    now: float
    runs: list[LiveRun]
    queues: list[QueueView]
    agents: list[AgentView]
    failures: list[FailedRun]
    scaling: list[AnyScalingEvent] = msgspec.field(default_factory=list)  # newest first
