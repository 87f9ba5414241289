"""The dashboard: ``GET /dashboard`` (a static page, no external assets) polls
``GET /v4/dashboard`` with the team's token, or an admin token (``[admin] tokens`` in the config)
for every team's runs.

``snapshot`` is a pure read of the gateway's read models: the index (runs, queue positions),
the listing (unfinished and recent runs per team), the fleet (agents, GPUs, slots), the run
metrics (when each queue's head was queued, which slot each running run holds) and the latest
scaling events the gateway has followed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from importlib.resources import files

from contracts.dashboard import AgentView, Dashboard, FailedRun, LiveRun, QueueView
from contracts.run import RunRecord
from contracts.scaling import AnyScalingEvent
from contracts.states import RunState
from runtime.control.listing import ListQuery, RunListing
from runtime.infra.fleet import Fleet
from runtime.infra.metrics import RunMetrics
from runtime.infra.projection import RunIndex

PAGE_HTML = (files("runtime") / "static" / "dashboard.html").read_text()
FAILED = frozenset({RunState.failed, RunState.node_preempted, RunState.no_resources_available})
MAX_LIVE = 500
MAX_FAILURES = 20
FAILURE_SCAN = 2_000  # failures among each team's latest runs: a poll stays cheap


def snapshot(
    *,
    team: str | None,
    teams: list[str],
    index: RunIndex,
    listing: RunListing,
    fleet: Fleet,
    runs: RunMetrics,
    now: float,
    logs_url: str | None,
    scaling: list[AnyScalingEvent],
) -> Dashboard:
    """What ``team`` sees (``None``: every team in ``teams``, the admin view)."""
    live = listing.active(team)[:MAX_LIVE] if team else _all_active(listing, teams)
    # a team sees the queues and replicas of its own pipelines and of those it has runs in
    visible = None if team is None else {r.pipeline for r in live}
    return Dashboard(
        team=team,
        now=now,
        runs=[_live(r, index) for r in live],
        queues=_queues(index, fleet, runs, now, _filter(team, visible)),
        agents=_agents(fleet, runs, _filter(team, visible)),
        failures=_failures(listing, [team] if team else teams, logs_url),
        scaling=scaling,
    )


def _all_active(listing: RunListing, teams: list[str]) -> list[RunRecord]:
    found = [r for t in teams for r in listing.active(t)]
    found.sort(key=lambda r: r.created_at)
    return found[:MAX_LIVE]


def _live(run: RunRecord, index: RunIndex) -> LiveRun:
    return LiveRun(
        id=run.id,
        team=run.team,
        pipeline=run.pipeline,
        state=run.state,
        queue_position=index.queue_position(run.id),
        waiting_for=run.waiting_for,
        attempt=run.attempt,
        created_at=run.created_at,
        updated_at=run.updated_at,
    )


def _filter(team: str | None, used: set[str] | None) -> Callable[[str], bool]:
    if team is None or used is None:
        return lambda pipeline: True
    return lambda pipeline: pipeline in used or pipeline.split("/", 1)[0] == team


def _queues(
    index: RunIndex, fleet: Fleet, runs: RunMetrics, now: float, shown: Callable[[str], bool]
) -> list[QueueView]:
    replicas: dict[str, Counter[str]] = {}
    for beat in fleet.live():
        for p in beat.pipelines:
            replicas.setdefault(p.pointer, Counter())[p.status.value] += 1
    pipelines = sorted(p for p in set(replicas) | set(index.pipelines_with_queue()) if shown(p))
    views = []
    for pipeline in pipelines:
        head = index.queued(pipeline, limit=1)
        since = runs.queued_at.get(head[0]) if head else None
        views.append(
            QueueView(
                pipeline=pipeline,
                depth=index.queue_depth(pipeline),
                oldest_wait_s=None if since is None else max(0.0, now - since),
                replicas=dict(replicas.get(pipeline, {})),
            )
        )
    return views


def _agents(fleet: Fleet, runs: RunMetrics, shown: Callable[[str], bool]) -> list[AgentView]:
    used: dict[str, Counter[str]] = {}
    for agent_id, kind in runs.slots.values():
        used.setdefault(agent_id, Counter())[kind] += 1
    return [
        AgentView(
            agent_id=beat.agent_id,
            accelerators=beat.accelerators,
            used_slots=dict(used.get(beat.agent_id, {})),
            pipelines={p.pointer: p.status.value for p in beat.pipelines if shown(p.pointer)},
            draining=beat.draining,
        )
        for beat in sorted(fleet.live(), key=lambda b: b.agent_id)
    ]


def _failures(listing: RunListing, teams: list[str], logs_url: str | None) -> list[FailedRun]:
    found: list[RunRecord] = []
    for team in teams:
        query = ListQuery(states=FAILED, limit=MAX_FAILURES)
        page, _ = listing.page_held(team, query, max_scan=FAILURE_SCAN)
        found.extend(page)
    found.sort(key=lambda r: r.updated_at, reverse=True)
    return [
        FailedRun(
            id=r.id,
            team=r.team,
            pipeline=r.pipeline,
            state=r.state,
            error=r.error,
            ended_at=r.updated_at,
            logs_url=logs_url.format(run_id=r.id) if logs_url else None,
        )
        for r in found[:MAX_FAILURES]
    ]
