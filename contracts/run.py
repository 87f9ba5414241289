"""A run: the folded record every service keeps, and the public view the API returns."""

from __future__ import annotations

from typing import Any

import msgspec

from contracts.errors import RunError
from contracts.events import AdmissionSlot
from contracts.states import RunState, WaitingFor
from contracts.values import RunIO, to_python


class RunRecord(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the event log says about one run. Built only by ``contracts.machine``."""

    id: str
    state: RunState = RunState.unknown
    team: str = ""
    pipeline: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0
    inputs: list[RunIO] = msgspec.field(default_factory=list)
    outputs: list[RunIO] = msgspec.field(default_factory=list)
    error: RunError | None = None
    attempt: int = 0
    agent_id: str | None = None
    waiting_for: WaitingFor | None = None
    # when the run began waiting for a replica to come alive (``waiting_for`` resources or
    # cold_start), the event's time: the resource wait timeout counts from here
    resources_since: float | None = None
    async_run: bool = False
    wait_for_resources: bool = False
    idempotency_key: str | None = None
    tier: str | None = None
    slot: AdmissionSlot | None = None
    cancel_requested: bool = False
    preemptions: int = 0

    @property
    def is_terminal(self) -> bool:
        return self.state.is_terminal


def pipeline_id_of(pointer: str) -> str:
    """``user/pipeline:v1`` -> ``user/pipeline``: the pipeline, whatever its version tag."""
    return pointer.rsplit(":", 1)[0]


class Run(msgspec.Struct, frozen=True, kw_only=True):
    """The public run, as ``GET /v4/runs/{id}`` returns it."""

    id: str
    created_at: float
    updated_at: float
    pipeline_id: str
    pipeline: str
    state: RunState
    queue_position: int | None
    waiting_for: WaitingFor | None
    inputs: list[RunIO]
    outputs: list[RunIO]
    error: RunError | None
    attempt: int = 0

    @classmethod
    def of(cls, record: RunRecord, queue_position: int | None = None) -> Run:
        """The view of ``record``; ``queue_position`` is live and comes from a queue index."""
        return cls(
            id=record.id,
            created_at=record.created_at,
            updated_at=record.updated_at,
            pipeline_id=pipeline_id_of(record.pipeline),
            pipeline=record.pipeline,
            state=record.state,
            queue_position=queue_position if record.state is RunState.queued else None,
            waiting_for=record.waiting_for,
            inputs=record.inputs,
            outputs=record.outputs,
            error=record.error,
            attempt=record.attempt,
        )

    def outputs_formatted(self) -> list[Any]:
        """The outputs as Python values, as the seed SDK's ``Run.outputs_formatted()``."""
        return [to_python(o) for o in self.outputs]
