"""Prometheus metrics (``prometheus_client``) of every service.

What a process exposes on ``/metrics`` is an ``Exposition``: its services' collectors plus the
process-wide counters below. Gauges are read from the live read models (``RunIndex``, ``Fleet``)
when scraped; phase histograms are observed from event timestamps as events arrive, only once the
process has caught up with the log (a replay after a restart is not new work), and only by the
scheduler (one process) so a fleet of gateways does not count a run many times.

Labels are bounded: pipeline (the catalogue's pointers), team (the config's teams), state, slot
kind, route templates. Never run ids, agent ids or raw reasons.
"""

from __future__ import annotations

import math
import time
from collections import Counter as Tally
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, cast

import anyio
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from contracts.agents import AgentHeartbeat
from contracts.events import (
    AnyEvent,
    RunDispatched,
    RunPreempted,
    RunRequeued,
    RunStarted,
)
from contracts.run import RunRecord
from contracts.states import RunState
from runtime.infra.fleet import ATTEMPT_LOST, NODE_LOST, NODE_RECALLED, Fleet
from runtime.infra.projection import RunIndex

if TYPE_CHECKING:
    from runtime.infra.eventlog import EventLog

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PHASE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60, 600)
LOSS_REASONS = (NODE_LOST, NODE_RECALLED, ATTEMPT_LOST)

# --- process-wide: every NATS call that retries through outages ---
# (runtime.infra.jsretry.retrying)

PROCESS = CollectorRegistry(auto_describe=True)
LOG_RETRIES = Counter(
    "jetrun_log_retries",
    "NATS calls retried through an outage, by operation (append, admit, get, ensure, ...)",
    ["operation"],
    registry=PROCESS,
)
LOG_FAILURES = Counter(
    "jetrun_log_failures",
    "NATS calls that failed for good (outage past the deadline, or refused), by operation",
    ["operation"],
    registry=PROCESS,
)


def operation_of(what: str) -> str:
    """``"append jetrun.ev.run_1.queued"`` -> ``"append"``: a bounded label."""
    return what.split(" ", 1)[0][:32]


# States in which a run waits to be placed on a slot: routing (admitted), queued.
_WAITING_FOR_A_SLOT = frozenset({RunState.routing, RunState.queued})
_RUNNING = RunState.running


