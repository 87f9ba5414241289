"""Run states and what a non-terminal run waits for.

The wire values are fixed by the public API: never rename one.
"""

from __future__ import annotations

import enum


class RunState(enum.StrEnum):
    created = "created"
    routing = "routing"
    queued = "queued"
    running = "running"
    completed = "completed"
    failed = "failed"
    no_resources_available = "no_resources_available"
    node_preempted = "node_preempted"
    cancelled = "cancelled"
    unknown = "unknown"

    # whether a run in this state has ended: a plain attribute of each member (set below),
    # read several times for every event every process applies (a property was a call each)
    is_terminal: bool


TERMINAL_STATES: frozenset[RunState] = frozenset(
    {
        RunState.completed,
        RunState.failed,
        RunState.no_resources_available,
        RunState.node_preempted,
        RunState.cancelled,
    }
)
for _state in RunState:
    _state.is_terminal = _state in TERMINAL_STATES
del _state


class WaitingFor(enum.StrEnum):
    """Why a non-terminal run has not moved on yet."""

    admission = "admission"  # created: the admission decision is pending
    placement = "placement"  # routing: admitted, the scheduler is placing it
    capacity = "capacity"  # queued: replicas are alive but every matching slot is busy
    cold_start = "cold_start"  # queued: a replica is loading the pipeline (startup step)
    resources = "resources"  # queued: no replica at all; waiting for one to come alive
    node = "node"  # queued: no replica; a node is being added (booting) to host one
    worker = "worker"  # running: dispatched, the node has not started the attempt yet
    execution = "execution"  # running: the pipeline is executing
    cancellation = "cancellation"  # cancel requested, not yet confirmed
