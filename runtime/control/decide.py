"""The scheduler's decisions: pure functions from what the log, the fleet and the catalogue say,
and the time, to the events that should be appended.

Rules of this module:
1. No I/O, no clock, no NATS: the run index, a fleet snapshot, the catalogue and ``now`` come in
   as arguments; events (and what to do once they are stored) go out as a ``Decisions`` value.
2. One pass decides at most one event per run, from one consistent picture: nothing it reads
   changes while it decides.
3. Every event has a deterministic message id (run, kind, attempt), so a decision made twice, by
   a pass that ran before the log caught up or by a second scheduler, is stored once.
4. ``decide(..., timed=False)`` is what an event asks for (cancel, drains, place, dispatch);
   ``timed=True`` adds the checks that only time triggers (lost nodes and attempts, resource
   waits, unfinished admissions, wait reasons), which cost O(queued or running runs).
What a pass reads and returns (``Pass``, ``Decisions``, ``Worklist``) is in
``runtime.control.passes``.
"""

from __future__ import annotations

from collections.abc import Iterator

from contracts.agents import PipelineStatus
from contracts.errors import ErrorType, RunError
from contracts.events import (
    Event,
    QueueWaitChanged,
    RunAdmitted,
    RunCancelled,
    RunFailed,
    RunNoResourcesAvailable,
    RunPreempted,
    RunQueued,
    RunRequeued,
    queue_id,
)
from contracts.run import RunRecord
from contracts.states import RunState, WaitingFor
from runtime.control.passes import Decisions, Now, Pass, Runs, Worklist
from runtime.control.slots import INLINE_INPUTS_BYTES, Slots, dispatched
from runtime.infra.fleet import ATTEMPT_LOST, NODE_LOST, NODE_RECALLED, FleetView

# Codes that open the reason of a run that ended for want of a replica (its error message).
NO_RESOURCES = "no_resources_available"
STARTUP_ERROR = "startup_error"


def decide(p: Pass, *, timed: bool) -> Decisions:
    """One decision pass over ``p``: every event to append, at most one per run."""
    d = Decisions()
    cancel(p, d)
    lose_agents(p, d, timed=timed)
    if timed:
        lose_attempts(p, d)
        finish_admissions(p, d)
        expire_resource_waits(p, d)
        announce_waits(p, d)
    slots = Slots(p)
    dispatch(p, d, slots)
    place(p, d, slots)
    return d


# --- what events ask for -----------------------------------------------------------------


def cancel(p: Pass, d: Decisions) -> None:
    for run_id in p.work.cancelling:
        d.add(RunCancelled(run_id=run_id, at=p.now.wall))


def lose_agents(p: Pass, d: Decisions, *, timed: bool) -> None:
    """Agents that announced a drain (every pass) and, on a timed pass, agents silent past the
    loss timeout or already declared lost that still hold runs: their runs are requeued (with
    retries left) or preempted."""
    reasons = {a: f"{NODE_RECALLED}: the node was recalled" for a in p.fleet.draining()}
    if timed:
        silent = f"{NODE_LOST}: no heartbeat for {p.fleet.loss_timeout_s:g} s"
        for agent_id in p.fleet.expired():
            reasons.setdefault(agent_id, silent)
        for agent_id, runs in p.runs.on_agent.items():
            if runs and p.fleet.is_gone(agent_id):
                reasons.setdefault(agent_id, silent)
    for agent_id, reason in reasons.items():
        handled = []
        for run_id in sorted(p.runs.on_agent.get(agent_id, ())):
            run = p.run(run_id)
            if run.state is RunState.running and d.add(loss_event(p, run, agent_id, reason)):
                handled.append(run_id)
        d.lost[agent_id] = handled
        d.lost_reasons[agent_id] = reason


def loss_event(p: Pass, run: RunRecord, agent_id: str, reason: str) -> Event:
    """The attempt on ``agent_id`` is lost: requeue the run if it has retries left."""
    if run.preemptions < p.retries(run.pipeline):
        return RunRequeued(
            run_id=run.id, at=p.now.wall, attempt=run.attempt, agent_id=agent_id, reason=reason
        )
    return RunPreempted(
        run_id=run.id, at=p.now.wall, attempt=run.attempt, agent_id=agent_id, reason=reason
    )


