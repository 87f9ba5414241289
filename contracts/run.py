"""A run: the folded record every service keeps, and the public view the API returns."""

from __future__ import annotations

from typing import Any

import msgspec

from contracts.errors import RunError
from contracts.events import AdmissionSlot
from contracts.outputs import Outputs
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
    # shares storage with earlier versions of the record; encode with ``outputs.encode_hook``
    outputs: Outputs = msgspec.field(default_factory=Outputs)
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
    callback_url: str | None = None  # from ``submitted``: where webhooks POST the ended run

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
    def of(
        cls,
        record: RunRecord,
        queue_position: int | None = None,
        outputs: list[RunIO] | None = None,
    ) -> Run:
        """The view of ``record``; ``queue_position`` is live and comes from a queue index;
        ``outputs`` replaces the record's (the stream sends only new ones)."""
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
            outputs=Outputs.of(record.outputs).to_list() if outputs is None else outputs,
            error=record.error,
            attempt=record.attempt,
        )

    def outputs_formatted(self) -> list[Any]:
        """The outputs as Python values, as the seed SDK's ``Run.outputs_formatted()``."""
        return [to_python(o) for o in self.outputs]


class RunUpdate(Run, frozen=True, kw_only=True):
    """One line of ``POST /v4/runs/stream``: the run, with only the outputs that are new since
    the previous line; ``outputs_start`` is the index of the first of them in the run's
    outputs (a requeued run starts again at 0, with its next ``attempt``)."""

    outputs_start: int = 0

    @classmethod
    def of_update(cls, record: RunRecord, queue_position: int | None, start: int) -> RunUpdate:
        outputs = Outputs.of(record.outputs)[start:]
        view = Run.of(record, queue_position, outputs)
        return cls(**msgspec.structs.asdict(view), outputs_start=start)
