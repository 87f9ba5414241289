"""Attempts run in worker processes that the agent can kill.

``PipelineWorker`` is the agent's side: it starts ``python -m runtime.node.worker_process
<module-spec> <pointer>`` (the child, and the frames both sides speak, are in
``runtime.node.worker_process``), waits for its startup step, and sends it one attempt at a
time.

The protocol runs over a socket pair (the child's stdin), so the child's stdout and stderr are
the pipeline's own, each a pipe the parent reads into one ``LogCapture`` per attempt that keeps
them apart: after its startup step and after each attempt the child flushes both and writes
the end marker of the nonce it was given on each (``JETRUN_LOG_MARKER`` for the startup step,
``RunRequest.log_marker`` for an attempt); before an attempt it flushes and writes that
attempt's start marker on each, and what came before it (printed after the previous attempt
ended, by a thread of its pipeline, say) is dropped: the next attempt may be another team's
run. Output with no capture of its own (the startup step, or ``run`` without ``output=``) goes
to the ``jetrun.worker`` logger, capped. The socket and both pipes are protocols of the event
loop (``runtime.node.worker_channel``, ``runtime.node.worker_output``): registered once for
the worker's life, read by callbacks, with no task per attempt; the attempt waits once per
frame. Between attempts a pipe that has something to read is paused: a pipeline printing from
a background thread then blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from types import TracebackType

import anyio
import msgspec

from contracts.errors import ErrorType, RunError
from contracts.values import RunIO
from runtime.infra.capture import LogCapture
from runtime.infra.lifetime import child_env
from runtime.node.worker_channel import FrameChannel, Gone
from runtime.node.worker_env import worker_env
from runtime.node.worker_output import WorkerPipes, log_lines, uncaptured
from runtime.node.worker_process import (
    MARKER_ENV,
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

_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent.parent)
PASS_ENV = "JETRUN_WORKER_ENV"  # names, comma-separated, the operator lets through to workers
# The OS user workers run as (the agent must be root to switch): then tenant code cannot read
# the agent's owner-only seed file, its /proc entries or signal it; and the interpreter that
# user runs (default: the agent's own, which that user may not be able to read)
USER_ENV = "JETRUN_WORKER_USER"
PYTHON_ENV = "JETRUN_WORKER_PYTHON"


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


def _as_user(user: str | None, argv: list[str]) -> list[str]:
    """``argv`` run as ``user`` (util-linux ``setpriv``, which then execs it: the worker keeps
    its pid; the event loop's subprocess support cannot switch users itself)."""
    if user is None:
        return argv
    import pwd

    entry = pwd.getpwnam(user)
    ids = [f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--init-groups"]
    return ["setpriv", *ids, "--", *argv]


def _home(user: str | None) -> str:
    """The workers' ``HOME``: the agent's, or that of the user they run as."""
    if user is None:
        return os.environ.get("HOME", "/")
    import pwd

    return pwd.getpwnam(user).pw_dir


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
    ) -> None:
        self.module = str(Path(module).resolve()) if module.endswith(".py") else module
        self.pointer = pointer
        self._env = dict(env or {})  # the agent's settings for this worker (its GPUs)
        self._declared = dict(declared or {})  # the pipeline's ``@pipeline(env=...)``
        self._pipes: WorkerPipes | None = None  # the child: its stdout, stderr and exit
        self._channel: FrameChannel | None = None  # the protocol: requests out, frames in
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
        startup = uncaptured()
        python = os.environ.get(PYTHON_ENV) or sys.executable
        argv = [python, "-m", "runtime.node.worker_process", self.module, self.pointer]
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        try:
            _, self._pipes = await loop.subprocess_exec(
                lambda: WorkerPipes(self.pointer),
                *_as_user(os.environ.get(USER_ENV) or None, argv),
                stdin=theirs.fileno(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env={**self._child_env(), MARKER_ENV: startup.nonce},
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
            theirs.close()
        try:
            frame = await self._exchange(None, None, startup, own=True, strict=False)
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
            home=_home(os.environ.get(USER_ENV) or None),
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
        If cancelled (e.g. by a timeout) or if ``on_output`` raises, the worker is killed and
        the exception propagates. Raises ``RuntimeError`` if the worker was never started.
        """
        if self._pipes is None:
            raise RuntimeError(f"worker for {self.pointer} was not started")
        capture = output or uncaptured()
        capture.expect_start()  # what was printed before this attempt began is not its
        try:
            request = frame_bytes(RunRequest(inputs=inputs, log_marker=capture.nonce))
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
                streamed.append(frame.output)
                if on_output is not None:
                    await on_output(frame.index, frame.output)
                return True
            return False

        try:
            frame = await self._exchange(request, on_frame, capture, own=own)
        except Gone as gone:
            code = await self._reap()
            message = str(gone) or _exited(code)
            return WorkerResult(
                outputs=streamed,
                error=RunError(type=ErrorType.unknown, message=message),
                streamed=len(streamed),
            )
        if isinstance(frame, Finished):
            return WorkerResult(outputs=streamed + frame.outputs, streamed=len(streamed))
        if isinstance(frame, Failed):
            return WorkerResult(outputs=streamed, error=frame.error, streamed=len(streamed))
        await self.kill()
        message = f"unexpected frame {type(frame).__name__} during a run"
        return WorkerResult(
            outputs=streamed,
            error=RunError(type=ErrorType.unknown, message=message),
            streamed=len(streamed),
        )

    async def _exchange(
        self,
        request: bytes | None,
        on_frame: Callable[[Frame], Awaitable[bool]] | None,
        capture: LogCapture,
        *,
        own: bool,
        strict: bool = True,
    ) -> Frame:
        """Send ``request`` (if any) and return the first frame ``on_frame`` does not take,
        with what the child prints going to ``capture`` meanwhile and until both its end
        markers came (for at most a short grace; a worker that misses them is killed when
        ``strict``). ``capture`` is finished on the way out, and its lines logged if ``own``.
        Raises ``Gone`` if the child stops answering first."""
        pipes, channel = self._pipes, self._channel
        assert pipes is not None and channel is not None
        pipes.begin(capture)
        try:
            if request is not None:
                channel.send(request)
            while True:
                frame = await channel.receive()
                if on_frame is None or not await on_frame(frame):
                    break
            if not await pipes.settle() and strict:
                log.warning("%s: no end of output in time; worker retired", self.pointer)
                await self.kill()
            return frame
        finally:
            pipes.release()
            capture.finish()
            if own:
                log_lines(self.pointer, capture)

    async def kill(self) -> None:
        """SIGKILL the child and reap it; blocks until it is reaped (shielded from
        cancellation). Idempotent; a no-op before ``start()``."""
        pipes = self._pipes
        if pipes is None or pipes.transport is None:
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
            finally:
                self._reaped.set()

    async def _reap(self) -> int | None:
        """The exit code of a child that stopped talking: wait up to 5 s, then kill it."""
        assert self._pipes is not None and self._pipes.transport is not None
        if self._reaped is None:
            with anyio.move_on_after(5):
                await self._pipes.exited.wait()
        await self.kill()
        return self._pipes.transport.get_returncode()


def _exited(code: int | None) -> str:
    if code is not None and code < 0:
        return f"the worker process exited with code {code} (killed by signal {-code})"
    return f"the worker process exited with code {code}"