def waits_for(fleet: FleetView, pipeline: str, booting: frozenset[str] = frozenset()) -> WaitingFor:
    """What a queued run of ``pipeline`` waits for, as the fleet (and the nodes being added,
    ``booting``) stand."""
    if fleet.serving(pipeline):
        return WaitingFor.capacity
    if fleet.serving(pipeline, PipelineStatus.loading):
        return WaitingFor.cold_start
    if pipeline in booting:
        return WaitingFor.node
    return WaitingFor.resources


def place(p: Pass, d: Decisions, slots: Slots) -> None:
    """Place every ``routing`` run, in admission order: straight to an agent when a ready
    replica has a free slot and no run of its pipeline still waits in the queue, else into the
    queue. A run that may not wait for resources ends ``no_resources_available`` at once unless
    a replica is ready (SPEC 3: one still loading does not count)."""
    waits: dict[str, WaitingFor] = {}
    queueing: set[str] = set()  # pipelines whose runs go to the queue from here on
    clear: set[str] = set()  # pipelines with no queued run left waiting
    for run_id in p.work.routing:
        if run_id in d.decided:
            continue
        run = p.run(run_id)
        if arrived_late(p, run):
            d.decided.add(run_id)
            d.permit_checks.append(run_id)
            continue
        waiting = waits.get(run.pipeline)
        if waiting is None:
            waiting = waits[run.pipeline] = waits_for(p.fleet, run.pipeline, p.booting)
        if waiting is not WaitingFor.capacity and not run.wait_for_resources:
            d.add(no_resources(p, run, "is ready"))
            continue
        if waiting is WaitingFor.capacity and run.pipeline not in queueing:
            if run.pipeline not in clear and queue_waits(p, d, run.pipeline):
                queueing.add(run.pipeline)
            elif slots.place(p, d, run):
                clear.add(run.pipeline)
                continue
            else:
                queueing.add(run.pipeline)
        d.add(RunQueued(run_id=run_id, at=p.now.wall, attempt=run.attempt, waiting_for=waiting))


def arrived_late(p: Pass, run: RunRecord) -> bool:
    """Whether ``run`` reached the log so long after its permit was taken that the sweep may
    have given the permit back meanwhile (a gateway that lost the log answered "outcome
    unknown", and its buffered append landed later): its permit is confirmed (the applier
    looks it up and marks it held, or fails the run ``not_admitted``) before it is placed."""
    if run.slot is None or run.id in p.work.permit_held:
        return False
    return p.now.wall - run.created_at > p.config.settings.release_grace_s / 2


def no_resources(p: Pass, run: RunRecord, what: str) -> RunNoResourcesAvailable:
    """The run ends for want of a replica; its reason (and error) says why, and says so when
    the pipeline's startup step raised on every agent that tried it."""
    loading = len(p.fleet.serving(run.pipeline, PipelineStatus.loading))
    failed = p.fleet.startup_errors(run.pipeline)
    error_type = ErrorType.unknown
    if failed and not loading:
        agent_id, error = sorted(failed.items())[0]
        error_type = ErrorType.startup_error
        reason = (
            f"{STARTUP_ERROR}: the startup step of {run.pipeline} raised on agent {agent_id}:"
            f" {error}"
        )
    else:
        reason = f"{NO_RESOURCES}: no replica of {run.pipeline} {what}"
        if loading:
            reason += f" ({loading} still starting up)"
    return RunNoResourcesAvailable(
        run_id=run.id, at=p.now.wall, attempt=run.attempt, reason=reason, error_type=error_type
    )


def dispatch(p: Pass, d: Decisions, slots: Slots) -> None:
    """Hand queued runs, head first, to live agents with the pipeline ready and a free slot of
    the kind it needs, the freest agent first. Slots taken in this pass count at once."""
    for pipeline in p.runs.pipelines_with_queue():
        budget = slots.free(pipeline)
        if budget <= 0:
            continue
        for run_id in p.runs.queued(pipeline, limit=budget + len(d.decided)):
            if not slots.place(p, d, p.run(run_id)) and run_id not in d.decided:
                break


def queue_waits(p: Pass, d: Decisions, pipeline: str) -> bool:
    """Whether a queued run of ``pipeline`` is still waiting after this pass's decisions."""
    ahead = p.runs.queued(pipeline, limit=len(d.decided) + 1)
    return any(run_id not in d.decided for run_id in ahead)


# --- what time asks for ------------------------------------------------------------------


