"""What a worker process prints: its stdout and stderr, two pipes read by callbacks of the
event loop into the ``LogCapture`` of the attempt under way, up to the attempt's end markers
(see ``runtime.node.worker``). No task reads them: a read is one callback that feeds the
capture, so an attempt that prints nothing costs its markers alone.

Past the capture's cap a flood is read slowly (a pipe is paused after each read, longer for a
longer read), so it slows only the pipeline that prints it. Output read while no capture wants
it (printed between two attempts, or after an attempt's end marker) is held for the next
capture, which drops what comes before its start marker, and that pipe is paused until then:
a pipeline printing from a background thread between attempts blocks, as no one reads it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import cast

import anyio

from contracts.logs import STDERR, STDOUT, Stream
from runtime.infra.capture import LogCapture

log = logging.getLogger("jetrun.worker")

_STREAM_OF_FD: dict[int, Stream] = {1: STDOUT, 2: STDERR}
_FD_OF_STREAM: dict[Stream, int] = {STDOUT: 1, STDERR: 2}
_READ_SIZE = 65_536
_OVER_CAP_PAUSE_S = 0.005  # per 64 KiB read past its cap: a flood is read at <= 13 MB/s
# how long to wait for an attempt's end marker after its result; a worker that misses it is
# killed, so that what it printed late can never land in another attempt's logs
END_GRACE_S = 5.0
UNCAPTURED_MAX_BYTES = 65_536


def uncaptured() -> LogCapture:
    """A capture for output that has no attempt of its own (logged, capped)."""
    return LogCapture(time.time, max_bytes=UNCAPTURED_MAX_BYTES)


class WorkerPipes(asyncio.SubprocessProtocol):
    """The agent's end of one worker process: its stdout and stderr fed to the capture set by
    ``begin``, and its exit. Callbacks of the event loop; never blocks."""

    def __init__(self, pointer: str) -> None:
        self.pointer = pointer
        self.transport: asyncio.SubprocessTransport | None = None
        self.exited = asyncio.Event()
        self.capture: LogCapture | None = None
        self._open: set[Stream] = {STDOUT, STDERR}  # pipes not closed by the child
        self._ended: set[Stream] = set()  # streams whose end the current capture saw
        self._held: dict[Stream, bytes] = {}  # read while no capture wanted it
        self._paused: set[Stream] = set()
        self._waiter: asyncio.Future[None] | None = None
        self.on_exit: Callable[[], None] | None = None  # called once the child exited

    # --- asyncio.SubprocessProtocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.SubprocessTransport, transport)  # uvloop's: no subclass

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        stream = _STREAM_OF_FD.get(fd)
        if stream is not None:
            self._feed(stream, data)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        stream = _STREAM_OF_FD.get(fd)
        if stream is not None:
            self._open.discard(stream)
            self._paused.discard(stream)
            if self.capture is not None:
                self._end(stream)

    def process_exited(self) -> None:
        self.exited.set()
        if self.on_exit is not None:
            self.on_exit()

    # --- attempts ------------------------------------------------------------------------

    @property
    def ended(self) -> bool:
        """Both streams of the current capture ended (their end markers, or closed pipes)."""
        return len(self._ended) == len(_STREAM_OF_FD)

    def begin(self, capture: LogCapture) -> None:
        """Feed what the child prints to ``capture`` from now on (what was held first)."""
        self.capture = capture
        self._ended = {s for s in _FD_OF_STREAM if s not in self._open}
        self._waiter = None
        for stream in _FD_OF_STREAM:
            held = self._held.pop(stream, b"")
            self._resume(stream)
            if held:
                self._feed(stream, held)

    async def settle(self, grace_s: float = END_GRACE_S) -> bool:
        """Wait up to ``grace_s`` until both streams ended; whether they did."""
        if not self.ended:
            self._waiter = asyncio.get_running_loop().create_future()
            with anyio.move_on_after(grace_s):
                await self._waiter
        return self.ended

    def release(self) -> LogCapture | None:
        """Stop feeding the current capture (returned); later output is held."""
        capture, self.capture, self._waiter = self.capture, None, None
        return capture

    def _feed(self, stream: Stream, data: bytes) -> None:
        capture = self.capture
        if capture is None or stream in self._ended:
            self._hold(stream, data)
        elif capture.feed(data, stream):
            self._end(stream)
            rest = capture.leftover(stream)
            if rest:
                self._hold(stream, rest)
        elif capture.over_cap:  # a flood must not starve the agent
            self._pause(stream)
            pause = _OVER_CAP_PAUSE_S * max(1.0, len(data) / _READ_SIZE)
            asyncio.get_running_loop().call_later(pause, self._resume_for, capture, stream)

    def _hold(self, stream: Stream, data: bytes) -> None:
        self._held[stream] = self._held.get(stream, b"") + data
        self._pause(stream)

    def _end(self, stream: Stream) -> None:
        self._ended.add(stream)
        waiter = self._waiter
        if self.ended and waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _resume_for(self, capture: LogCapture, stream: Stream) -> None:
        if self.capture is capture and stream not in self._ended:
            self._resume(stream)

    def _pause(self, stream: Stream) -> None:
        pipe = self._pipe(stream)
        if pipe is not None and stream not in self._paused:
            self._paused.add(stream)
            pipe.pause_reading()

    def _resume(self, stream: Stream) -> None:
        pipe = self._pipe(stream)
        if pipe is not None and stream in self._paused:
            self._paused.discard(stream)
            pipe.resume_reading()

    def _pipe(self, stream: Stream) -> asyncio.ReadTransport | None:
        if self.transport is None or stream not in self._open:
            return None
        return cast(
            asyncio.ReadTransport | None, self.transport.get_pipe_transport(_FD_OF_STREAM[stream])
        )


def log_lines(pointer: str, capture: LogCapture) -> None:
    """What a worker printed outside any attempt, to the ``jetrun.worker`` logger."""
    for line in capture.take():
        extra = {"pipeline": pointer, "stream": line.stream}
        log.info("%s: %s", pointer, line.text, extra=extra)
