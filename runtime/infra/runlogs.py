"""Per-run logs: what a pipeline printed, per attempt, stored in the ``JETRUN_LOGS`` stream.

Subjects are ``jetrun.logs.<run_id>.<attempt>``; one message is a ``LogChunk`` (msgpack) with
``Nats-Msg-Id = <run_id>:<attempt>:<index>``, so a resent chunk is stored once. The stream keeps
messages as long as the event log keeps events (the same ``max_age``). An agent publishes an
attempt's chunks while it runs (every ``flush_s``) and its last chunk before it reports the
attempt's result, so once a run is terminal its logs are complete (except after a cancel or a
lost node, where the last lines may come a moment later, or never). An attempt that prints
nothing publishes nothing.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import anyio
import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from contracts.logs import LogChunk, LogLine
from runtime.infra.capture import DEFAULT_MAX_BYTES, LogCapture
from runtime.infra.clock import Clock
from runtime.infra.eventlog import LogSettings
from runtime.infra.jsretry import retrying
from runtime.infra.streams import LOGS_PREFIX, LOGS_STREAM, logs_config
from runtime.infra.streamsetup import ensure_stream, require_stream

log = logging.getLogger("jetrun.runlogs")

CHUNK_BYTES = 128 * 1024  # the text of one message, at most (JetStream's payload limit is 1 MB)
PUBLISH_DEADLINE_S = 10.0  # a chunk that cannot be stored in this long is dropped
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(LogChunk)


def log_subject(run_id: str, attempt: int) -> str:
    return f"{LOGS_PREFIX}.{run_id}.{attempt}"


def run_log_subjects(run_id: str) -> str:
    return f"{LOGS_PREFIX}.{run_id}.*"


class LogStore:
    """Store and read run logs. Safe to share within one process."""

    def __init__(self, js: JetStreamContext, settings: LogSettings | None = None) -> None:
        self.js = js
        self.settings = settings or LogSettings()

    def stream_config(self) -> api.StreamConfig:
        s = self.settings
        return logs_config(
            replicas=s.replicas,
            duplicate_window_s=s.duplicate_window_s,
            max_age_s=s.max_age_s,
            max_msg_size=4 * CHUNK_BYTES,
        )

    async def ensure(self) -> None:
        """Create the stream, or bring its config up to date. Idempotent."""
        await ensure_stream(self.js, self.stream_config(), self.settings.setup_deadline_s)

    async def require(self) -> None:
        """Wait until the stream exists (``jetrun setup`` creates it)."""
        await require_stream(self.js, LOGS_STREAM, self.settings.setup_deadline_s)

    async def append(self, chunk: LogChunk, deadline_s: float = PUBLISH_DEADLINE_S) -> None:
        """Store one chunk; blocks until stored, retrying outages for ``deadline_s``."""
        subject = log_subject(chunk.run_id, chunk.attempt)
        headers = {"Nats-Msg-Id": chunk.message_id()}
        payload = _encoder.encode(chunk)

        async def publish() -> api.PubAck:
            return await self.js.publish(subject, payload, headers=headers)

        await retrying(f"append {subject}", publish, deadline_s)

    async def read(self, run_id: str) -> list[LogChunk]:
        """Every stored chunk of one run, in the order stored."""
        chunks: list[LogChunk] = []
        async with self._consumer(run_id) as psub:
            info = await psub.consumer_info()
            pending = info.num_pending or 0
            while pending > 0:
                batch = await psub.fetch(min(pending, 256), timeout=5.0)
                pending -= len(batch)
                chunks.extend(c for c in map(_decode, batch) if c is not None)
        return chunks

    async def follow(self, run_id: str, ended: Callable[[], bool]) -> AsyncIterator[LogChunk]:
        """Every chunk of one run, then new ones as they are stored, until ``ended()`` was
        true before a read that found nothing more."""
        async with self._consumer(run_id) as psub:
            while True:
                was_ended = ended()
                try:
                    batch = await psub.fetch(256, timeout=0.2 if was_ended else 1.0)
                except (nats.errors.TimeoutError, TimeoutError):  # nats-py raises either
                    batch = []
                except nats.errors.Error as err:  # disconnected: the consumer waits for us
                    log.warning("following logs of %s: %r", run_id, err)
                    await anyio.sleep(0.5)
                    continue
                for chunk in map(_decode, batch):
                    if chunk is not None:
                        yield chunk
                if was_ended and not batch:
                    return

    @contextlib.asynccontextmanager
    async def _consumer(self, run_id: str) -> AsyncIterator[JetStreamContext.PullSubscription]:
        config = api.ConsumerConfig(
            ack_policy=api.AckPolicy.NONE,
            deliver_policy=api.DeliverPolicy.ALL,
            inactive_threshold=30.0,
            mem_storage=True,
        )
        js = self.js
        psub = await js.pull_subscribe(run_log_subjects(run_id), stream=LOGS_STREAM, config=config)
        try:
            yield psub
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                name = (await psub.consumer_info()).name
                await psub.unsubscribe()
                await js.delete_consumer(LOGS_STREAM, name)


def _decode(msg: Msg) -> LogChunk | None:
    try:
        return _decoder.decode(msg.data)
    except msgspec.MsgspecError as err:
        log.warning("skipping undecodable log chunk: %s", err)
        return None


class AttemptLog:
    """One attempt's output on its way to the store: the worker feeds ``capture``; a
    ``LogFlusher`` publishes new lines every ``flush_s`` while it is open; ``close`` publishes
    the rest. It has no task of its own: an attempt that prints nothing publishes nothing."""

    def __init__(
        self,
        store: LogStore,
        run_id: str,
        attempt: int,
        clock: Clock,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self.store, self.run_id, self.attempt = store, run_id, attempt
        self.capture = LogCapture(clock.now, max_bytes=max_bytes)
        self.closed = False
        self._index = 0
        self._lock: anyio.Lock | None = None  # one flush at a time: chunks are stored in order

    @property
    def flushing(self) -> bool:
        return self._lock is not None and self._lock.locked()

    def _flushes(self) -> anyio.Lock:
        if self._lock is None:
            self._lock = anyio.Lock(fast_acquire=True)
        return self._lock

    async def flush(self) -> None:
        """Publish the lines captured so far (none: nothing is published)."""
        async with self._flushes():
            if not self.closed:
                await self._flush(final=False)

    async def close(self) -> None:
        """Finish the capture and publish what is left (shielded, bounded). Idempotent."""
        if self.closed:
            return
        if not self.flushing:  # nothing in flight: an attempt that printed nothing is done
            self.closed = True
            self.capture.finish()
            if not self.capture.has_lines and not self.capture.dropped_bytes:
                return
        with anyio.CancelScope(shield=True), anyio.move_on_after(PUBLISH_DEADLINE_S + 5):
            async with self._flushes():
                self.closed = True
                self.capture.finish()
                await self._flush(final=True)

    async def _flush(self, *, final: bool) -> None:
        lines = self.capture.take()
        dropped = self.capture.dropped_bytes if final else 0
        pieces = list(_pieces(lines))
        if final and dropped and not pieces:
            pieces = [[]]
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            chunk = LogChunk(
                run_id=self.run_id,
                attempt=self.attempt,
                index=self._index,
                lines=piece,
                dropped_bytes=dropped if last else 0,
            )
            self._index += 1
            try:
                await self.store.append(chunk)
            except Exception as err:
                log.warning("dropped %d log lines of %s: %r", len(piece), self.run_id, err)


class LogFlusher:
    """Publishes the new lines of every open ``AttemptLog`` every ``flush_s``: one task for
    all of a process's attempts (``run``), idle while none is open."""

    def __init__(self, flush_s: float = 0.25) -> None:
        self.flush_s = flush_s
        self._open: set[AttemptLog] = set()
        self._wake = anyio.Event()

    def open(self, attempt_log: AttemptLog) -> AttemptLog:
        self._open.add(attempt_log)
        self._wake.set()
        return attempt_log

    async def close(self, attempt_log: AttemptLog) -> None:
        """Stop flushing it, and publish what is left (see ``AttemptLog.close``)."""
        self._open.discard(attempt_log)
        await attempt_log.close()

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            while True:
                if not self._open:
                    await self._wake.wait()
                    self._wake = anyio.Event()
                    continue
                await anyio.sleep(self.flush_s)
                for attempt_log in list(self._open):
                    if attempt_log.capture.has_lines and not attempt_log.flushing:
                        tg.start_soon(attempt_log.flush)


def _pieces(lines: list[LogLine]) -> list[list[LogLine]]:
    pieces: list[list[LogLine]] = []
    piece: list[LogLine] = []
    size = 0
    for line in lines:
        if piece and size + len(line.text) > CHUNK_BYTES:
            pieces.append(piece)
            piece, size = [], 0
        piece.append(line)
        size += len(line.text) + 16
    if piece:
        pieces.append(piece)
    return pieces
