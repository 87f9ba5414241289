"""Running one attempt on a node: take a warm worker, run the inputs, report what happened.

The agent (``runtime.node.agent``) decides which dispatches to take and when to kill; this
module runs a taken attempt and appends its events: ``started``, streamed ``output`` events
(several in flight at once), then the end (``completed``, ``failed`` or ``timed_out``; with the
ends of other attempts ready in the same turn of the loop as one ``ended_runs``:
``runtime.node.ends``).
``started`` is appended only once the attempt has run for ``STARTED_AFTER_S`` (or before its
first output): a shorter attempt appends its end alone, one append instead of two (the state
machine takes ``dispatched`` then the end). Whatever goes wrong on the node fails that attempt
alone, never the agent. Every result is measured before it is appended, so an event the log
cannot take fails the attempt instead of being lost.

At most as many CPU attempts run at once as the node has CPU slots (``Runner.cpu``); a CPU
dispatch beyond that waits for a slot, first come first served, before it takes a worker (the
agent's queue: its scheduler sends it at most ``Accelerator.queue`` such dispatches, and only
of pipelines whose attempts are short). Its execution timeout and its ``started`` begin once
it holds a slot; cancelled while it waits (its run cancelled or taken off the node, the agent
draining), it leaves the line and never runs. The slot is given back as soon as the worker is
done, before the end is appended, so the next attempt runs while the end is being stored. GPU
attempts never wait here: their placement is by GPU memory, and one runs per replica.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskGroup

from contracts.agents import PipelineStatus
from contracts.errors import ErrorType, RunError
from contracts.events import (
    AttemptEvent,
    Event,
    RunCompleted,
    RunDispatched,
    RunFailed,
    RunOutputProduced,
    RunStarted,
    RunSubmitted,
    RunTimedOut,
)
from contracts.values import RunIO
from runtime.infra.clock import Clock
from runtime.infra.eventlog import EventLog, submission_of
from runtime.infra.logsetup import bind
from runtime.infra.runlogs import AttemptLog, LogFlusher, LogStore
from runtime.node.ends import Ends
from runtime.node.pipelines import PipelineSpec
from runtime.node.results import ResultTooLarge, encoded, fitted
from runtime.node.worker import PipelineWorker, StartupFailed

log = logging.getLogger("jetrun.agent")
REPORT_GRACE_S = 5.0  # how long reports may still retry once a preemption notice came
# an attempt still running this long after its worker was taken appends ``started``; one that
# ends sooner appends only its end
STARTED_AFTER_S = 0.05
OUTPUTS_IN_FLIGHT = 64  # streamed outputs of one attempt being appended at once


@dataclass
class Pool:
    """Warm workers of one pipeline; a worker that ran its startup is reused."""

    spec: PipelineSpec
    module: str
    idle: list[PipelineWorker] = field(default_factory=list)
    status: PipelineStatus = PipelineStatus.loading
    error: str | None = None
    loaded: bool = True  # a replica: False while an autoscaled pipeline is not loaded here
    scaled: bool = False  # the autoscaler decides when it loads and unloads
    gpus: list[int] = field(default_factory=list)  # what its workers see (CUDA_VISIBLE_DEVICES)
    generation: int = 0  # bumped by every load and unload: a stale warm-up or unload gives way


@dataclass
class Attempt:
    run_id: str
    attempt: int
    scope: anyio.CancelScope
    worker: PipelineWorker | None = None
    cancelled: bool = False
    pipeline: str = ""


class Reporter:
    """Appends an attempt's events; a report outlives cancellation and NATS outages (the
    log's ``append_deadline_s``), but not a preemption notice by more than
    ``REPORT_GRACE_S``: shutdown is bounded."""

    def __init__(self, log: EventLog) -> None:
        self.log = log
        self.on_notice = False  # a preemption notice came: reports are bounded
        self._give_up = math.inf  # when reports in flight at the notice give up
        self._reporting: set[anyio.CancelScope] = set()  # retrying reports in flight

    def bound(self) -> None:
        """A preemption notice came: reports in flight give up within ``REPORT_GRACE_S``."""
        self.on_notice = True
        give_up = self._give_up = min(self._give_up, anyio.current_time() + REPORT_GRACE_S)
        for scope in self._reporting:
            scope.deadline = min(scope.deadline, give_up)

    async def report(
        self, event: Event, payload: bytes | None = None, callback: bool = False
    ) -> None:
        """Append ``event`` (``payload``: its encoding, if the caller has it; ``callback``: its
        run has a callback URL, see ``EventLog.append``).

        The first try is made without a cancel scope (entering a shielded one costs about 4 us,
        and nearly every report is stored at the first try): the publish is sent and its ack
        awaited. If that try fails (an outage, a timeout, a refusal) or the task is cancelled
        meanwhile (the agent stopping), the report is made again shielded and retrying, as
        ``_shielded`` does; the same message id, so an event stored by the first try is stored
        once. The first try waits at most ``PUBLISH_TIMEOUT_S`` (no longer than
        ``REPORT_GRACE_S``) for its ack, and a report in flight when a preemption notice came
        retries only until the notice's grace is over; after a notice every report goes the
        shielded, bounded way at once."""
        if self.on_notice:
            await self._shielded(event, payload, callback)
            return
        try:
            pending = await self.log.send(event, payload=payload, callback=callback)
            await pending.ack()
            return
        except anyio.get_cancelled_exc_class():
            await self._shielded(event, payload, callback, self._notice_deadline())
            raise
        except Exception as err:  # the retrying append below takes it up
            log.debug("first try of %s for %s failed: %r", event.kind, event.run_id, err)
        await self._shielded(event, payload, callback, self._notice_deadline())

    def _notice_deadline(self) -> float | None:
        """When a report that was in flight at a preemption notice gives up (None: no notice)."""
        return self._give_up if self.on_notice else None

    async def _shielded(
        self, event: Event, payload: bytes | None, callback: bool, until: float | None = None
    ) -> None:
        """Append ``event``, shielded from cancellation, retrying through outages; bounded once
        a preemption notice came (``until``: the deadline of a report in flight then)."""
        with anyio.CancelScope(shield=True) as scope:
            if until is not None:
                scope.deadline = until
            elif self.on_notice:
                scope.deadline = anyio.current_time() + REPORT_GRACE_S
            self._reporting.add(scope)
            try:
                await self.log.append(event, payload=payload, callback=callback)
            except Exception as err:
                log.error("could not report %s for %s: %r", event.kind, event.run_id, err)
            finally:
                self._reporting.discard(scope)
        if scope.cancelled_caught:
            log.error("gave up reporting %s for %s: shutting down", event.kind, event.run_id)

    async def report_then_set(self, event: Event, done: anyio.Event) -> None:
        try:
            await self.report(event)
        finally:
            done.set()


class _Start(enum.Enum):
    pending = "pending"  # not appended (yet)
    reporting = "reporting"  # being appended, or appended
    skipped = "skipped"  # the attempt ended first: never appended


@dataclass(eq=False)
class Start:
    """The ``started`` event of one attempt, appended only if it runs long enough."""

    event: RunStarted
    due: float  # anyio.current_time() from which it is appended
    state: _Start = _Start.pending
    stored: anyio.Event | None = None  # made when the append begins, set once it returned


class Starts:
    """Appends ``started`` for every attempt still running ``after_s`` after it began: one
    task for all attempts (``run``), waking at most every ``after_s / 4``; an attempt that
    ends sooner, or streams an output, settles its own (``settle``)."""

    def __init__(self, reporter: Reporter, after_s: float = STARTED_AFTER_S) -> None:
        self.reporter, self.after_s = reporter, after_s
        self._pending: deque[Start] = deque()  # in the order begun, so in order due
        self._wake = anyio.Event()

    def begin(self, event: RunStarted) -> Start:
        start = Start(event=event, due=anyio.current_time() + self.after_s)
        self._pending.append(start)
        self._wake.set()
        return start

    async def settle(self, start: Start, *, ended: bool) -> None:
        """Before an output (``ended=False``): ``started`` is stored first. At the attempt's
        end (``ended=True``): not appended if it was not yet; waited for if it is underway
        (shielded from cancellation)."""
        if start.state is _Start.pending:
            if ended:
                start.state = _Start.skipped
                return
            self._claim(start)
            await self._report(start)
        if start.stored is not None and not start.stored.is_set():
            with anyio.CancelScope(shield=ended):
                await start.stored.wait()

    async def run(self) -> None:
        """Append the ``started`` of attempts that have been running for ``after_s``."""
        async with anyio.create_task_group() as tg:
            while True:
                if not self._pending:
                    await self._wake.wait()
                    self._wake = anyio.Event()
                    continue
                start = self._pending[0]
                wait = start.due - anyio.current_time()
                if wait > 0:
                    await anyio.sleep(max(wait, self.after_s / 4))
                    continue
                self._pending.popleft()
                if start.state is _Start.pending:
                    self._claim(start)  # at once: the attempt may end before the task runs
                    tg.start_soon(self._report, start)

    @staticmethod
    def _claim(start: Start) -> None:
        start.state = _Start.reporting
        start.stored = anyio.Event()

    async def _report(self, start: Start) -> None:
        assert start.stored is not None
        await self.reporter.report_then_set(start.event, start.stored)


class Streaming:
    """An attempt's streamed outputs, appended as they come without waiting for each other
    (at most ``OUTPUTS_IN_FLIGHT`` at once: a fast stream waits for the log); ``stored``
    waits for them all, so the end is appended after them. The index of each output orders
    them in the run whatever order they are stored in."""

    def __init__(self, reporter: Reporter, tg: TaskGroup) -> None:
        self.reporter, self.tg = reporter, tg
        self._slots: anyio.Semaphore | None = None  # made by the first output
        self._pending = 0
        self._drained: anyio.Event | None = None

    async def append(self, event: RunOutputProduced, payload: bytes) -> None:
        """Append ``event`` (encoded: ``payload``) once fewer than ``OUTPUTS_IN_FLIGHT`` are."""
        if self._slots is None:
            self._slots = anyio.Semaphore(OUTPUTS_IN_FLIGHT)
        await self._slots.acquire()
        self._pending += 1
        self.tg.start_soon(self._report, event, payload, self._slots)

    async def _report(
        self, event: RunOutputProduced, payload: bytes, slots: anyio.Semaphore
    ) -> None:
        try:
            await self.reporter.report(event, payload)
        finally:
            slots.release()
            self._pending -= 1
            if not self._pending and self._drained is not None:
                self._drained.set()

    @property
    def pending(self) -> int:
        """Outputs being appended."""
        return self._pending

    async def stored(self) -> None:
        while self._pending:
            self._drained = anyio.Event()
            await self._drained.wait()


@dataclass
class Runner:
    """Runs attempts of the pipelines in ``pools`` on this node (see the module docstring)."""

    agent_id: str
    pools: dict[str, Pool]
    log: EventLog
    logs: LogStore
    reporter: Reporter
    ends: Ends  # the ends of attempts ready at once, batched
    clock: Clock
    spawn: Callable[[Pool], Awaitable[PipelineWorker]]
    max_event_bytes: Callable[[], int]
    log_max_bytes: int
    starts: Starts
    flusher: LogFlusher
    cpu: anyio.Semaphore  # the node's CPU slots: a CPU attempt holds one while it runs

    async def run(self, dispatch: RunDispatched, attempt: Attempt, tg: TaskGroup) -> None:
        """Run the attempt and report how it ended (nothing if it was interrupted)."""
        with attempt.scope:
            result = await self.result(dispatch, attempt, tg)
        if attempt.cancelled:
            log.info("attempt interrupted (cancelled or preempted)")
            return  # cancelled or preempted: the control plane has recorded the end
        if result is not None:
            # a failure is worth a line in the agent's log; a completion is in the event log
            level = logging.DEBUG if isinstance(result, RunCompleted) else logging.INFO
            log.log(level, "attempt ended: %s", result.kind)
            event, payload = fitted(result, self.max_event_bytes())
            if isinstance(event, RunCompleted | RunFailed | RunTimedOut) and not dispatch.callback:
                await self.ends.report(event, payload)  # maybe with others ending now
            else:  # a run with a callback: where the webhook outbox reads it, never batched
                await self.reporter.report(event, payload, callback=dispatch.callback)

    async def result(
        self, dispatch: RunDispatched, attempt: Attempt, tg: TaskGroup
    ) -> AttemptEvent | None:
        """``execute``; whatever it raises fails this attempt alone, never the agent."""
        try:
            return await self.execute(dispatch, attempt, tg)
        except ResultTooLarge as err:
            error = err.error
        except Exception as err:
            log.exception("attempt %d of %s failed on the agent", dispatch.attempt, dispatch.run_id)
            message = f"the agent could not run this attempt: {type(err).__name__}: {err}"
            error = RunError(type=ErrorType.unknown, message=message[:2000])
        at = self.clock.now()
        return RunFailed(run_id=dispatch.run_id, at=at, attempt=dispatch.attempt, error=error)

    async def execute(
        self, dispatch: RunDispatched, attempt: Attempt, tg: TaskGroup
    ) -> AttemptEvent | None:
        run_id, n = dispatch.run_id, dispatch.attempt
        submitted = await self._submitted(dispatch)
        pool = self.pools.get(submitted.pipeline) if submitted is not None else None
        if pool is None or submitted is None:
            error = RunError(
                type=ErrorType.pipeline_loading,
                message=f"pipeline is not loaded on node {self.agent_id}",
            )
            return RunFailed(run_id=run_id, at=self.clock.now(), attempt=n, error=error)
        attempt.pipeline = pool.spec.pointer
        bind(team=submitted.team, pipeline=submitted.pipeline)
        if pool.spec.accelerator != "cpu":
            return await self._take_worker(dispatch, submitted, pool, attempt, tg)
        await self.cpu.acquire()  # may wait in line: see the module docstring
        try:
            return await self._take_worker(dispatch, submitted, pool, attempt, tg)
        finally:
            self.cpu.release()

    async def _take_worker(
        self,
        dispatch: RunDispatched,
        submitted: RunSubmitted,
        pool: Pool,
        attempt: Attempt,
        tg: TaskGroup,
    ) -> AttemptEvent | None:
        run_id, n = dispatch.run_id, dispatch.attempt
        try:
            worker = pool.idle.pop() if pool.idle else await self.spawn(pool)
        except StartupFailed as failed:
            return RunFailed(run_id=run_id, at=self.clock.now(), attempt=n, error=failed.error)
        attempt.worker = worker
        log.debug("attempt started")
        # ``started`` is appended while the worker runs, if it runs long enough; what follows
        # it in the log (outputs, the result) is appended only once it is stored
        started = RunStarted(run_id=run_id, at=self.clock.now(), attempt=n, agent_id=self.agent_id)
        start = self.starts.begin(started)
        try:
            return await self._run_worker(dispatch, submitted, pool, attempt, start, tg)
        finally:
            await self.starts.settle(start, ended=True)

    async def _run_worker(
        self,
        dispatch: RunDispatched,
        submitted: RunSubmitted,
        pool: Pool,
        attempt: Attempt,
        start: Start,
        tg: TaskGroup,
    ) -> AttemptEvent:
        run_id, n = dispatch.run_id, dispatch.attempt
        worker = attempt.worker
        assert worker is not None

        streaming = Streaming(self.reporter, tg)

        async def on_output(index: int, output: RunIO) -> None:
            event = RunOutputProduced(
                run_id=run_id, at=self.clock.now(), attempt=n, index=index, output=output
            )
            payload = encoded(event, self.max_event_bytes())  # too large: the worker is killed
            await self.starts.settle(start, ended=False)
            await streaming.append(event, payload)

        timeout = pool.spec.timeout_s
        output = self.flusher.open(
            AttemptLog(self.logs, run_id, n, self.clock, max_bytes=self.log_max_bytes)
        )
        limit = anyio.move_on_after(timeout) if timeout is not None else None
        try:
            with limit if limit is not None else contextlib.nullcontext():
                result = await worker.run(submitted.inputs, on_output, output.capture)
        finally:  # the attempt's outputs and logs are stored before its result
            if streaming.pending:
                with anyio.CancelScope(shield=True):
                    await streaming.stored()
            await self.flusher.close(output)
        if limit is not None and limit.cancelled_caught:
            await worker.kill()
            return RunTimedOut(
                run_id=run_id, at=self.clock.now(), attempt=n, timeout_s=timeout or 0.0
            )
        if worker.alive and pool.loaded and pool.status is PipelineStatus.ready:
            pool.idle.append(worker)
        else:  # the replica is being (or was) unloaded: its worker exits
            await worker.kill()
        attempt.worker = None
        now = self.clock.now()
        if result.error is not None:
            return RunFailed(run_id=run_id, at=now, attempt=n, error=result.error)
        return RunCompleted(  # streamed outputs are already in the log: not repeated
            run_id=run_id,
            at=now,
            attempt=n,
            outputs=result.outputs[result.streamed :],
            streamed=result.streamed,
            ran_s=round(max(now - start.event.at, 0.0), 6),  # read by the scheduler's queue room
        )

    async def _submitted(self, dispatch: RunDispatched) -> RunSubmitted | None:
        """What the run was submitted with: carried by the dispatch, else read from the log."""
        if dispatch.inputs is not None and dispatch.pipeline is not None:
            return RunSubmitted(
                run_id=dispatch.run_id,
                at=dispatch.at,
                team=dispatch.team or "",
                pipeline=dispatch.pipeline,
                inputs=dispatch.inputs,
            )
        return await submission_of(self.log, dispatch.run_id)
