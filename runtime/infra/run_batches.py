"""A run's events as a reader of that run alone sees them: its own subjects, and its entries of
the batches that dispatched or ended it (``dispatched_runs``, ``ended_runs``), which are on no
run's own subjects (``EventLog.load``, ``EventLog.history``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from contracts.events import RunsDispatched, RunsEnded, ended_by
from contracts.machine import evolve
from contracts.run import RunRecord
from runtime.infra.event_subjects import kind_subjects

if TYPE_CHECKING:
    from runtime.infra.eventlog import EventLog, Stored


async def with_batches(log: EventLog, run_id: str, own: list[Stored]) -> list[Stored]:
    """``own`` (the run's own events) with its entries of the batches stored after them,
    each as the run's own event, in log order. An end is taken only from the agent the
    run's current attempt went to (the state machine's rule 11), known from a dispatch or
    the agent's ``started``. The batches read are those since the run's last own event
    (few, unless the run has run long with no event of its own: what only a reader of one
    run pays); since its first if an end found there names an agent not known by then (its
    dispatch came in a batch before a later event of its own, a cancel request say)."""
    if not own:
        return own
    merged, skipped = await _merged(log, run_id, own, own[-1].seq + 1)
    if skipped and len(own) > 1:
        merged, _ = await _merged(log, run_id, own, own[0].seq + 1)
    return merged


async def _merged(
    log: EventLog, run_id: str, own: list[Stored], start: int
) -> tuple[list[Stored], bool]:
    """``own`` merged with the run's batch entries from ``start`` on; and whether an end of
    it was left out for naming an agent the run's attempt was not known to have gone to."""
    batches = [kind_subjects(RunsDispatched.kind), kind_subjects(RunsEnded.kind)]
    found = [
        s
        for s in await log.read_subject(batches, start)
        if s.event.one(run_id) is not None  # type: ignore[union-attr]
    ]
    merged: list[Stored] = []
    skipped = False
    run = RunRecord(id=run_id)
    for stored in sorted([*own, *found], key=lambda s: s.seq):
        event = stored.event
        if isinstance(event, RunsEnded) and not ended_by(run.agent_id, event):
            skipped = True
            continue
        if isinstance(event, RunsDispatched | RunsEnded):
            one = event.one(run_id)
            assert one is not None
            stored = type(stored)(stored.seq, one)
        run = evolve(run, stored.event, own_subjects=True)  # as ``fold`` reads a run
        merged.append(stored)
    return merged, skipped
