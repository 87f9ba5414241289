"""Run views: the durable read model of ended runs, and the checkpoint services start from.
(The run history, the listing index of every run, is ``runtime.control.history``.)

A JetStream KV bucket (``JETRUN_RUNS``) holds, per ended run, its folded ``RunRecord`` (key
``run.<run_id>``) and one ``Checkpoint`` (key ``checkpoint``). The scheduler is the only writer:
it stores a run's view once the run has ended, forgets the run from memory only after the view
is stored, and every few seconds records where a starting process may begin reading the log
(the first event of the oldest run it still holds). Gateways read a view when a run is no longer
in their index, so any gateway answers any run, however old, without holding it in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import anyio
import msgspec
from nats.errors import MaxPayloadError
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from contracts.names import check_token
from contracts.outputs import Outputs
from contracts.run import RunRecord
from contracts.states import RunState
from contracts.values import RunIO
from runtime.control.history import HistoryWriter, RunHistory
from runtime.infra import jspub
from runtime.infra.clock import Clock
from runtime.infra.config import Settings
from runtime.infra.eventlog import PUBLISH_TIMEOUT_S, EventLog, submission_of
from runtime.infra.jsretry import RETRYABLE, retrying
from runtime.infra.projection import RunIndex
from runtime.infra.streams import EVENTS_STREAM, VIEWS_BUCKET, VIEWS_STREAM, views_config
from runtime.infra.streamsetup import ensure_stream, require_stream

log = logging.getLogger("jetrun.views")

CHECKPOINT_KEY = "checkpoint"
STORES_IN_FLIGHT = 64
# the views of runs that end within this long of each other are stored together: one write to
# the server for them all and their acks read together, instead of a put, a wake of the
# server and an ack per run at the moment the run's answer is going out
VIEW_BATCH_S = 0.02


class Checkpoint(msgspec.Struct, frozen=True, kw_only=True):
    """Reading the log from ``replay_from`` gives every run a process must hold (every
    unfinished run, every run ended recently, every ended run whose view is not stored)."""

    replay_from: int
    seq: int  # the scheduler's position when it wrote this
    at: float


def _enc_hook(obj: object) -> object:
    if isinstance(obj, Outputs):
        return obj.to_list()
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def _dec_hook(kind: type, obj: object) -> object:
    if kind is Outputs:
        return Outputs(msgspec.convert(obj, list[RunIO]))
    raise NotImplementedError(f"cannot decode {kind.__name__}")


_run_decoder = msgspec.json.Decoder(RunRecord, dec_hook=_dec_hook)
_checkpoint_decoder = msgspec.json.Decoder(Checkpoint)
_encoder = msgspec.json.Encoder(enc_hook=_enc_hook)


def view_key(run_id: str) -> str:
    check_token(run_id, "run id")
    return f"run.{run_id}"


class RunViews:
    """Read and write the bucket. Safe to share within one process."""

    def __init__(
        self, js: JetStreamContext, *, replicas: int = 1, deadline_s: float = 10.0
    ) -> None:
        self.js = js
        self.replicas = replicas
        self.deadline_s = deadline_s
        self.history = RunHistory(js, replicas=replicas, deadline_s=deadline_s)
        self._kv: KeyValue | None = None

    async def ensure(self) -> None:
        """Create the bucket and the run history if missing (existing ones keep their
        settings). Idempotent."""
        await ensure_stream(self.js, views_config(replicas=self.replicas), 120.0)
        await self.history.ensure()
        self._kv = await self.js.key_value(VIEWS_BUCKET)

    async def require(self) -> None:
        """Wait until the bucket and the history exist (``jetrun setup`` creates them)."""
        await require_stream(self.js, VIEWS_STREAM, 120.0)
        await self.history.require()
        self._kv = await self.js.key_value(VIEWS_BUCKET)

    @property
    def kv(self) -> KeyValue:
        if self._kv is None:
            raise RuntimeError("RunViews.ensure() has not run")
        return self._kv

    async def put(self, run: RunRecord) -> None:
        """Store ``run``'s view (a KV put, through the connection's cheaper publisher)."""
        data, subject = _encoder.encode(run), f"$KV.{VIEWS_BUCKET}.{view_key(run.id)}"
        publisher = jspub.publisher_of(self.js)

        async def put() -> None:
            await publisher.publish(subject, data, None, PUBLISH_TIMEOUT_S)

        if self._kv is None:
            raise RuntimeError("RunViews.ensure() has not run")
        await retrying(f"store view of {run.id}", put, self.deadline_s)

    async def put_all(self, runs: Sequence[RunRecord]) -> list[Exception | None]:
        """Store the views of ``runs`` (different runs) together from this one task: every put
        is sent, then their acks are read (no task, limiter and retry wrapper per view). A put
        whose first try meets an outage is made again the patient way (``put``), those
        together. Returns, per run, None (stored) or the exception (``MaxPayloadError``: never
        storable; a ``RETRYABLE`` one: not stored now)."""
        if self._kv is None:
            raise RuntimeError("RunViews.ensure() has not run")
        publisher = jspub.publisher_of(self.js)
        results: list[Exception | None] = [None] * len(runs)
        flight: list[tuple[int, jspub.Pending]] = []
        again: list[int] = []
        expiry = jspub.Expiry(PUBLISH_TIMEOUT_S)  # one timer for them all
        try:
            for i, run in enumerate(runs):
                data, subject = _encoder.encode(run), f"$KV.{VIEWS_BUCKET}.{view_key(run.id)}"
                try:
                    pending = await publisher.send(subject, data, None, PUBLISH_TIMEOUT_S, expiry)
                    flight.append((i, pending))
                except RETRYABLE:
                    again.append(i)
                except Exception as err:
                    results[i] = err
            for i, pending in flight:
                try:
                    await pending.ack()
                except RETRYABLE:
                    again.append(i)
                except Exception as err:
                    results[i] = err
            flight.clear()
        finally:  # cancelled: stop waiting for what is in flight
            for _, pending in flight:
                pending.cancel()
            expiry.cancel()

        async def patiently(i: int) -> None:
            try:
                await self.put(runs[i])
            except Exception as err:
                results[i] = err

        if again:
            async with anyio.create_task_group() as tg:
                for i in again:
                    tg.start_soon(patiently, i)
        return results

    async def get(self, run_id: str) -> RunRecord | None:
        """The stored view of ``run_id``; None if there is none (or it aged out)."""
        data = await self._get(view_key(run_id))
        return None if data is None else _run_decoder.decode(data)

    async def put_checkpoint(self, checkpoint: Checkpoint) -> None:
        data = _encoder.encode(checkpoint)
        await retrying(
            "store checkpoint", lambda: self.kv.put(CHECKPOINT_KEY, data), self.deadline_s
        )

    async def checkpoint(self) -> Checkpoint | None:
        data = await self._get(CHECKPOINT_KEY)
        if data is None:
            return None
        try:
            return _checkpoint_decoder.decode(data)
        except msgspec.MsgspecError as err:
            log.warning("ignoring an undecodable checkpoint: %s", err)
            return None

    async def _get(self, key: str) -> bytes | None:
        async def get() -> bytes | None:
            try:
                entry = await self.kv.get(key)
            except (KeyNotFoundError, NotFoundError):
                return None
            return entry.value

        return await retrying(f"get {key}", get, self.deadline_s)


async def start_position(js: JetStreamContext, views: RunViews) -> tuple[int, int]:
    """``(from_seq, target)``: read the event log from ``from_seq`` and be caught up at
    ``target``. From the checkpoint if there is one that fits this stream, else from the start;
    an empty or fully aged-out stream has nothing to wait for."""
    info = await retrying("event log info", lambda: js.stream_info(EVENTS_STREAM), 30.0)
    last, messages = int(info.state.last_seq), int(info.state.messages)
    if messages == 0:
        return last + 1, last
    checkpoint = await views.checkpoint()
    if checkpoint is None or checkpoint.replay_from > last + 1:
        return 1, last  # none yet, or written for a stream that was since recreated
    return checkpoint.replay_from, last


class ViewKeeper:
    """The scheduler's side: lists every new run in the run history, stores the view of every
    run that ends, lets the index forget an ended run once it is listed, its view is stored
    and ``keep_ended_s`` has passed, and writes the checkpoint. ``step`` does one round;
    ``run`` repeats it."""

    def __init__(self, views: RunViews, index: RunIndex, settings: Settings) -> None:
        self.views = views
        self.index = index
        self.settings = settings
        self.writer = HistoryWriter(views.history, index)
        self.unstored: dict[str, RunRecord] = {}
        self._storing: set[str] = set()  # run ids whose put is in flight
        self._ended = anyio.Event()  # set when a run joins ``unstored``
        self.batch_s = VIEW_BATCH_S
        self._last_checkpoint = float("-inf")
        index.listen_ended(self._observe)

    def _observe(self, run: RunRecord) -> None:
        self.unstored[run.id] = run
        self._ended.set()

    async def step(self, now: float, mono: float, leading: bool = True) -> None:
        """Store pending views, forget ended runs, checkpoint. A standby (``leading`` False)
        only forgets, and drops the views its writer has stored (``_drop_stored``)."""
        cutoff = now - self.settings.keep_ended_s
        if not leading:
            await self.writer.step(leading)
            await self._drop_stored(cutoff)
            self.index.forget_ended(cutoff, may=self._may_forget)
            return
        async with anyio.create_task_group() as tg:  # history and views written together
            tg.start_soon(self.writer.step, leading)
            tg.start_soon(self._store_unstored)
        self.index.forget_ended(cutoff, may=self._may_forget)
        if mono - self._last_checkpoint >= self.settings.checkpoint_every_s:
            checkpoint = Checkpoint(
                replay_from=self.index.replay_from(), seq=self.index.last_seq, at=now
            )
            try:
                await self.views.put_checkpoint(checkpoint)
            except RETRYABLE as err:
                log.warning("checkpoint not stored now (%r); later", err)
                return
            self._last_checkpoint = mono

    async def _drop_stored(self, cutoff: float) -> None:
        """A standby keeps an ended run unstored until the stored checkpoint is past the run's
        last event: whoever wrote it (the leader, or a recorder) no longer held the run, so it
        had stored its view. Should this process lead first (that writer died with views not
        stored: the runs that ended within its lag, or in an outage), it stores them, instead
        of leaving those runs with no view once their events age out. Oldest first, stopping
        at the first run still held there (one read of the checkpoint per step). A run that
        ended before ``cutoff`` (``keep_ended_s`` ago) is dropped whatever the checkpoint says:
        a live run holds the checkpoint back for as long as it runs (hours, for a long
        attempt), and a takeover comes within seconds of a writer's death, so this keeps a
        standby's memory bounded by ``keep_ended_s`` of ended runs, as before."""
        while self.unstored:
            oldest = next(iter(self.unstored.values()))
            if oldest.updated_at >= cutoff:
                break
            del self.unstored[oldest.id]
        if not self.unstored:
            return
        try:
            checkpoint = await self.views.checkpoint()
        except RETRYABLE as err:
            log.warning("checkpoint not read now (%r); later", err)
            return
        if checkpoint is None or checkpoint.replay_from > self.index.last_seq + 1:
            return  # none yet, or written ahead of this index: nothing known stored
        stored = []
        for run_id in self.unstored:  # in the order they ended
            last = self.index.last_seq_of(run_id)
            if last is not None and last >= checkpoint.replay_from:
                break
            stored.append(run_id)
        for run_id in stored:
            del self.unstored[run_id]

    def _may_forget(self, run_id: str) -> bool:
        return run_id not in self.unstored and not self.writer.holds(run_id)

    async def _store_unstored(self) -> None:
        """Store the view of every unstored run not being stored already, ``STORES_IN_FLIGHT``
        in flight at a time (``RunViews.put_all``: one task sends them and reads the acks)."""
        runs = [run for run in self.unstored.values() if run.id not in self._storing]
        self._storing.update(run.id for run in runs)
        try:
            for start in range(0, len(runs), STORES_IN_FLIGHT):
                chunk = runs[start : start + STORES_IN_FLIGHT]
                results = await self.views.put_all(chunk)
                for run, result in zip(chunk, results, strict=True):
                    self._stored(run, result)
                    self._storing.discard(run.id)
        finally:  # cancelled or failed: the runs not stored are stored later
            self._storing.difference_update(run.id for run in runs)

    def _stored(self, run: RunRecord, error: Exception | None) -> None:
        if isinstance(error, RETRYABLE):
            log.warning("view of %s not stored now (%r); later", run.id, error)
            return
        if isinstance(error, MaxPayloadError):  # never storable: its events answer for it
            log.warning(
                "view of %s is over a message's size: not stored (read from its"
                " events while the log keeps them)",
                run.id,
                extra={"run_id": run.id, "team": run.team},
            )
        elif error is not None:
            raise error
        if self.unstored.get(run.id) is run:
            del self.unstored[run.id]

    async def _store_as_runs_end(self, leading: Callable[[], bool]) -> None:
        """The leader stores a run's view within ``batch_s`` of the run's end, with those of
        the runs that ended meanwhile, not in the next ``step``: a step every second stored a
        second's ended runs at once (300-470 views at 330 sync runs/s, 30-60 ms in which this
        process's other work, sync runs among it, waited; those steps overlapped 1.6% of the
        sync runs but two thirds of the slowest 1%), and a put per run as it ended cost a write
        and an ack of its own. ``step`` still stores whatever this left (a put that failed, a
        standby's runs)."""
        while True:
            await self._ended.wait()
            await anyio.sleep(self.batch_s)  # runs ending meanwhile join this round
            self._ended = anyio.Event()
            if leading():
                await self._store_unstored()

    async def run(self, clock: Clock, leading: Callable[[], bool], every_s: float = 1.0) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._store_as_runs_end, leading)
            while True:
                await self.step(clock.now(), clock.monotonic(), leading())
                await clock.sleep(every_s)


async def forget_loop(index: RunIndex, clock: Clock, keep_s: float, every_s: float = 1.0) -> None:
    """A reader's side (a gateway): forget ended runs ``keep_s`` after they ended."""
    while True:
        index.forget_ended(clock.now() - keep_s)
        await clock.sleep(every_s)


async def find_run(log: EventLog, views: RunViews, run_id: str) -> RunRecord | None:
    """A run read from durable storage: its stored view, else its events read back (a run
    created a moment ago through another gateway, or whose view is not stored yet). None for
    a run that does not exist (or whose events and view both aged out)."""
    try:
        check_token(run_id, "run id")
    except ValueError:
        return None
    run = await views.get(run_id)
    if run is not None:
        return run
    if await submission_of(log, run_id) is None:
        return None  # direct gets: no consumer is made for a run that does not exist
    run = await log.load(run_id)
    return None if run.state is RunState.unknown else run
