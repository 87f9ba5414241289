"""The scheduler: the one decider that places, queues, dispatches, cancels and preempts runs.

It tails the event log into a ``RunIndex``, hears agents' heartbeats into a ``Fleet``, and on
every change runs a decision pass that appends events. It keeps no state of its own that the log
cannot rebuild: after a crash it replays the log and carries on. Every decision is an event with a
deterministic message id (run, kind, attempt), so a decision made twice, by a restarted scheduler
or a second one, is recorded once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import anyio
import msgspec
from anyio.abc import TaskStatus
from nats.aio.client import Client
from nats.aio.msg import Msg

from contracts.agents import AgentHeartbeat, PipelineStatus, SchedulerHeartbeat
from contracts.events import (
    AdmissionSlot,
    AnyEvent,
    Event,
    RunAdmitted,
    RunCancelled,
    RunDispatched,
    RunNoResourcesAvailable,
    RunPreempted,
    RunQueued,
    RunRequeued,
    RunWaitChanged,
)
from contracts.run import RunRecord
from contracts.states import RunState, WaitingFor
from runtime.admission import Admission, stream_name
from runtime.catalog import Catalog
from runtime.clock import SYSTEM_CLOCK, Clock
from runtime.config import Config
from runtime.eventlog import EventLog, LogSettings, ensure_all
from runtime.fleet import (
    ATTEMPT_LOST,
    DRAIN_SUBJECT,
    HEARTBEAT_SUBJECT,
    NODE_LOST,
    NODE_RECALLED,
    Fleet,
    heartbeat_decoder,
)
from runtime.projection import RunIndex
from runtime.readiness import new_scheduler_id, publish_scheduler_heartbeats

log = logging.getLogger("jetrun.scheduler")


class SchedulerStats(msgspec.Struct, frozen=True, kw_only=True):
    caught_up: bool
    live_agents: int
    routing: int
    pending_decisions: int
    reserved_slots: int
    decisions: int
    lost_agents: int


class Scheduler:
    def __init__(
        self,
        nc: Client,
        config: Config,
        *,
        clock: Clock = SYSTEM_CLOCK,
        log_settings: LogSettings | None = None,
        tick_s: float = 0.25,
    ) -> None:
        self.nc = nc
        self.config = config
        self.clock = clock
        self.tick_s = tick_s
        settings = log_settings or LogSettings()
        self.log = EventLog(nc, settings)
        self.index = RunIndex()
        self.index.listen(self._observe)
        self.fleet = Fleet(clock.monotonic, config.settings.node_loss_timeout_s)
        self.catalog = Catalog(self.log.js, replicas=settings.replicas)
        self.admission = Admission.for_config(
            self.log.js, config, replicas=settings.replicas, lookup=self.index.get
        )
        self.caught_up = False
        # ordered by when runs entered the state (log order): placement keeps queues FIFO
        self._routing: dict[str, None] = {}
        self._created: dict[str, None] = {}
        self._announced: dict[str, WaitingFor] = {}  # pipeline -> what its queue waits for
        self._cancelling: dict[str, None] = {}
        self._ended: list[RunRecord] = []
        self._pending: dict[str, str] = {}  # run id -> kind of the decision in flight
        self._pending_since: dict[str, float] = {}
        self._reserved: dict[str, tuple[str, str]] = {}  # run id -> (agent id, slot kind)
        self._kick = anyio.Event()
        self._decisions = 0
        self._lost = 0
        self._cut_off = False
        self._running_since: dict[str, float] = {}  # run id -> when it last changed, running
        self._dispatched_at: dict[str, int] = {}  # run id -> log sequence of its dispatch
        self.scheduler_id = new_scheduler_id()
        self.started_at = clock.now()

    # --- lifecycle ---------------------------------------------------------------------------

    async def ensure(self) -> None:
        await ensure_all(self.log, self.catalog, self.admission)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Replay the log, then decide until cancelled. ``task_status.started()`` once caught
        up."""
        async with self.following(), anyio.create_task_group() as tg:
            tg.start_soon(self._decide_loop)
            tg.start_soon(self._tick_loop)
            every = self.config.settings.heartbeat_interval_s
            tg.start_soon(publish_scheduler_heartbeats, self.nc, self.heartbeat, every, self.clock)
            task_status.started()

    @contextlib.asynccontextmanager
    async def following(self) -> AsyncIterator[None]:
        """Inside: the index follows the log (caught up on entry) and heartbeats are heard;
        decisions are made only by calling ``decide()`` and ``tick()`` (what tests do)."""
        await self.ensure()
        target = await self.log.last_seq()
        heartbeats = await self.nc.subscribe(f"{HEARTBEAT_SUBJECT}.*", cb=self._on_heartbeat)
        drains = await self.nc.subscribe(DRAIN_SUBJECT, cb=self._on_drain)
        tail = await self.log.tail(self._on_event, skipped=self._on_skipped)
        try:
            await self.index.catch_up(target, timeout=self.config.settings.replay_deadline_s)
            self.caught_up = True
            self._ended.clear()  # permits of runs that ended before now: the sweep's job
            log.info("scheduler caught up at seq %d", target)
            yield
        finally:
            with anyio.CancelScope(shield=True):
                for sub in (heartbeats, drains, tail):
                    with contextlib.suppress(Exception):  # the connection may be gone
                        await sub.unsubscribe()

    def heartbeat(self) -> SchedulerHeartbeat:
        return SchedulerHeartbeat(
            scheduler_id=self.scheduler_id,
            at=self.clock.now(),
            started_at=self.started_at,
            seen_seq=self.index.last_seq,
        )

    def statistics(self) -> SchedulerStats:
        return SchedulerStats(
            caught_up=self.caught_up,
            live_agents=len(self.fleet.live()),
            routing=len(self._routing),
            pending_decisions=len(self._pending),
            reserved_slots=len(self._reserved),
            decisions=self._decisions,
            lost_agents=self._lost,
        )

    # --- inputs ------------------------------------------------------------------------------

    async def _on_event(self, seq: int, event: AnyEvent) -> None:
        self.index.apply(seq, event)

    async def _on_skipped(self, seq: int) -> None:
        self.index.skip(seq)

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            beat = heartbeat_decoder.decode(msg.data)
        except msgspec.MsgspecError:
            log.warning("undecodable heartbeat on %s", msg.subject)
            return
        known = self.fleet.get(beat.agent_id)
        self.fleet.observe(beat)
        if known is None or _capacity_changed(known, beat):
            self._kick.set()

    async def _on_drain(self, msg: Msg) -> None:
        """An agent got a preemption notice: its runs are preempted (or requeued) at once."""
        agent_id = msg.data.decode()
        handled = await self._handle_lost(agent_id, f"{NODE_RECALLED}: the node was recalled")
        if msg.reply:
            await self.nc.publish(msg.reply, str(handled).encode())

    def _observe(self, seq: int, event: AnyEvent, before: RunRecord | None, run: RunRecord) -> None:
        _toggle(self._routing, run.id, run.state is RunState.routing)
        _toggle(self._created, run.id, run.state is RunState.created)
        _toggle(self._cancelling, run.id, run.cancel_requested and not run.is_terminal)
        pending = self._pending.get(run.id)
        if pending is not None and (pending == event.kind or run.is_terminal):
            del self._pending[run.id]
        if isinstance(event, RunDispatched) or run.state is not RunState.queued:
            self._reserved.pop(run.id, None)
        if run.state is RunState.running:
            self._running_since[run.id] = self.clock.monotonic()
            if isinstance(event, RunDispatched):
                self._dispatched_at[run.id] = seq
        else:
            self._running_since.pop(run.id, None)
            self._dispatched_at.pop(run.id, None)
        newly_ended = run.is_terminal and (before is None or not before.is_terminal)
        if newly_ended and self.caught_up and run.slot is not None:
            self._ended.append(run)
        self._kick.set()

    # --- the decision pass -------------------------------------------------------------------

    async def _decide_loop(self) -> None:
        while True:
            await self._kick.wait()
            self._kick = anyio.Event()
            await self.decide()

    async def decide(self) -> None:
        """One pass: cancel, place, dispatch, give permits back."""
        for run_id in list(self._cancelling):
            run = self.index.get(run_id)
            if run is not None and run_id not in self._pending:
                await self._append(run_id, RunCancelled(run_id=run_id, at=self.clock.now()))
        for run_id in list(self._routing):
            if run_id not in self._pending:
                await self._place(run_id)
        for pipeline in self.index.pipelines_with_queue():
            await self._dispatch(pipeline)
        ended, self._ended = self._ended, []
        for run in ended:
            if run.slot is not None:
                await self.admission.release(run.slot)

    async def _append(self, run_id: str, event: Event) -> bool:
        self._pending[run_id] = event.kind
        self._pending_since[run_id] = self.clock.monotonic()
        try:
            await self.log.append(event)
        except Exception as err:
            log.warning("could not append %s for %s: %r", event.kind, run_id, err)
            self._pending.pop(run_id, None)
            self._reserved.pop(run_id, None)
            return False
        self._decisions += 1
        return True

    async def _place(self, run_id: str) -> None:
        run = self.index.get(run_id)
        if run is None or run.state is not RunState.routing:
            return
        now = self.clock.now()
        waiting = self._waits_for(run.pipeline)
        if waiting is WaitingFor.resources and not run.wait_for_resources:
            reason = f"no replica of {run.pipeline} is alive"
            event: Event = RunNoResourcesAvailable(
                run_id=run_id, at=now, attempt=run.attempt, reason=reason
            )
            await self._append(run_id, event)
            return
        await self._append(
            run_id, RunQueued(run_id=run_id, at=now, attempt=run.attempt, waiting_for=waiting)
        )

    def _waits_for(self, pipeline: str) -> WaitingFor:
        """What a queued run of ``pipeline`` waits for, as the fleet stands."""
        if self.fleet.serving(pipeline):
            return WaitingFor.capacity
        if self.fleet.serving(pipeline, PipelineStatus.loading):
            return WaitingFor.cold_start
        return WaitingFor.resources

    async def _announce_waits(self) -> None:
        """When what a pipeline's queue waits for changes (a replica came alive, started
        loading, or went away), say so on each of its queued runs. O(queue) only then."""
        for pipeline in self.index.pipelines_with_queue():
            waiting = self._waits_for(pipeline)
            if self._announced.get(pipeline) is waiting:
                continue
            now = self.clock.now()
            told = True
            for run_id in self.index.queued(pipeline):
                run = self.index.records[run_id]
                if run.waiting_for in (waiting, WaitingFor.cancellation):
                    continue
                if run_id not in self._pending:
                    event = RunWaitChanged(
                        run_id=run_id, at=now, attempt=run.attempt, waiting_for=waiting
                    )
                    told &= await self._append(run_id, event)
            if told:
                self._announced[pipeline] = waiting

    async def _dispatch(self, pipeline: str) -> None:
        info = await self.catalog.lookup(pipeline)
        kind = info.accelerator if info is not None else "cpu"
        agents = self.fleet.serving(pipeline)
        free = {a.agent_id: self._free(a, kind) for a in agents}
        budget = sum(max(n, 0) for n in free.values())
        if budget <= 0:
            return
        in_flight = sum(1 for r in self._pending if r in self._reserved)
        for run_id in self.index.queued(pipeline, limit=budget + in_flight):
            if run_id in self._pending:
                continue
            agent_id = max(free, key=lambda a: free[a])
            if free[agent_id] <= 0:
                return
            run = self.index.records[run_id]
            free[agent_id] -= 1
            self._reserved[run_id] = (agent_id, kind)
            event = RunDispatched(
                run_id=run_id,
                at=self.clock.now(),
                attempt=run.attempt,
                agent_id=agent_id,
                slot=kind,
            )
            await self._append(run_id, event)

    def _free(self, beat: AgentHeartbeat, kind: str) -> int:
        used = sum(1 for r in self.index.on_agent.get(beat.agent_id, ()) if self._kind(r) == kind)
        reserved = sum(1 for a, k in self._reserved.values() if a == beat.agent_id and k == kind)
        return beat.slots(kind) - used - reserved

    def _kind(self, run_id: str) -> str:
        info = self.catalog.cached(self.index.records[run_id].pipeline)
        return info.accelerator if info is not None else "cpu"

    # --- time-driven decisions ---------------------------------------------------------------

    async def _tick_loop(self) -> None:
        sweep_every = max(1, int(self.config.settings.release_grace_s / self.tick_s))
        ticks = 0
        while True:
            await self.tick()
            ticks += 1
            if ticks % sweep_every == 0:
                await self._sweep()
            await self.clock.sleep(self.tick_s)

    async def tick(self) -> None:
        """Detect lost agents and expired resource waits; forget decisions that were never seen
        in the log (deduplicated against an earlier copy), so they are made again."""
        if not self.nc.is_connected:
            self._cut_off = True  # agents cannot reach us either: no loss is decided now
            return
        if self._cut_off:
            self._cut_off = False
            self.fleet.refresh()  # every agent gets a full timeout after a reconnect
        stale = self.clock.monotonic() - 5.0
        for run_id, since in list(self._pending_since.items()):
            if since < stale or run_id not in self._pending:
                self._pending_since.pop(run_id, None)
                if since < stale:
                    self._pending.pop(run_id, None)
                    self._reserved.pop(run_id, None)
        for agent_id, runs in list(self.index.on_agent.items()):
            if runs:
                self.fleet.suspect(agent_id)
        await self._reconcile_attempts()
        lost = set(self.fleet.expired())
        lost.update(a for a, runs in self.index.on_agent.items() if runs and self.fleet.is_gone(a))
        for agent_id in lost:
            timeout = self.config.settings.node_loss_timeout_s
            await self._handle_lost(agent_id, f"{NODE_LOST}: no heartbeat for {timeout:g} s")
        await self._expire_resource_waits()
        await self._finish_admissions()
        await self._announce_waits()
        self._kick.set()

    async def _reconcile_attempts(self) -> None:
        """A live agent that no longer lists a run the log says it runs has lost that attempt
        (its dispatch or its result never got through): preempt or requeue it. An agent lists a
        run until its result is stored, and a result stored before this decision wins in the
        log, so a finished run is never touched."""
        grace = max(5.0, 3 * self.config.settings.heartbeat_interval_s)
        for beat in self.fleet.live():
            listed = set(beat.running)
            heard_at = self.fleet.heard_at(beat.agent_id)
            for run_id in list(self.index.on_agent.get(beat.agent_id, ())):
                run = self.index.records[run_id]
                # the agent has processed the dispatch (a delivery held up while its consumer
                # is recreated is no loss), and on this process's clock the beat came well
                # after the run last changed
                delivered = beat.seen_seq >= self._dispatched_at.get(run_id, 0)
                since = self._running_since.get(run_id, heard_at)
                if (
                    run_id not in listed
                    and delivered
                    and heard_at - since > grace
                    and run_id not in self._pending
                ):
                    reason = f"{ATTEMPT_LOST}: node {beat.agent_id} no longer runs it"
                    log.warning("run %s: %s", run_id, reason)
                    await self._append(run_id, await self._loss_event(run, beat.agent_id, reason))

    async def _handle_lost(self, agent_id: str, reason: str) -> int:
        """Preempt or requeue every run on ``agent_id``; forget the agent once all are
        recorded. Returns how many runs were handled."""
        handled = 0
        ok = True
        for run_id in list(self.index.on_agent.get(agent_id, ())):
            run = self.index.records[run_id]
            if run.state is not RunState.running:
                continue
            ok &= await self._append(run_id, await self._loss_event(run, agent_id, reason))
            handled += 1
        if ok:
            if not self.fleet.is_gone(agent_id):
                self._lost += 1
                log.info("agent %s lost (%s); %d runs handled", agent_id, reason, handled)
            self.fleet.forget(agent_id)
        return handled

    async def _loss_event(self, run: RunRecord, agent_id: str, reason: str) -> Event:
        info = await self.catalog.lookup(run.pipeline)
        retries = info.max_retries if info is not None else 0
        now = self.clock.now()
        if run.preemptions < retries:
            return RunRequeued(
                run_id=run.id, at=now, attempt=run.attempt, agent_id=agent_id, reason=reason
            )
        return RunPreempted(
            run_id=run.id, at=now, attempt=run.attempt, agent_id=agent_id, reason=reason
        )

    async def _finish_admissions(self) -> None:
        """A run still ``created`` after the grace lost its gateway between ``submitted`` and
        ``admitted``. Its permit was taken before ``submitted``: record the admission for it
        (the same event the gateway would have appended, so a late gateway changes nothing)."""
        now = self.clock.now()
        grace = self.config.settings.release_grace_s
        for run_id in list(self._created):
            run = self.index.records[run_id]
            if now - run.created_at < grace or run_id in self._pending:
                continue
            team = self.config.teams.get(run.team)
            tier = team.tier if team is not None else "unknown"
            limit = self.config.tiers.get(tier)
            slot = None
            if limit is not None:
                for seq, permit in await self.admission.holders(limit, run.team):
                    if permit.run_id == run_id:
                        slot = AdmissionSlot(stream=stream_name(limit), seq=seq)
            log.warning("run %s was never admitted by its gateway; admitting it", run_id)
            await self._append(run_id, RunAdmitted(run_id=run_id, at=now, tier=tier, slot=slot))

    async def _expire_resource_waits(self) -> None:
        timeout = self.config.settings.resource_wait_timeout_s
        now = self.clock.now()
        for pipeline in self.index.pipelines_with_queue():
            if self.fleet.serving(pipeline):
                continue
            for run_id in self.index.queued(pipeline):
                run = self.index.records[run_id]
                if now - run.created_at < timeout or run_id in self._pending:
                    continue
                reason = f"no replica of {pipeline} came alive within {timeout:g} s"
                await self._append(
                    run_id,
                    RunNoResourcesAvailable(
                        run_id=run_id, at=now, attempt=run.attempt, reason=reason
                    ),
                )

    async def _sweep(self) -> None:
        try:
            released = await self.admission.sweep(
                self.clock.now(), self.config.settings.release_grace_s
            )
        except Exception as err:
            log.warning("admission sweep failed: %r", err)
            return
        if released:
            log.info("gave back %d admission permits of ended or unrecorded runs", released)


def _toggle(items: dict[str, None], item: str, present: bool) -> None:
    """Keep ``item`` in (or out of) an insertion-ordered set."""
    if present:
        items.setdefault(item, None)
    else:
        items.pop(item, None)


def _capacity_changed(old: AgentHeartbeat, new: AgentHeartbeat) -> bool:
    return (
        old.pipelines != new.pipelines
        or old.accelerators != new.accelerators
        or old.draining != new.draining
    )


__all__ = ["Scheduler", "SchedulerStats"]