class Exposition:
    """One process's ``/metrics``: its collectors, refreshed (async) just before rendering."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_Chain(PROCESS))
        self._refreshers: list[Callable[[], Awaitable[None]]] = []

    def register(
        self, collector: Collector, refresh: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        self.registry.register(collector)
        if refresh is not None:
            self._refreshers.append(refresh)

    async def render(self) -> bytes:
        for refresh in self._refreshers:
            with anyio.move_on_after(1.0):
                await refresh()
        return generate_latest(self.registry)


class _Chain(Collector):
    def __init__(self, registry: CollectorRegistry) -> None:
        self.inner = registry

    def collect(self) -> Iterable[Metric]:
        return self.inner.collect()

    def describe(self) -> Iterable[Metric]:
        return []


def _reason_class(reason: str) -> str:
    prefix = reason.split(":", 1)[0]
    return prefix if prefix in LOSS_REASONS else "other"


class RunMetrics(Collector):
    """Runs by state and pipeline, queues, slot use by kind, index lag; phase histograms and
    attempt losses from the events as they arrive (``phases=True`` in the one scheduler; set
    before the first event: without it the dispatch and start times are not kept)."""

    def __init__(
        self,
        index: RunIndex,
        *,
        caught_up: Callable[[], bool],
        phases: bool,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.index = index
        self.caught_up = caught_up
        self.phases = phases
        self.wall = wall
        self.counts: Tally[tuple[RunState, str]] = Tally()  # (state, pipeline): runs
        self.queued_at: dict[str, float] = {}
        self.dispatched_at: dict[str, float] = {}
        self.started_at: dict[str, float] = {}
        self.slots: dict[str, tuple[str, str]] = {}  # running run -> (agent id, slot kind)
        self.log_last_seq: int | None = None
        self.phase = Histogram(
            "jetrun_run_phase_seconds",
            "Time runs spend in each phase, from event timestamps: queue_wait (admitted or "
            "requeued to dispatched), start (dispatched to started: worker, cold start "
            "included), "
            "execution (started, or dispatched for an attempt too short to report started, to "
            "the attempt's end)",
            ["phase", "pipeline"],
            buckets=PHASE_BUCKETS,
            registry=None,
        )
        self._phase_of: dict[tuple[str, str], Histogram] = {}
        self.lost = Counter(
            "jetrun_attempts_lost",
            "Attempts ended by a loss: node_lost, node_preempted (recalled), attempt_lost",
            ["reason"],
            registry=None,
        )
        index.listen(self._on_change)

    def _on_change(
        self, seq: int, event: AnyEvent, before: RunRecord | None, after: RunRecord
    ) -> None:
        # what most events change first (a dispatch, a start), then only a change of state
        # (a start, an output or a cancel request keeps it) touches the counts and the waits;
        # kinds tested by identity (``isinstance`` walks the class's bases); the times only
        # the phase histograms read are kept only with them (not in a gateway process)
        kind = type(event)
        if kind is RunDispatched:
            sent = cast(RunDispatched, event)
            self.slots[after.id] = (sent.agent_id, sent.slot)
            queued = self.queued_at.pop(after.id, None)
            if self.phases:
                self._observe("queue_wait", after, queued, event.at)
                self.dispatched_at[after.id] = event.at
        elif kind is RunStarted:
            if self.phases:
                self._observe("start", after, self.dispatched_at.pop(after.id, None), event.at)
                self.started_at[after.id] = event.at
        elif (kind is RunPreempted or kind is RunRequeued) and self.caught_up():
            self.lost.labels(_reason_class(event.reason)).inc()  # type: ignore[union-attr]
        state = after.state
        if before is None:
            state_before = None
        else:
            state_before = before.state
            if state_before is state:
                return
            if before.pipeline:
                self.counts[(state_before, before.pipeline)] -= 1
        self.counts[(state, after.pipeline)] += 1
        if state in _WAITING_FOR_A_SLOT and state_before not in _WAITING_FOR_A_SLOT:
            self.queued_at[after.id] = event.at  # admitted or requeued: placement may begin
        if state_before is _RUNNING:  # the attempt's end (only a running run has one)
            self.slots.pop(after.id, None)
            if self.phases:
                dispatched = self.dispatched_at.pop(after.id, None)
                started = self.started_at.pop(after.id, None)
                # an attempt that ends within the agent's STARTED_AFTER_S appends no
                # ``started``: its execution counts from the dispatch
                since = started if started is not None else dispatched
                self._observe("execution", after, since, event.at)
        if state.is_terminal:
            self.queued_at.pop(after.id, None)

    def _observe(self, phase: str, run: RunRecord, since: float | None, at: float) -> None:
        if since is not None and self.phases and self.caught_up():
            key = (phase, run.pipeline)
            child = self._phase_of.get(key)
            if child is None:  # labels() takes a lock and checks its values each call
                child = self._phase_of[key] = self.phase.labels(phase, run.pipeline)
            child.observe(max(0.0, at - since))

    def used_slots(self, live_agents: set[str]) -> Tally[tuple[str, str]]:
        """Per (agent, slot kind): its runs dispatched there (running, or waiting in its
        queue for a slot)."""
        return Tally(where for where in self.slots.values() if where[0] in live_agents)

    async def refresh_lag(self, log: EventLog) -> None:
        try:
            self.log_last_seq = await log.last_seq()
        except Exception:
            self.log_last_seq = None

    def collect(self) -> Iterable[Metric]:
        runs = GaugeMetricFamily(
            "jetrun_runs",
            "Runs in the event log, by state and pipeline",
            labels=["state", "pipeline"],
        )
        for (state, pipeline), n in sorted(self.counts.items()):
            if n:
                runs.add_metric([state.value, pipeline], n)
        depth = GaugeMetricFamily("jetrun_queue_depth", "Queued runs", labels=["pipeline"])
        oldest = GaugeMetricFamily(
            "jetrun_queue_oldest_wait_seconds",
            "How long the head of the queue has been queued",
            labels=["pipeline"],
        )
        now = self.wall()
        # every pipeline with runs, so a drained queue reads 0 rather than vanishing
        known = {pipeline for _, pipeline in self.counts} | set(self.index.pipelines_with_queue())
        for pipeline in sorted(p for p in known if p):
            depth.add_metric([pipeline], self.index.queue_depth(pipeline))
            head = self.index.queued(pipeline, limit=1)
            since = self.queued_at.get(head[0]) if head else None
            if since is not None:
                oldest.add_metric([pipeline], max(0.0, now - since))
        applied = GaugeMetricFamily(
            "jetrun_index_last_seq", "Last event-log sequence this process has applied"
        )
        applied.add_metric([], self.index.last_seq)
        lag = GaugeMetricFamily(
            "jetrun_index_lag_events",
            "Events stored in the log that this process has not applied yet (NaN: log unknown)",
        )
        behind = math.nan if self.log_last_seq is None else self.log_last_seq - self.index.last_seq
        lag.add_metric([], max(0.0, behind) if behind == behind else behind)
        yield from (runs, depth, oldest, applied, lag)
        yield from self.phase.collect()
        yield from self.lost.collect()


class FleetMetrics(Collector):
    """Live agents, replicas per pipeline and status, slots free/used by kind."""

    def __init__(self, fleet: Fleet, runs: RunMetrics) -> None:
        self.fleet, self.runs = fleet, runs

    def collect(self) -> Iterable[Metric]:
        live = self.fleet.live()
        agents = GaugeMetricFamily("jetrun_agents", "Live agents (not draining)")
        agents.add_metric([], len(live))
        replicas = GaugeMetricFamily(
            "jetrun_replicas", "Pipeline replicas on live agents", labels=["pipeline", "status"]
        )
        counts: Tally[tuple[str, str]] = Tally()
        for beat in live:
            for p in beat.pipelines:
                counts[(p.pointer, p.status.value)] += 1
        for (pipeline, status), n in sorted(counts.items()):
            replicas.add_metric([pipeline, status], n)
        yield from (agents, replicas, self._slots(live))

    def _slots(self, live: list[AgentHeartbeat]) -> Metric:
        """Per kind: slots running an attempt, free slots, and runs waiting in agents' queues
        for a slot (dispatched beyond an agent's slots)."""
        dispatched = self.runs.used_slots({b.agent_id for b in live})
        states: dict[str, Tally[str]] = {"used": Tally(), "free": Tally(), "waiting": Tally()}
        for beat in live:
            for kind in {a.kind for a in beat.accelerators}:
                slots, n = beat.slots(kind), dispatched[beat.agent_id, kind]
                states["used"][kind] += min(n, slots)
                states["free"][kind] += max(slots - n, 0)
                states["waiting"][kind] += max(n - slots, 0)
        family = GaugeMetricFamily(
            "jetrun_slots",
            "Slots of live agents, by kind, free or used; waiting: runs dispatched beyond an "
            "agent's slots, waiting in its queue for one",
            labels=["kind", "state"],
        )
        for kind in sorted(set(states["used"]) | set(states["free"])):
            for state in ("used", "free", "waiting"):
                family.add_metric([kind, state], states[state][kind])
        return family


class NodeLosses(Collector):
    """Agents the scheduler declared lost (or recalled) since it started."""

    def __init__(self, lost: Callable[[], int]) -> None:
        self.lost = lost

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            "jetrun_nodes_lost", "Agents declared lost or recalled by this scheduler"
        )
        family.add_metric([], self.lost())
        yield family


def http_histogram() -> Histogram:
    return Histogram(
        "jetrun_http_request_duration_seconds",
        "HTTP requests by route template, method and status",
        ["route", "method", "status"],
        buckets=HTTP_BUCKETS,
        registry=None,
    )


def refusals_counter() -> Counter:
    return Counter(
        "jetrun_admission_refusals",
        "Runs refused at admission (429 concurrency_limit), by team",
        ["team"],
        registry=None,
    )


def cold_start_histogram() -> Histogram:
    return Histogram(
        "jetrun_agent_cold_start_seconds",
        "Worker start-ups on this agent (the pipeline's startup step), failed ones included",
        ["pipeline"],
        buckets=PHASE_BUCKETS,
        registry=None,
    )
