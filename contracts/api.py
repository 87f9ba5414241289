"""Bodies of the v4 HTTP API that are not runs themselves."""

from __future__ import annotations

from typing import Any

import msgspec

from contracts.run import Run
from contracts.scaling import AnyScalingEvent, ReplicaView, ScalingSettings
from contracts.values import RunIO


class RunCreate(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``POST /v4/runs``. ``wait_for_resources=None`` means: false for sync, true for async."""

    pipeline: str
    inputs: list[RunIO] = msgspec.field(default_factory=list)
    async_run: bool = False
    wait_for_resources: bool | None = None

    def waits_for_resources(self) -> bool:
        if self.wait_for_resources is None:
            return self.async_run
        return self.wait_for_resources


class ErrorDetail(msgspec.Struct, frozen=True, kw_only=True):
    code: str
    message: str
    field: str | None = None


class ConcurrencyLimitDetail(msgspec.Struct, frozen=True, kw_only=True):
    code: str = "concurrency_limit"
    tier: str
    limit: int
    active: int
    message: str = ""


class ErrorBody(msgspec.Struct, frozen=True, kw_only=True):
    detail: ErrorDetail | ConcurrencyLimitDetail | Any


class Scaling(msgspec.Struct, frozen=True, kw_only=True):
    """``GET /v4/pipelines/{pointer}/scaling``."""

    current_replicas: int
    desired_replicas: int
    current_pipeline_states: dict[str, int]
    pipeline: str = ""
    pipeline_id: str = ""
    autoscaled: bool = False  # False: always on (every agent that can serve it loads it)
    settings: ScalingSettings | None = None
    replicas: list[ReplicaView] = msgspec.field(default_factory=list)


class Health(msgspec.Struct, frozen=True, kw_only=True):
    status: str
    checks: dict[str, bool] = msgspec.field(default_factory=dict)


class RunList(msgspec.Struct, frozen=True, kw_only=True):
    """``GET /v4/runs``: the team's runs, newest first; ``next_cursor`` fetches the next page
    (``None`` on the last one)."""

    runs: list[Run]
    next_cursor: str | None = None


class ScalingHistory(msgspec.Struct, frozen=True, kw_only=True):
    """``GET /v4/pipelines/{pointer}/scaling/history``: its scaling events, oldest first."""

    pipeline: str
    events: list[AnyScalingEvent]