def lose_attempts(p: Pass, d: Decisions) -> None:
    """A live agent that no longer lists a run the log says it runs has lost that attempt (its
    dispatch or its result never got through): requeue or preempt it. Only once the agent has
    processed the dispatch (a delivery held up while its consumer is recreated is no loss), and
    a heartbeat came well after the run last changed, on this process's clock. An agent lists a
    run until its result is stored, and a result stored first wins in the log."""
    grace = max(5.0, 3 * p.config.settings.heartbeat_interval_s)
    for beat in p.fleet.live():
        listed = set(beat.running)
        heard_at = p.fleet.heard_at(beat.agent_id)
        for run_id in sorted(p.runs.on_agent.get(beat.agent_id, ())):
            delivered = beat.seen_seq >= p.work.dispatched_at.get(run_id, 0)
            since = p.work.running_since.get(run_id, heard_at)
            if run_id not in listed and delivered and heard_at - since > grace:
                reason = f"{ATTEMPT_LOST}: node {beat.agent_id} no longer runs it"
                d.add(loss_event(p, p.run(run_id), beat.agent_id, reason))


def finish_admissions(p: Pass, d: Decisions) -> None:
    """A run still ``created`` after the grace was not recorded by a gateway of this release
    (a gateway's ``submitted`` carries its admission). Either an older gateway died between
    ``submitted`` and ``admitted`` (its permit was taken first: the applier looks it up and
    admits the run with it) or the ``submitted`` was published straight to the log, past
    admission: without a permit it fails ``not_admitted`` and never runs."""
    grace = p.config.settings.release_grace_s
    for run_id in p.work.created:
        run = p.run(run_id)
        if p.now.wall - run.created_at < grace or run_id in d.decided:
            continue
        team = p.config.teams.get(run.team)
        if team is None:
            d.add(not_admitted(run, p.now.wall, f"team {run.team!r} is not in the config"))
        elif p.config.tiers.get(team.tier) is None:
            d.add(not_admitted(run, p.now.wall, "no admission was recorded for it"))
        else:
            d.decided.add(run_id)
            d.admissions.append(RunAdmitted(run_id=run_id, at=p.now.wall, tier=team.tier))


def not_admitted(run: RunRecord, at: float, why: str) -> RunFailed:
    """The end of a run that never went through admission."""
    message = (
        f"not_admitted: run {run.id} was not admitted ({why}): runs are submitted over HTTP or with"
        " RunEvents.submit, which go through admission; a raw submitted event never runs"
    )
    error = RunError(type=ErrorType.unknown, message=message)
    return RunFailed(run_id=run.id, at=at, attempt=run.attempt, error=error)


def expire_resource_waits(p: Pass, d: Decisions) -> None:
    """A queued run that has waited for a replica to come alive (``resources_since``: from when
    it began waiting for one, not from when it was created) for the resource wait timeout ends
    ``no_resources_available``."""
    timeout = p.config.settings.resource_wait_timeout_s
    for pipeline, waits in p.work.resource_waits.items():
        if p.fleet.serving(pipeline):
            continue
        for since, run_id in waits:  # oldest wait first: stop at the first not yet due
            if p.now.wall - since < timeout:
                break
            d.add(no_resources(p, p.run(run_id), f"came alive within {timeout:g} s"))


def announce_waits(p: Pass, d: Decisions) -> None:
    """When what a pipeline's queue waits for changes (a replica came alive, started loading,
    or went away), say so once for the whole queue (``queue_waiting``: every run queued then
    takes it on, however long the queue). Looks at the queue only then, and only until the
    first run that waits for something else."""
    for pipeline in p.runs.pipelines_with_queue():
        waiting = waits_for(p.fleet, pipeline, p.booting)
        if p.work.announced.get(pipeline) is waiting:
            continue
        if next(_stale_waits(p, pipeline, waiting), None) is not None:
            d.add(
                QueueWaitChanged(
                    run_id=queue_id(pipeline),
                    at=p.now.wall,
                    pipeline=pipeline,
                    waiting_for=waiting,
                    follows=p.runs.queue_version(pipeline),
                )
            )
        d.announced[pipeline] = waiting


def _stale_waits(p: Pass, pipeline: str, waiting: WaitingFor) -> Iterator[str]:
    for run_id in p.runs.queued(pipeline):
        if p.run(run_id).waiting_for not in (waiting, WaitingFor.cancellation):
            yield run_id


__all__ = [
    "INLINE_INPUTS_BYTES",
    "Decisions",
    "Now",
    "Pass",
    "Runs",
    "Slots",
    "Worklist",
    "decide",
    "dispatched",
    "not_admitted",
    "waits_for",
]
