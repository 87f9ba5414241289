"""Attempts run in worker processes that the agent can kill.

``PipelineWorker`` is the agent's side: it starts ``python -m runtime.node.worker_process
<module-spec> <pointer>`` (the child, and the frames both sides speak, are in
``runtime.node.worker_process``), waits for its startup step, and sends it one attempt at a
time.

The child's frames come over a socket pair (the child's stdin), so the child's stdout and
stderr are the pipeline's own. Each attempt (and the startup step) gets two fresh pipes for them
(``runtime.node.worker_output``): the write ends go to the child over a second socket pair,
with ``SCM_RIGHTS``, in one message with the attempt's request; the read ends are read into the
attempt's ``LogCapture`` and closed once its reply came (the child flushes before it replies).
A thread or process of the pipeline that goes on printing after its attempt ended therefore
never reaches a later attempt's logs, which may be another team's run: a process writes into
pipes nobody reads, a thread's Python-level writes are dropped (``runtime.node.worker_stdio``).
The startup step's pipes stay open for the worker's life as the pipeline's own output (what
threads the startup step started print goes there, never into an attempt), logged to the
``jetrun.worker`` logger as it comes, capped (``PipelineLog``); so is the output of ``run``
without ``output=``. The protocol socket is a protocol of the event loop
(``runtime.node.worker_channel``) registered once for the worker's life, the pipes are read
by callbacks of the loop, with no task per attempt; the attempt waits once per frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import anyio
import msgspec

from contracts.errors import ErrorType, RunError
from contracts.values import RunIO
from runtime.infra.capture import LogCapture
from runtime.infra.lifetime import child_env
from runtime.node.results import too_large
from runtime.node.worker_channel import FrameChannel, Gone
from runtime.node.worker_env import PASS_ENV, PYTHON_ENV, USER_ENV, as_user, home_of, worker_env
from runtime.node.worker_output import AttemptOutput, PipelineLog, WorkerExit, log_lines, uncaptured
from runtime.node.worker_process import (
    OUTPUT_ENV,
    Failed,
    Finished,
    Frame,
    Output,
    Ready,
    RunRequest,
    StartupError,
    StartupFailed,
    error_of,
    frame_bytes,
    startup_error,
)

__all__ = ["PipelineWorker", "StartupFailed", "WorkerResult", "WorkerStatistics", "error_of"]

log = logging.getLogger("jetrun.worker")
_T = TypeVar("_T")

_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent.parent)


OnOutput = Callable[[int, RunIO], Awaitable[None]]


class WorkerResult(msgspec.Struct, frozen=True, kw_only=True):
    """How an attempt ended: its outputs, and ``error`` if it failed (outputs streamed before
    a failure are kept). The first ``streamed`` outputs were passed to ``on_output``."""

    outputs: list[RunIO] = msgspec.field(default_factory=list)
    error: RunError | None = None
    streamed: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None


class WorkerStatistics(msgspec.Struct, frozen=True, kw_only=True):
    pid: int | None
    alive: bool
    busy: bool
    runs: int  # attempts that ended, however they ended


# --- the parent side ----------------------------------------------------------------------


class PipelineWorker:
    """One child process serving one pipeline, one attempt at a time.

    Use ``async with PipelineWorker(...) as worker`` (start, then kill on exit), or call
    ``start()`` and ``kill()`` yourself. Concurrent ``run()`` calls queue behind each other.
    Needs anyio's asyncio backend (the child's pipes and socket are protocols of its loop).
    """

    def __init__(
        self,
        module: str,
        pointer: str,
        *,
        env: Mapping[str, str] | None = None,
        declared: Mapping[str, str] | None = None,
        max_output_bytes: Callable[[], int] | None = None,
    ) -> None:
        self.module = str(Path(module).resolve()) if module.endswith(".py") else module
        self.pointer = pointer
        self._env = dict(env or {})  # the agent's settings for this worker (its GPUs)
        self._declared = dict(declared or {})  # the pipeline's ``@pipeline(env=...)``
        self._max_output_bytes = max_output_bytes  # an event's limit: outputs weighed first
        self._pipes: WorkerExit | None = None  # the child's exit
        self._channel: FrameChannel | None = None  # the protocol: frames in
        self._output: socket.socket | None = None  # requests go out on it, with their pipes
        self._log: PipelineLog | None = None  # the startup step's pipes, for the worker's life
        self._lock = asyncio.Lock()  # taken at once when free (no checkpoint)
        self._reaped: anyio.Event | None = None
        self._busy = False
        self._runs = 0

    @property
    def _transport(self) -> asyncio.SubprocessTransport | None:
        return self._pipes.transport if self._pipes is not None else None

    @property
    def pid(self) -> int | None:
        transport = self._transport
        return transport.get_pid() if transport is not None else None

    @property
    def alive(self) -> bool:
        """Started and neither killed nor known to have exited."""
        transport = self._transport
        return transport is not None and self._reaped is None and transport.get_returncode() is None

    def statistics(self) -> WorkerStatistics:
        """A snapshot; does not block."""
        return WorkerStatistics(pid=self.pid, alive=self.alive, busy=self._busy, runs=self._runs)

    async def __aenter__(self) -> PipelineWorker:
        await self.start()
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.kill()

    async def start(self) -> None:
        """Spawn the child and block until its startup step has finished.

        Raises ``StartupFailed`` (the child is then reaped) and ``RuntimeError`` if called
        twice. If cancelled, the child is killed.
        """
        if self._pipes is not None:
            raise RuntimeError(f"worker for {self.pointer} was already started")
        python = os.environ.get(PYTHON_ENV) or sys.executable
        argv = [python, "-m", "runtime.node.worker_process", self.module, self.pointer]
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        self._output, their_output = socket.socketpair()
        self._output.setblocking(False)
        startup = self._log = PipelineLog(self.pointer)
        try:
            _, self._pipes = await loop.subprocess_exec(
                WorkerExit,
                *as_user(os.environ.get(USER_ENV) or None, argv),
                stdin=theirs.fileno(),
                stdout=startup.write_fds[0],
                stderr=startup.write_fds[1],
                pass_fds=(their_output.fileno(),),
                env={**self._child_env(), OUTPUT_ENV: str(their_output.fileno())},
            )
            _, self._channel = await loop.create_unix_connection(FrameChannel, sock=ours)
            # a child that exits ends the protocol, even if a process it forked holds it open
            self._pipes.on_exit = self._channel.worker_exited
            if self._pipes.exited.is_set():
                self._channel.worker_exited()
        except BaseException:
            ours.close()
            await self.kill()
            raise
        finally:
            startup.handed()
            theirs.close()
            their_output.close()
        try:
            frame = await self._exchange(None, None, None, own=False)
        except Gone:
            code = await self._reap()
            raise StartupFailed(startup_error(f"{_exited(code)} during startup")) from None
        except BaseException:
            await self.kill()
            raise
        if not isinstance(frame, Ready):
            await self.kill()
            error = frame.error if isinstance(frame, StartupError) else None
            raise StartupFailed(error or startup_error(f"unexpected first frame {frame!r}"))

    def _child_env(self) -> dict[str, str]:
        """Tenant code gets an allow-list of the agent's environment (never NATS addresses,
        credentials or jetrun's settings), the names the operator lets through in
        ``$JETRUN_WORKER_ENV``, what the pipeline declares (``@pipeline(env=...)``) and what
        the agent sets for this worker (its GPUs)."""
        passed = [n.strip() for n in os.environ.get(PASS_ENV, "").split(",") if n.strip()]
        env = worker_env(
            os.environ,
            declared=self._declared,
            passed=passed,
            package_root=_PACKAGE_ROOT,
            home=home_of(os.environ.get(USER_ENV) or None),
        )
        env.update(self._env)
        return child_env(env)  # the worker dies with its agent

    async def run(
        self,
        inputs: list[RunIO],
        on_output: OnOutput | None = None,
        output: LogCapture | None = None,
    ) -> WorkerResult:
        """Run one attempt; block until it ends and return how it ended.

        What the pipeline prints goes into ``output`` (finished when this returns; if None,
        to the ``jetrun.worker`` logger, capped). Streamed outputs are passed to
        ``on_output(index, output)`` as they come. Pipeline
        failures come back as ``WorkerResult.error`` (``input_error``, ``pipeline_error``,
        ``oom``, ``cuda_oom``, ``cuda_error``; ``unknown`` if the worker died or was killed).
        Outputs over ``max_output_bytes()`` (as JSON, weighed before they are decoded) fail
        the attempt ``pipeline_error`` "output too large" (a stream's worker is killed).
        If cancelled (e.g. by a timeout) or if ``on_output`` raises, the worker is killed and
        the exception propagates. Raises ``RuntimeError`` if the worker was never started.
        """
        if self._pipes is None:
            raise RuntimeError(f"worker for {self.pointer} was not started")
        capture = output or uncaptured()
        try:
            request = frame_bytes(RunRequest(inputs=inputs))
        except (TypeError, ValueError, OverflowError, RecursionError, msgspec.EncodeError) as exc:
            message = f"the inputs cannot be sent to the pipeline: {type(exc).__name__}: {exc}"
            return WorkerResult(error=RunError(type=ErrorType.input_error, message=message))
        async with self._lock:
            self._busy = True
            try:
                return await self._attempt(request, on_output, capture, own=output is None)
            except BaseException:
                await self.kill()
                raise
            finally:
                self._busy = False
                self._runs += 1

    async def _attempt(
        self, request: bytes, on_output: OnOutput | None, capture: LogCapture, *, own: bool
    ) -> WorkerResult:
        streamed: list[RunIO] = []

        async def on_frame(frame: Frame) -> bool:  # whether the attempt goes on
            if isinstance(frame, Output):
                output = self._outputs(frame.output, "an output", _run_io)
                streamed.append(output)
                if on_output is not None:
                    await on_output(frame.index, output)
                return True
            return False

        def ended(error: RunError | None = None, more: list[RunIO] | None = None) -> WorkerResult:
            outputs = streamed + (more or [])
            return WorkerResult(outputs=outputs, error=error, streamed=len(streamed))

        try:
            frame = await self._exchange(request, on_frame, capture, own=own)
        except Gone as gone:
            code = await self._reap()
            return ended(RunError(type=ErrorType.unknown, message=str(gone) or _exited(code)))
        except _TooLarge as large:  # mid-stream: the worker cannot be stopped but killed
            await self.kill()
            return ended(large.error)
        if isinstance(frame, Finished):
            try:
                return ended(more=self._outputs(frame.outputs, "the result", _run_ios))
            except _TooLarge as large:
                return ended(large.error)
            except Gone as gone:
                await self.kill()
                return ended(RunError(type=ErrorType.unknown, message=str(gone)))
        if isinstance(frame, Failed):
            return ended(frame.error)
        await self.kill()
        message = f"unexpected frame {type(frame).__name__} during a run"
        return ended(RunError(type=ErrorType.unknown, message=message))

    def _outputs(self, value: bytes, what: str, decoder: msgspec.json.Decoder[_T]) -> _T:
        """Outputs as the worker sent them (JSON), weighed before they are decoded: raises
        ``_TooLarge`` past the event limit, ``Gone`` if they are not what was sent."""
        limit = self._max_output_bytes() if self._max_output_bytes is not None else None
        if limit is not None and len(value) > limit:
            raise _TooLarge(too_large(what, len(value), limit))
        try:
            return decoder.decode(value)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise Gone(f"the worker process sent an unreadable output: {exc}") from None

    async def _exchange(
        self,
        request: bytes | None,
        on_frame: Callable[[Frame], Awaitable[bool]] | None,
        output: LogCapture | None,
        *,
        own: bool,
    ) -> Frame:
        """Send ``request`` (if any: with fresh pipes for the attempt's output) and return the
        first frame ``on_frame`` does not take, with what the child prints going to the
        capture meanwhile (none: the startup step, whose pipes are the worker's ``PipelineLog``).
        On the way out the pipes are read to their end and closed, the capture finished, and
        its lines logged if ``own``. Raises ``Gone`` if the child stops answering first."""
        channel = self._channel
        assert channel is not None
        pipes = AttemptOutput(output, channel.loop) if output is not None else None
        try:
            if request is not None and pipes is not None:
                sent = self._send(request, pipes)
                if sent < len(request):  # a large request: the rest as the worker reads it
                    await self._send_rest(memoryview(request)[sent:])
            while True:
                frame = await channel.receive()
                if on_frame is None or not await on_frame(frame):
                    return frame
        finally:
            if pipes is not None:
                capture = pipes.finish()
                if own:
                    log_lines(self.pointer, capture)

    def _send(self, request: bytes, output: AttemptOutput) -> int:
        """Send ``request`` with the attempt's pipes, in one message (see the module); returns
        how much of it went."""
        assert self._output is not None
        try:
            fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _TWO_FDS.pack(*output.write_fds))]
            return self._output.sendmsg([request], fds)
        except OSError as exc:  # the child is gone (or wedged with a full socket)
            raise Gone(f"the worker process cannot take its request: {exc}") from None
        finally:
            output.handed()

    async def _send_rest(self, rest: memoryview) -> None:
        assert self._output is not None and self._channel is not None
        try:
            await self._channel.loop.sock_sendall(self._output, rest)
        except OSError as exc:
            raise Gone(f"the worker process cannot take its request: {exc}") from None

    async def kill(self) -> None:
        """SIGKILL the child and reap it; blocks until it is reaped (shielded from
        cancellation). Idempotent; a no-op before ``start()``."""
        pipes = self._pipes
        if pipes is None or pipes.transport is None:
            if self._output is not None:  # a start that failed before the child ran
                self._output.close()
            if self._log is not None:
                self._log.finish()
            return
        if self._reaped is not None:
            await self._reaped.wait()
            return
        self._reaped = anyio.Event()
        with anyio.CancelScope(shield=True):
            try:
                if pipes.transport.get_returncode() is None:
                    with contextlib.suppress(ProcessLookupError):
                        pipes.transport.kill()
                await pipes.exited.wait()
                pipes.transport.close()
                if self._channel is not None:
                    self._channel.close()
                if self._output is not None:
                    self._output.close()
            finally:
                if self._log is not None:  # what the pipeline printed outside attempts
                    self._log.finish()
                self._reaped.set()

    async def _reap(self) -> int | None:
        """The exit code of a child that stopped talking: wait up to 5 s, then kill it."""
        assert self._pipes is not None and self._pipes.transport is not None
        if self._reaped is None:
            with anyio.move_on_after(5):
                await self._pipes.exited.wait()
        await self.kill()
        return self._pipes.transport.get_returncode()


class _TooLarge(Exception):
    def __init__(self, error: RunError) -> None:
        super().__init__(error.message)
        self.error = error


_TWO_FDS = struct.Struct("ii")
_run_io = msgspec.json.Decoder(RunIO)
_run_ios = msgspec.json.Decoder(list[RunIO])


def _exited(code: int | None) -> str:
    if code is not None and code < 0:
        return f"the worker process exited with code {code} (killed by signal {-code})"
    return f"the worker process exited with code {code}"
