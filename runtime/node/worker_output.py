"""What a worker process prints: the agent's side of its stdout and stderr.

Every attempt gets two fresh pipes (and so does the startup step, whose pipes then stay open
for the worker's life as the pipeline's own output: ``PipelineLog``): the agent keeps their
read ends, registered with the event loop (one callback per read feeds the attempt's
``LogCapture``; no task), and hands the write ends to the worker (see
``runtime.node.worker_stdio`` for the child's side). The worker flushes what the pipeline
printed before it replies, so once the reply came ``finish`` reads what the pipes hold at that
moment (``FIONREAD``) and closes them: output lands in the attempt that printed it, and
whatever writes to those pipes later (a process the pipeline forked that goes on printing)
writes into a pipe nobody reads (``EPIPE``), never into a later attempt's capture, which may be
another team's run of the same pipeline.

The pipes are watched from ``WATCH_AFTER_S`` into the attempt on (an attempt that ends sooner,
as most short ones do, costs no registration with the loop: its output waits in the pipes,
which hold 64 KiB, for ``finish``; one that prints more first waits up to that long). Past the
capture's cap a flood is read slowly (a pipe is not read for a while after each read,
longer for a longer read), so it slows only the pipeline that prints it.
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import logging
import os
import termios
import time
from collections.abc import Callable

from contracts.logs import STDERR, STDOUT, Stream
from runtime.infra.capture import STREAMS, LogCapture

log = logging.getLogger("jetrun.worker")

_READ_SIZE = 65_536
_OVER_CAP_PAUSE_S = 0.005  # per 64 KiB read past its cap: a flood is read at <= 13 MB/s
UNCAPTURED_MAX_BYTES = 65_536
PIPELINE_LOG_WINDOW_S = 60.0  # the pipeline's own output: UNCAPTURED_MAX_BYTES per window
WATCH_AFTER_S = 0.01


def uncaptured() -> LogCapture:
    """A capture for output that has no attempt of its own (logged, capped)."""
    return LogCapture(time.time, max_bytes=UNCAPTURED_MAX_BYTES)


class WorkerExit(asyncio.SubprocessProtocol):
    """The agent's end of one worker process: when it exits. Its stdout and stderr are each
    attempt's ``AttemptOutput``."""

    def __init__(self) -> None:
        self.transport: asyncio.SubprocessTransport | None = None
        self.exited = asyncio.Event()
        self.on_exit: Callable[[], None] | None = None  # called once the child exited

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's: no subclass

    def process_exited(self) -> None:
        self.exited.set()
        if self.on_exit is not None:
            self.on_exit()


class AttemptOutput:
    """One attempt's stdout and stderr: two pipes read into ``capture`` until ``finish``.
    ``write_fds`` go to the worker; ``handed`` closes the agent's copies."""

    def __init__(self, capture: LogCapture, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.capture = capture
        self._loop = loop or asyncio.get_running_loop()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        self.write_fds: tuple[int, int] = (out_w, err_w)
        self._fds: dict[Stream, int] = {STDOUT: out_r, STDERR: err_r}
        self._reading: set[Stream] = set()
        for fd in self._fds.values():
            os.set_blocking(fd, False)
        self._watch = self._loop.call_later(WATCH_AFTER_S, self._read_both)

    def handed(self) -> None:
        """The worker has the write ends (or will never get them): close ours."""
        fds, self.write_fds = self.write_fds, ()  # type: ignore[assignment]
        for fd in fds:
            os.close(fd)

    def finish(self) -> LogCapture:
        """Read what the pipes hold now (all the worker wrote before its reply), close them and
        finish the capture (returned). Idempotent."""
        self.handed()
        self._watch.cancel()
        for stream, fd in self._fds.items():
            self._stop(stream)
            self._drain(stream, fd, _available(fd))
            os.close(fd)
        self._fds = {}
        self.capture.finish()
        return self.capture

    def _on_readable(self, stream: Stream) -> None:
        try:
            data = os.read(self._fds[stream], _READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # every write end is closed: nothing more can come
            self._stop(stream)
            return
        self.capture.feed(data, stream)
        if self.capture.over_cap:  # a flood must not starve the agent
            self._stop(stream)
            pause = _OVER_CAP_PAUSE_S * max(1.0, len(data) / _READ_SIZE)
            self._loop.call_later(pause, self._read_again, stream)

    def _drain(self, stream: Stream, fd: int, size: int) -> None:
        while size > 0:
            try:
                data = os.read(fd, min(size, _READ_SIZE))
            except OSError:
                return
            if not data:
                return
            size -= len(data)
            self.capture.feed(data, stream)

    def _read_both(self) -> None:
        for stream in STREAMS:
            self._read_again(stream)

    def _read_again(self, stream: Stream) -> None:
        if stream in self._fds and stream not in self._reading:
            self._reading.add(stream)
            self._loop.add_reader(self._fds[stream], self._on_readable, stream)

    def _stop(self, stream: Stream) -> None:
        if stream in self._reading:
            self._reading.discard(stream)
            self._loop.remove_reader(self._fds[stream])


class PipelineLog(AttemptOutput):
    """The pipeline's own output, for the worker's life: the startup step's pipes, which the
    worker keeps for what belongs to no attempt (the startup step, threads it started, programs
    it ran then). Its lines go to the ``jetrun.worker`` logger as they come, never into a run:
    at most ``UNCAPTURED_MAX_BYTES`` per ``PIPELINE_LOG_WINDOW_S``, the rest counted and
    dropped (a truncation marker line ends each window that dropped some)."""

    def __init__(self, pointer: str, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(uncaptured())
        self.pointer = pointer
        self._clock = clock
        self._since = clock()

    def _on_readable(self, stream: Stream) -> None:
        if self.capture.over_cap and self._clock() - self._since >= PIPELINE_LOG_WINDOW_S:
            self.capture.finish()
            log_lines(self.pointer, self.capture)
            self.capture, self._since = uncaptured(), self._clock()
        super()._on_readable(stream)
        log_lines(self.pointer, self.capture)

    def finish(self) -> LogCapture:
        """Read what the pipes hold, close them and log the last lines. Idempotent."""
        capture = super().finish()
        log_lines(self.pointer, capture)
        return capture


def _available(fd: int) -> int:
    """How many bytes the pipe ``fd`` holds."""
    size = array.array("i", [0])
    try:
        fcntl.ioctl(fd, termios.FIONREAD, size, True)
    except OSError:
        return 0
    return size[0]


def log_lines(pointer: str, capture: LogCapture) -> None:
    """What a worker printed outside any attempt, to the ``jetrun.worker`` logger."""
    for line in capture.take():
        extra = {"pipeline": pointer, "stream": line.stream}
        log.info("%s: %s", pointer, line.text, extra=extra)
