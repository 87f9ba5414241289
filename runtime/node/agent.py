"""The node agent: registers its accelerators, loads pipelines, runs attempts in worker processes.

An agent subscribes to dispatches addressed to it (``jetrun.ev.*.dispatched.<agent_id>``: never
another agent's) before it first heartbeats, so it cannot miss one. Each attempt runs in a worker
process that the agent can kill: on the pipeline's execution timeout, on cancellation, and on a
preemption notice. Results are events carrying the attempt number; the state machine drops those
of an attempt that is no longer current, so a late result from this agent can never change a run
that moved on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import socket
import uuid

import anyio
import msgspec
from anyio.abc import TaskGroup, TaskStatus
from nats.aio.client import Client
from nats.aio.msg import Msg

from contracts.agents import (
    Accelerator,
    AgentHeartbeat,
    LoadedPipeline,
)
from contracts.events import (
    AnyEvent,
    RunCancelled,
    RunDispatched,
    RunPreempted,
    RunRequeued,
    RunsDispatched,
)
from contracts.names import check_token
from runtime.infra.capture import DEFAULT_MAX_BYTES
from runtime.infra.catalog import Catalog
from runtime.infra.clock import SYSTEM_CLOCK, Clock
from runtime.infra.eventlog import EventLog, LogSettings, agent_dispatches, kind_filters
from runtime.infra.fleet import (
    HEARTBEAT_SUBJECT,
    RECALL_SUBJECT,
    declares_node_lost,
    drain_subject,
)
from runtime.infra.guard import Guard
from runtime.infra.logsetup import bound
from runtime.infra.metrics import cold_start_histogram
from runtime.infra.peers import PeerSchedulers
from runtime.infra.runlogs import LogFlusher, LogStore
from runtime.infra.scalinglog import ScalingLog
from runtime.infra.streamsetup import require_all
from runtime.node.accelerators import detect
from runtime.node.attempts import Attempt, Pool, Reporter, Runner, Starts
from runtime.node.ended import EndedRuns
from runtime.node.ends import Ends
from runtime.node.replicas import Replicas
from runtime.node.results import HEADER_ROOM
from runtime.node.runners import Runners

log = logging.getLogger("jetrun.agent")
PEERS_TIMEOUT_S = 10.0  # a scheduler of a release before batches heard: ends alone this long
_encoder = msgspec.json.Encoder()


def default_agent_id() -> str:
    """``agent-<host>-<random>``, with what a subject token cannot hold in a host name
    (``node-1.example.com`` has dots) replaced by '-'."""
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:64]
    return f"agent-{host}-{uuid.uuid4().hex[:8]}"


class AgentFenced(Exception):
    """The scheduler declared this agent lost (it was cut off, or stopped, for longer than the
    node loss timeout). Its runs went elsewhere: it kills its attempts and exits; restarted,
    with the same id or another, it is taken back."""

    def __init__(self, agent_id: str) -> None:
        super().__init__(f"agent {agent_id} was declared lost; restart it to rejoin")


def _ids(attempt: Attempt) -> tuple[str, int]:
    return attempt.run_id, attempt.attempt


class Agent(Replicas):
    def __init__(
        self,
        nc: Client,
        *,
        modules: list[str],
        cpu_slots: int = 2,
        cpu_queue: int = 0,
        agent_id: str | None = None,
        heartbeat_interval_s: float = 1.0,
        clock: Clock = SYSTEM_CLOCK,
        log_settings: LogSettings | None = None,
        accelerators: list[Accelerator] | None = None,
        report_deadline_s: float = 600.0,
        log_max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self.nc = nc
        self.modules = modules
        self.agent_id = agent_id or default_agent_id()
        check_token(self.agent_id, "agent id")  # it is a token of the heartbeat subject
        self.heartbeat_interval_s = heartbeat_interval_s
        self.clock = clock
        # results must outlive a NATS outage: reports retry for report_deadline_s
        settings = dataclasses.replace(
            log_settings or LogSettings(), append_deadline_s=report_deadline_s
        )
        self.log = EventLog(nc, settings)
        self.catalog = Catalog(self.log.js, replicas=settings.replicas)
        self.logs = LogStore(self.log.js, settings)
        self.log_max_bytes = log_max_bytes
        if accelerators is None:
            accelerators = detect(cpu_slots, cpu_queue)
        self.accelerators = accelerators
        self.pools: dict[str, Pool] = {}
        self.attempts: dict[str, Attempt] = {}
        self.draining = False
        self.draining_on_notice = False  # drain() was called: being declared lost is expected
        self.started_at = clock.now()
        self._tg: TaskGroup | None = None
        self._runners: Runners[tuple[RunDispatched, Attempt]] | None = None  # attempts' tasks
        self._fenced = anyio.Event()  # the scheduler declared this agent lost
        self.recalled = anyio.Event()  # a recall request arrived
        self._idle = anyio.Event()  # an attempt ended
        self.seen_seq = 0  # the last dispatch's log sequence handled
        self._ended = EndedRuns()  # runs cancelled or taken off here, by log sequence
        self.serving = False  # subscribed to dispatches and heartbeating
        self.cold_starts = cold_start_histogram()
        self.reporter = Reporter(self.log)
        # a scheduler of a release before batches, heard: each end alone (``runtime.infra.peers``)
        self.peers = PeerSchedulers("", clock.monotonic, PEERS_TIMEOUT_S)
        ends = Ends(
            self.reporter,
            self.agent_id,
            self.max_event_bytes,
            lambda: len(self.attempts),
            lambda: not self.peers.older_heard(),
        )
        self.runner = Runner(
            agent_id=self.agent_id,
            pools=self.pools,
            log=self.log,
            logs=self.logs,
            reporter=self.reporter,
            ends=ends,
            clock=clock,
            spawn=self._spawn,
            max_event_bytes=self.max_event_bytes,
            log_max_bytes=log_max_bytes,
            starts=Starts(self.reporter),
            flusher=LogFlusher(),
            cpu=anyio.Semaphore(
                sum(a.slots for a in accelerators if a.kind == "cpu"), fast_acquire=True
            ),
        )
        self.guard = Guard(f"agent {self.agent_id}")
        self.scaling = ScalingLog(self.log.js, replicas=settings.replicas)
        self._scaling_seq = 0  # the last scaling-log sequence handled

    # --- lifecycle ---------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Load pipelines, subscribe, heartbeat, and run dispatched attempts until cancelled."""
        self._load_specs()
        await require_all(self.log, self.catalog, self.scaling, self.logs)
        for pool in self.pools.values():
            await self._register(pool)
        # a load or unload handled wrongly would leave replicas the autoscaler does not know of
        scaling = await self.scaling.tail(
            self.guard.wrap("scaling handler", self._on_scaling),
            from_seq=await self.scaling.last_seq() + 1,
            kinds=["replica_load", "replica_unload"],
        )
        start = await self.log.last_seq() + 1
        self.seen_seq = start - 1  # nothing before this process started was for it
        kinds = ("cancelled", "preempted", "requeued")  # dispatches: only those addressed here
        # a dispatch, cancellation or fencing handled wrongly would leave this agent acting on
        # a view of its runs the log does not share: fatal
        on_event = self.guard.wrap("dispatch handler", self._on_event)
        subjects = [agent_dispatches(self.agent_id), *(f for k in kinds for f in kind_filters(k))]
        # one consumer per subject: NATS lets this agent's identity read only its own dispatches
        subs = await self.log.tail_each(on_event, from_seq=start, subjects=subjects)
        on_recall = self.guard.wrap("recall handler", self._on_recall, fatal=False)
        recall = await self.nc.subscribe(f"{RECALL_SUBJECT}.{self.agent_id}", cb=on_recall)
        peers = await self.peers.subscribe(self.nc, self.guard)
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                self._runners = Runners(tg, lambda job: self._run_attempt(*job))
                tg.start_soon(self.guard.watch)
                tg.start_soon(self.runner.starts.run)
                tg.start_soon(self.runner.flusher.run)
                tg.start_soon(self._heartbeat_loop)
                for pool in self.pools.values():
                    if pool.loaded:
                        tg.start_soon(self._warm, pool, pool.generation)
                self.serving = True
                task_status.started()
                await self._fenced.wait()
                log.error(
                    "%s was declared lost by the scheduler; killing its attempts (their runs "
                    "moved on), then exiting",
                    self.agent_id,
                )
                self.draining = True
                for running in list(self.attempts.values()):
                    self._abandon(running)
                await self._beat()
                while self.attempts:
                    await self._idle.wait()
                    self._idle = anyio.Event()
                raise AgentFenced(self.agent_id)
        finally:
            with anyio.CancelScope(shield=True):
                stops = [
                    *(tail.unsubscribe for tail in subs),
                    recall.unsubscribe,
                    peers.unsubscribe,
                    scaling.unsubscribe,
                ]
                for stop in stops:
                    with contextlib.suppress(Exception):
                        await stop()
                await self._kill_all()

    async def _on_recall(self, msg: Msg) -> None:
        """An explicit spot recall (``jetrun recall <agent-id>``): acknowledge, then the
        process drains as on SIGTERM."""
        if msg.reply:
            await self.nc.publish(msg.reply, f"{self.agent_id} draining".encode())
        self.recalled.set()

    async def drain(self, reason: str = "preemption notice") -> int:
        """Honour a preemption notice: take no more work, have the scheduler preempt (or
        requeue) every run here at once, and kill the workers. Returns how many runs the
        scheduler handled (-1 if it did not answer)."""
        self.draining = True
        self.draining_on_notice = True
        log.warning("%s draining: %s", self.agent_id, reason)
        self.reporter.bound()  # reports retrying through an outage: bounded now
        await self._beat()
        try:
            subject = drain_subject(self.agent_id)
            reply = await self.nc.request(subject, self.agent_id.encode(), timeout=5.0)
            handled = int(reply.data or b"0")
        except Exception as err:
            log.warning("no scheduler answered the drain request: %r", err)
            handled = -1
        for attempt in list(self.attempts.values()):
            attempt.cancelled = True
            attempt.scope.cancel()
        await self._kill_all()
        return handled

    async def _kill_all(self) -> None:
        for pool in self.pools.values():
            for worker in pool.idle:
                await worker.kill()
            pool.idle.clear()
        for attempt in self.attempts.values():
            if attempt.worker is not None:
                await attempt.worker.kill()

    # --- heartbeats --------------------------------------------------------------------------

    def heartbeat(self) -> AgentHeartbeat:
        return AgentHeartbeat(
            agent_id=self.agent_id,
            at=self.clock.now(),
            started_at=self.started_at,
            accelerators=self.accelerators,
            pipelines=[
                LoadedPipeline(
                    pointer=p.spec.pointer,
                    status=p.status,
                    accelerator=p.spec.accelerator,
                    error=p.error,
                    gpus=p.gpus,
                )
                for p in self.pools.values()
                if p.loaded
            ],
            draining=self.draining,
            running=sorted(self.attempts),
            seen_seq=self.seen_seq,
            can_serve=sorted(self.pools),
            batches=True,
        )

    async def _beat(self) -> None:
        subject = f"{HEARTBEAT_SUBJECT}.{self.agent_id}"
        try:
            await self.nc.publish(subject, _encoder.encode(self.heartbeat()))
        except Exception as err:  # disconnected: the next beat will do
            log.debug("heartbeat not sent: %r", err)

    async def _heartbeat_loop(self) -> None:
        while True:
            await self._beat()
            await self.clock.sleep(self.heartbeat_interval_s)

    # --- attempts ----------------------------------------------------------------------------

    async def _on_event(self, seq: int, event: AnyEvent) -> None:
        if isinstance(event, RunDispatched) and event.agent_id == self.agent_id:
            self._take(seq, event)
            self.seen_seq = max(self.seen_seq, seq)
        elif isinstance(event, RunsDispatched) and event.agent_id == self.agent_id:
            for one in event.dispatched():  # each as the dispatch it stands for, in order
                self._take(seq, one)
            self.seen_seq = max(self.seen_seq, seq)
        elif isinstance(event, RunCancelled):
            self._ended.note(event.run_id, seq)
            running = self.attempts.get(event.run_id)
            if running is not None:
                running.cancelled = True
                running.scope.cancel()
        elif isinstance(event, RunPreempted | RunRequeued) and event.agent_id == self.agent_id:
            self._ended.note(event.run_id, seq)
            if declares_node_lost(event.reason):
                self._fenced.set()
                return
            running = self.attempts.get(event.run_id)
            if running is not None and running.attempt == event.attempt:
                # declared lost while running here after all: its result would be ignored,
                # and its slot must be free, as the scheduler now believes it is
                log.warning("run %s attempt %d was declared lost; killing it", *_ids(running))
                self._abandon(running)

    def _take(self, seq: int, event: RunDispatched) -> None:
        """Start the attempt ``event`` dispatches here (stored at ``seq``), unless its run
        ended later in the log, it runs here already, or the agent drains or stops."""
        if self._ended.ended_after(event.run_id, seq):
            return  # cancelled or taken off here later in the log (heard first)
        runners = self._runners
        if event.run_id not in self.attempts and not self.draining and runners is not None:
            attempt = Attempt(event.run_id, event.attempt, anyio.CancelScope())
            self.attempts[event.run_id] = attempt
            if not runners.start((event, attempt)):  # the agent is stopping: not run
                del self.attempts[event.run_id]
                log.info("dispatch of %s not started: the agent is stopping", event.run_id)

    def _abandon(self, attempt: Attempt) -> None:
        """Kill an attempt whose run has moved on; it reports nothing. Its slot is free at
        once: a new dispatch of the same run is taken while the old worker is being killed."""
        attempt.cancelled = True
        attempt.scope.cancel()
        if self.attempts.get(attempt.run_id) is attempt:
            del self.attempts[attempt.run_id]
            self._idle.set()

    async def _run_attempt(self, dispatch: RunDispatched, attempt: Attempt) -> None:
        assert self._tg is not None
        try:
            with bound(run_id=dispatch.run_id, attempt=dispatch.attempt, agent_id=self.agent_id):
                await self.runner.run(dispatch, attempt, self._tg)
        finally:
            if self.attempts.get(dispatch.run_id) is attempt:
                del self.attempts[dispatch.run_id]
            self._idle.set()
            if attempt.worker is not None:  # interrupted mid-run: the worker may be busy
                with anyio.CancelScope(shield=True):
                    await attempt.worker.kill()

    def max_event_bytes(self) -> int:
        return max(self.nc.max_payload - HEADER_ROOM, 1024)
