"""The scheduler: the one decider that places, queues, dispatches, cancels and preempts runs.

Several may run: the one that holds the scheduler lease (``runtime.infra.lease``) decides,
the others follow the log as hot standbys and take over within a few seconds of its death. The
leader fences the log first (``runtime.infra.fence``): from then on the server refuses every
decision of a scheduler that led before, and one that finds itself fenced out stands by.

It tails the event log into a ``RunIndex``, hears agents' heartbeats and drain requests into a
``Fleet``, and runs decision passes (``runtime.control.decide``, pure) in one task that
applies them: on every change that may ask for a decision (not a dispatch, start or output,
nor an end that frees a slot no run waits for) a pass over what events ask for, every tick
one that adds what time asks for. It appends a pass's events together
(``runtime.control.applier``), waits until its own index has them, and only then decides
again, so no two passes ever work from the same picture. It keeps no state of its own that
the log cannot rebuild: after a crash it replays the log and carries on. Every decision is an
event with a deterministic message id (run, kind, attempt), so a decision made twice, by a
restarted scheduler or a second one, is recorded once.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from functools import partial

import anyio
import msgspec
from anyio.abc import TaskStatus
from nats.aio.client import Client
from nats.aio.msg import Msg

from contracts.agents import AgentHeartbeat, PipelineInfo, SchedulerHeartbeat
from contracts.events import (
    AnyEvent,
    QueueWaitChanged,
    RunDispatched,
    RunOutputProduced,
    RunStarted,
)
from contracts.run import RunRecord
from runtime.control.admission import Admission
from runtime.control.applier import CATCH_UP_S, Applier, patiently
from runtime.control.decide import decide
from runtime.control.logfeed import LogFeed
from runtime.control.passes import Now, Pass, Worklist
from runtime.control.readiness import new_scheduler_id, publish_scheduler_heartbeats
from runtime.control.restate import Restater
from runtime.control.views import RunViews, ViewKeeper, forget_loop
from runtime.infra.catalog import Catalog
from runtime.infra.clock import SYSTEM_CLOCK, Clock
from runtime.infra.config import Config
from runtime.infra.eventlog import EventLog, LogSettings
from runtime.infra.fence import Fence, Fenced
from runtime.infra.fleet import (
    DRAIN_SUBJECT,
    HEARTBEAT_SUBJECT,
    Fleet,
    agent_of_drain,
    decode_heartbeat,
)
from runtime.infra.guard import Guard
from runtime.infra.jsretry import RETRYABLE
from runtime.infra.lease import Lease
from runtime.infra.peers import PeerSchedulers
from runtime.infra.projection import RunIndex
from runtime.infra.streamsetup import ensure_all, require_all

log = logging.getLogger("jetrun.scheduler")

# Events that move a run along on its agent: they neither ask for a decision nor free a slot,
# so they wake no pass (a sync run's dispatch woke one that found nothing to do, at the moment
# its agent needed the CPU). A run's end wakes one only if it asks for one (``_end_asks``);
# every other change of a run wakes the deciding task.
NO_DECISION = frozenset({RunDispatched, RunStarted, RunOutputProduced})  # kinds, by identity


class SchedulerStats(msgspec.Struct, frozen=True, kw_only=True):
    caught_up: bool
    live_agents: int
    routing: int
    pending_decisions: int  # events of the pass being applied
    decisions: int
    lost_agents: int
    passes: int = 0


class Scheduler(Applier):
    def __init__(
        self,
        nc: Client,
        config: Config,
        *,
        clock: Clock = SYSTEM_CLOCK,
        log_settings: LogSettings | None = None,
        tick_s: float = 0.25,
        feed: LogFeed | None = None,
        index: RunIndex | None = None,
        keeps: bool = True,
    ) -> None:
        """``feed``: a log tail shared with other readers in this process (``jetrun up``);
        by default the scheduler has its own. ``index``: a run index shared with a gateway in
        this process (each event applied once; the gateway then leaves forgetting ended runs
        to this scheduler, which forgets them once their views are stored and listed).
        ``keeps`` False: a recorder beside it (``runtime.control.recorder``) stores the views,
        the run history and the checkpoint; this scheduler writes none of them and forgets
        ended runs ``keep_ended_s`` after they ended, as a gateway does."""
        self.nc = nc
        self.config = config
        self.clock = clock
        self.tick_s = tick_s
        settings = log_settings or LogSettings()
        self.log = EventLog(nc, settings)
        self.index = index if index is not None else RunIndex()
        self.index.listen(self._observe)
        self.index.listen_queue(self._observe_queue)
        self.views = RunViews(self.log.js, replicas=settings.replicas)
        self.keeper = ViewKeeper(self.views, self.index, config.settings) if keeps else None
        self.restater = Restater(self.log, self.index)  # live runs outlive their events
        self.work = Worklist()
        self.fleet = Fleet(clock.monotonic, config.settings.node_loss_timeout_s)
        self.catalog = Catalog(self.log.js, replicas=settings.replicas, monotonic=clock.monotonic)
        self.admission = Admission.for_config(
            self.log.js, config, replicas=settings.replicas, lookup=self.index.get
        )
        self.caught_up = False
        self._ended: list[RunRecord] = []  # runs that ended since the last pass: permits back
        self._drain_replies: dict[str, list[str]] = {}  # agent -> reply subjects waiting
        self._kick = anyio.Event()
        self._timed = False
        self._applying = 0
        self._unsure = False  # a dispatch's append failed: the next pass reads the log's end
        self._decisions = 0
        self._passes = 0
        self._lost = 0
        self._cut_off = False
        self.scheduler_id = new_scheduler_id()
        # one of a release before batches, heard: dispatch each run alone (``Applier``)
        self.peers = PeerSchedulers(
            self.scheduler_id, clock.monotonic, config.settings.node_loss_timeout_s
        )
        # the lease is about real time (the server expires it), never an injected clock
        self.lease = Lease(
            self.log.js, self.scheduler_id, monotonic=time.monotonic, replicas=settings.replicas
        )
        self._leading = False  # run() decides only under the lease; tests call decide() directly
        self.fence = Fence(self.log, self.scheduler_id)  # unfenced until it leads
        self.fenced = False
        self.guard = Guard("scheduler")
        self.started_at = clock.now()
        # the pipelines a node is being added for (the scaler beside it sets this)
        self.booting: Callable[[], frozenset[str]] = frozenset
        self.feed = feed or LogFeed(self.log, self.views)
        self.feed.confirm_appends(self.log)  # its tail shows what it appends
        self.feed.join_guarded(self.index, self.guard)

    # --- lifecycle ---------------------------------------------------------------------------

    async def ensure(self) -> None:
        await ensure_all(self.log, self.catalog, self.admission, self.lease, self.views)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Replay the log, then decide until cancelled. ``task_status.started()`` once caught
        up."""
        async with self.following(), anyio.create_task_group() as tg:
            tg.start_soon(self.guard.watch)
            tg.start_soon(self._lead)
            if self.keeper is not None:
                tg.start_soon(self.keeper.run, self.clock, lambda: self._leading)
            else:  # the recorder stores them: ended runs are only forgotten here
                tg.start_soon(
                    forget_loop, self.index, self.clock, self.config.settings.keep_ended_s
                )
            tg.start_soon(self.restater.run, self.clock, lambda: self._leading)
            every = self.config.settings.heartbeat_interval_s
            tg.start_soon(publish_scheduler_heartbeats, self.nc, self.heartbeat, every, self.clock)
            task_status.started()

    @contextlib.asynccontextmanager
    async def following(self) -> AsyncIterator[None]:
        """Inside: the index follows the log (caught up on entry), the catalogue follows its
        stream (a pipeline registered again with new settings is seen at once), and heartbeats
        and drain requests are heard; decisions are made only by calling ``decide()`` and ``tick()``
        (what tests do)."""
        await require_all(self.log, self.catalog, self.admission, self.lease, self.views)
        position = await self.feed.start()
        guard = self.guard.wrap
        heartbeats = await self.nc.subscribe(
            f"{HEARTBEAT_SUBJECT}.*", cb=guard("agent heartbeat handler", self._on_heartbeat)
        )
        # a failed drain answer leaves nothing diverged: the agent is then lost by timeout
        drain = guard("drain handler", self._on_drain, fatal=False)
        drains = await self.nc.subscribe(f"{DRAIN_SUBJECT}.*", cb=drain)
        peers = await self.peers.subscribe(self.nc, self.guard)
        try:
            async with self.catalog.following():
                target, deadline = position.target, self.config.settings.replay_deadline_s
                await self.index.catch_up(target, timeout=deadline)
                self.caught_up = True
                self._ended.clear()  # permits of runs that ended before now: the sweep's job
                log.info("scheduler caught up at seq %d (read from %d)", target, position.start)
                yield
        finally:
            with anyio.CancelScope(shield=True):
                await self.feed.leave()
                for sub in (heartbeats, drains, peers):
                    with contextlib.suppress(Exception):  # the connection may be gone
                        await sub.unsubscribe()

    def heartbeat(self) -> SchedulerHeartbeat:
        return SchedulerHeartbeat(
            scheduler_id=self.scheduler_id,
            at=self.clock.now(),
            started_at=self.started_at,
            seen_seq=self.index.last_seq,
            batches=True,
        )

    def statistics(self) -> SchedulerStats:
        return SchedulerStats(
            caught_up=self.caught_up,
            live_agents=len(self.fleet.live()),
            routing=len(self.work.routing),
            pending_decisions=self._applying,
            decisions=self._decisions,
            lost_agents=self._lost,
            passes=self._passes,
        )

    # --- inputs: they only record what they heard and wake the deciding task ----------------

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            beat = decode_heartbeat(msg.subject, msg.data)
        except msgspec.MsgspecError:
            log.warning("undecodable heartbeat on %s", msg.subject)
            return
        known = self.fleet.get(beat.agent_id)
        was_lost = self.fleet.is_gone(beat.agent_id)
        if self.fleet.observe(beat) and was_lost:
            log.info("agent %s is back: restarted with the same id", beat.agent_id)
        if known is None or _capacity_changed(known, beat):
            self._kick.set()

    async def _on_drain(self, msg: Msg) -> None:
        """An agent got a preemption notice: from now on it gets no new run; the next pass
        preempts (or requeues) its runs and answers with how many it handled."""
        agent_id = agent_of_drain(msg.subject)  # never the payload: an agent drains itself only
        if agent_id is None:
            return
        self.fleet.recall(agent_id)
        if msg.reply:
            self._drain_replies.setdefault(agent_id, []).append(msg.reply)
        self._kick.set()

    def _observe(self, seq: int, event: AnyEvent, before: RunRecord | None, run: RunRecord) -> None:
        self.work.observe(seq, event, run, self.clock.monotonic())
        newly_ended = run.is_terminal and (before is None or not before.is_terminal)
        if newly_ended and self.caught_up and run.slot is not None:
            self._ended.append(run)
        if type(event) not in NO_DECISION and (not newly_ended or self._end_asks(run)):
            self._kick.set()

    def _end_asks(self, run: RunRecord) -> bool:
        """Whether a run's end asks for a pass: its permit is to be given back, or a run waits
        in a queue (the slot it freed may take it). Else nothing waits for the slot: a routing
        run that finds no free slot is queued."""
        return run.slot is not None or self.index.any_queued()

    def _observe_queue(self, seq: int, event: QueueWaitChanged, queued: list[str]) -> None:
        self.work.observe_queue(event, queued)
        self._kick.set()

    # --- the deciding task -------------------------------------------------------------------

    def kick(self) -> None:
        """Ask for a decision pass soon (the fleet or the scaling decisions changed)."""
        self._kick.set()

    async def _lead(self) -> None:
        """Decide while holding the scheduler lease, behind a fence on the log; a standby until
        then (its index hot)."""
        while True:
            term = await self.lease.acquire()
            try:
                if await self._fence_the_log(term):
                    await self._decide_while_leading()
            finally:
                self._leading = False
                self.fence.drop()
                with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
                    await self.lease.release()  # refused harmlessly if a newer one holds it

    async def _fence_the_log(self, term: int) -> bool:
        """Fence the log for ``term`` and wait until the index holds everything stored before
        the fence (the last decisions of the scheduler before, whatever its state)."""
        self.fenced = False
        log.info("scheduler %s took the lease (term %d): fencing the log", self.scheduler_id, term)
        try:
            last = await self.fence.establish(term)
        except Fenced as err:
            self._fenced_out(err)
            return False
        except Exception as err:
            log.warning("scheduler %s could not fence the log (%r)", self.scheduler_id, err)
            return False
        if not await self.index.wait_for_seq(last, timeout=CATCH_UP_S):
            log.warning("scheduler %s: the index did not reach the fence", self.scheduler_id)
            return False
        return True

    async def _decide_while_leading(self) -> None:
        self._leading = True
        log.info("scheduler %s holds the lease: deciding", self.scheduler_id)
        async with anyio.create_task_group() as tg:

            async def keep() -> None:
                await self.lease.keep()
                tg.cancel_scope.cancel()

            tg.start_soon(keep)
            tg.start_soon(self._tick_loop)
            await self._decide_loop()  # returns once fenced out
            tg.cancel_scope.cancel()
        why = "was fenced out" if self.fenced else "lost the lease"
        log.warning("scheduler %s %s: standing by", self.scheduler_id, why)

    async def _decide_loop(self) -> None:
        while not self.fenced:
            await self._kick.wait()
            self._kick = anyio.Event()
            timed, self._timed = self._timed, False
            if self.fence.due(self.restater.max_age_s) and not await self._refence():
                return
            await self._pass(timed=timed)

    async def _refence(self) -> bool:
        """Write the fence markers again (between passes: no decision in flight) before they
        age out of the log; False if this scheduler was fenced out meanwhile."""
        try:
            await self.fence.establish(self.lease.term)
        except Fenced as err:
            self._fenced_out(err)
            return False
        except Exception as err:  # the old markers stand: try again before the next pass
            log.warning("scheduler %s could not renew its fence (%r)", self.scheduler_id, err)
        return True

    async def _tick_loop(self) -> None:
        sweep_every = max(1, int(self.config.settings.release_grace_s / self.tick_s))
        ticks = 0
        while True:
            await self.clock.sleep(self.tick_s)
            self._timed = True
            self._kick.set()
            ticks += 1
            if ticks % sweep_every == 0:
                await self._sweep()

    async def decide(self) -> None:
        """One pass over what events ask for (cancel, drains, place, dispatch), applied."""
        await self._pass(timed=False)

    async def tick(self) -> None:
        """One pass that also decides what time asks for (lost nodes and attempts, resource
        waits, unfinished admissions, wait reasons), applied."""
        await self._pass(timed=True)

    async def _pass(self, *, timed: bool) -> None:
        if not self.nc.is_connected:
            self._cut_off = True  # agents cannot reach us either: no loss is decided now
            return
        if self._cut_off:
            self._cut_off = False
            self.fleet.refresh()  # every agent gets a full timeout after a reconnect
        for agent_id, runs in self.index.on_agent.items():
            if runs:
                self.fleet.suspect(agent_id)
        catalogue = await self._catalogue()
        if catalogue is not None:
            now = Now(self.clock.now(), self.clock.monotonic())
            fleet, booting = self.fleet.view(), self.booting()
            view = Pass(self.index, self.work, fleet, catalogue, self.config, now, booting)
            await self.apply(decide(view, timed=timed))
            self._passes += 1
        await self._release_ended()

    async def _catalogue(self) -> dict[str, PipelineInfo] | None:
        """The settings of every pipeline with runs to decide on; None (no pass now) if the
        catalogue stays unreachable."""
        pipelines = set(self.index.pipelines_with_queue())
        pipelines.update(self.index.records[r].pipeline for r in self.work.routing)
        for load in self.work.agent_load.values():  # the pipelines of the runs on agents
            pipelines.update(load)
        found: dict[str, PipelineInfo] = {}
        for pipeline in pipelines:
            if (info := self.catalog.current(pipeline)) is not None:
                found[pipeline] = info  # the followed cache: no retry wrapper per pass
                continue
            try:
                info = await patiently(
                    f"look up {pipeline}", partial(self.catalog.lookup, pipeline)
                )
            except RETRYABLE as err:
                log.warning("catalogue unreachable (%r); deciding again later", err)
                return None
            if info is not None:
                found[pipeline] = info
        return found


def _capacity_changed(old: AgentHeartbeat, new: AgentHeartbeat) -> bool:
    return (
        old.pipelines != new.pipelines
        or old.accelerators != new.accelerators
        or old.draining != new.draining
    )


__all__ = ["Scheduler", "SchedulerStats", "patiently"]
