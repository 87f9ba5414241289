"""Attempts run in worker processes that the agent can kill.

The child is ``python -m runtime.node.worker <module-spec> <pointer>``: it imports the pipeline
module, runs the startup step once (the cold start), reports ``Ready`` or ``StartupError``, then
serves run requests one at a time until its stdin closes. Frames are msgpack, each prefixed by
its length (4 bytes, big-endian). The child reads requests from a duplicate of its original
stdin and writes replies to a duplicate of its original stdout; fd 1 is then pointed at stderr
and fd 0 at /dev/null, so a pipeline's prints cannot corrupt the protocol.

What the pipeline prints (stdout and stderr, one pipe) is read by the parent into a
``LogCapture`` per attempt: after its startup step and after each attempt the child flushes
both and writes the end marker of the nonce it was given (``JETRUN_LOG_MARKER`` for the startup
step, ``RunRequest.log_marker`` for an attempt); before an attempt it flushes and writes that
attempt's start marker, and what came before it (printed after the previous attempt ended, by
a thread of its pipeline, say) is dropped: the next attempt may be another team's run. Output
with no capture of its own (the startup
step, or ``run`` without ``output=``) goes to the ``jetrun.worker`` logger, capped. Between
attempts nobody reads it: a pipeline printing from a background thread then blocks.

Child to parent: ``Ready``, ``StartupError``, then per run any number of ``Output`` (streamed,
one per ``yield``) and one ``Finished`` or ``Failed``. A run's outputs are the streamed ones
followed by ``Finished.outputs``.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import anyio
import msgspec
from anyio.abc import ByteReceiveStream, Process
from anyio.streams.buffered import BufferedByteReceiveStream

from contracts.errors import ErrorType, RunError
from contracts.values import RunIO
from runtime.infra.capture import LogCapture, marker_bytes, start_marker_bytes
from runtime.infra.lifetime import child_env, honour_parent
from runtime.node.worker_env import worker_env

log = logging.getLogger("jetrun.worker")

_HEADER = struct.Struct(">I")
_STREAM_ENDED = (
    anyio.IncompleteRead,
    anyio.EndOfStream,
    anyio.ClosedResourceError,
    anyio.BrokenResourceError,
)
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent.parent)
MARKER_ENV = "JETRUN_LOG_MARKER"
PASS_ENV = "JETRUN_WORKER_ENV"  # names, comma-separated, the operator lets through to workers
# The OS user workers run as (the agent must be root to switch): then tenant code cannot read
# the agent's owner-only seed file, its /proc entries or signal it; and the interpreter that
# user runs (default: the agent's own, which that user may not be able to read)
USER_ENV = "JETRUN_WORKER_USER"
PYTHON_ENV = "JETRUN_WORKER_PYTHON"
_READ_SIZE = 65_536
_OVER_CAP_PAUSE_S = 0.005  # past its cap a flood is read (and dropped) at <= 13 MB/s
# how long to wait for an attempt's end marker after its result; a worker that misses it is
# killed, so that what it printed late can never land in another attempt's logs
_END_GRACE_S = 5.0
_UNCAPTURED_MAX_BYTES = 65_536


class Ready(msgspec.Struct, frozen=True, kw_only=True, tag="ready"):
    pid: int


class StartupError(msgspec.Struct, frozen=True, kw_only=True, tag="startup_error"):
    error: RunError


class RunRequest(msgspec.Struct, frozen=True, kw_only=True, tag="run"):
    inputs: list[RunIO]
    log_marker: str = ""  # the nonce of this attempt's end-of-output marker


class Output(msgspec.Struct, frozen=True, kw_only=True, tag="output"):
    index: int
    output: RunIO


class Finished(msgspec.Struct, frozen=True, kw_only=True, tag="finished"):
    outputs: list[RunIO]


class Failed(msgspec.Struct, frozen=True, kw_only=True, tag="failed"):
    error: RunError


Frame = Ready | StartupError | RunRequest | Output | Finished | Failed
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Frame)

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


class StartupFailed(Exception):
    """The pipeline could not start: import failed, no such pointer, startup() raised, or the
    worker died during startup. ``error.type`` is ``startup_error``."""

    def __init__(self, error: RunError) -> None:
        super().__init__(error.message)
        self.error = error


class _Gone(Exception):
    """The worker stopped answering (exited, killed or sent garbage)."""


def error_of(exc: BaseException, kind: ErrorType = ErrorType.pipeline_error) -> RunError:
    """The run error for an exception: ``MemoryError`` is ``oom``, an ``OutOfMemoryError``
    class (torch.cuda) is ``cuda_oom``, a "CUDA error" is ``cuda_error``, else ``kind``."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    if "OutOfMemoryError" in names:
        kind = ErrorType.cuda_oom
    elif isinstance(exc, MemoryError):
        kind = ErrorType.oom
    elif "AcceleratorError" in names or str(exc).startswith("CUDA error"):
        kind = ErrorType.cuda_error
    text = str(exc)
    message = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return RunError(type=kind, message=message, traceback=_format_traceback(exc))


def _format_traceback(exc: BaseException) -> str:
    """The traceback without the worker's own leading frames."""
    ours = {__file__, str(Path(__file__).with_name("pipelines.py"))}
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None and tb.tb_frame.f_code.co_filename in ours:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def _frame(frame: Frame) -> bytes:
    body = _encoder.encode(frame)
    return _HEADER.pack(len(body)) + body


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
        self._process: Process | None = None
        self._reader: BufferedByteReceiveStream | None = None
        self._lock = anyio.Lock()
        self._reaped: anyio.Event | None = None
        self._busy = False
        self._runs = 0
        self._output: ByteReceiveStream | None = None
        self._output_leftover = b""

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def alive(self) -> bool:
        """Started and neither killed nor known to have exited."""
        return (
            self._process is not None and self._reaped is None and self._process.returncode is None
        )

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
        if self._process is not None:
            raise RuntimeError(f"worker for {self.pointer} was already started")
        startup = self._uncaptured()
        python = os.environ.get(PYTHON_ENV) or sys.executable
        argv = [python, "-m", "runtime.node.worker", self.module, self.pointer]
        self._process = await anyio.open_process(
            _as_user(os.environ.get(USER_ENV) or None, argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**self._child_env(), MARKER_ENV: startup.nonce},
        )
        assert self._process.stdout is not None
        self._reader = BufferedByteReceiveStream(self._process.stdout)
        self._output = self._process.stderr
        try:
            async with self._capturing(startup, own=True, strict=False):
                frame = await self._receive()
        except _Gone:
            code = await self._reap()
            raise StartupFailed(_startup_error(f"{_exited(code)} during startup")) from None
        except BaseException:
            await self.kill()
            raise
        if not isinstance(frame, Ready):
            await self.kill()
            error = frame.error if isinstance(frame, StartupError) else None
            raise StartupFailed(error or _startup_error(f"unexpected first frame {frame!r}"))

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
        if self._process is None:
            raise RuntimeError(f"worker for {self.pointer} was not started")
        capture = output or self._uncaptured()
        capture.expect_start()  # what was printed before this attempt began is not its
        try:
            request = _frame(RunRequest(inputs=inputs, log_marker=capture.nonce))
        except (TypeError, ValueError, OverflowError, RecursionError, msgspec.EncodeError) as exc:
            message = f"the inputs cannot be sent to the pipeline: {type(exc).__name__}: {exc}"
            return WorkerResult(error=RunError(type=ErrorType.input_error, message=message))
        async with self._lock:
            self._busy = True
            try:
                async with self._capturing(capture, own=output is None):
                    return await self._attempt(request, on_output)
            except BaseException:
                await self.kill()
                raise
            finally:
                self._busy = False
                self._runs += 1

    def _uncaptured(self) -> LogCapture:
        return LogCapture(time.time, max_bytes=_UNCAPTURED_MAX_BYTES)

    @contextlib.asynccontextmanager
    async def _capturing(
        self, capture: LogCapture, *, own: bool, strict: bool = True
    ) -> AsyncIterator[None]:
        """Read the child's output into ``capture`` while the body runs, then until the end
        marker (for at most a short grace); ``capture`` is finished on the way out, and its
        lines logged if it is ``own``."""
        ended = anyio.Event()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._pump, capture, ended)
                yield
                with anyio.move_on_after(_END_GRACE_S):
                    await ended.wait()
                tg.cancel_scope.cancel()
                if strict and not ended.is_set():  # its output is out of step: never reuse it
                    log.warning("%s: no end of output in time; worker retired", self.pointer)
                    await self.kill()
        except BaseExceptionGroup as group:  # the body's own exception, as if unwrapped
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        finally:
            capture.finish()
            if own:
                for line in capture.take():
                    log.info("%s: %s", self.pointer, line.text, extra={"pipeline": self.pointer})

    async def _pump(self, capture: LogCapture, ended: anyio.Event) -> None:
        try:
            if self._output_leftover:
                data, self._output_leftover = self._output_leftover, b""
                capture.feed(data)
            while not capture.done and self._output is not None:
                try:
                    data = await self._output.receive(_READ_SIZE)
                except _STREAM_ENDED:
                    break
                capture.feed(data)
                if capture.over_cap:
                    await anyio.sleep(_OVER_CAP_PAUSE_S)  # a flood must not starve the agent
            self._output_leftover = capture.leftover
        finally:
            ended.set()

    async def _attempt(self, request: bytes, on_output: OnOutput | None) -> WorkerResult:
        streamed: list[RunIO] = []
        try:
            await self._send(request)
            while True:
                frame = await self._receive()
                if isinstance(frame, Output):
                    streamed.append(frame.output)
                    if on_output is not None:
                        await on_output(frame.index, frame.output)
                elif isinstance(frame, Finished):
                    return WorkerResult(outputs=streamed + frame.outputs, streamed=len(streamed))
                elif isinstance(frame, Failed):
                    return WorkerResult(outputs=streamed, error=frame.error, streamed=len(streamed))
                else:
                    raise _Gone(f"unexpected frame {type(frame).__name__} during a run")
        except _Gone as gone:
            code = await self._reap()
            message = str(gone) or _exited(code)
            return WorkerResult(
                outputs=streamed,
                error=RunError(type=ErrorType.unknown, message=message),
                streamed=len(streamed),
            )

    async def kill(self) -> None:
        """SIGKILL the child and reap it; blocks until it is reaped (shielded from
        cancellation). Idempotent; a no-op before ``start()``."""
        process = self._process
        if process is None:
            return
        if self._reaped is not None:
            await self._reaped.wait()
            return
        self._reaped = anyio.Event()
        with anyio.CancelScope(shield=True):
            try:
                if process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                await process.wait()
                await process.aclose()
            finally:
                self._reaped.set()

    async def _reap(self) -> int | None:
        """The exit code of a child that stopped talking: wait up to 5 s, then kill it."""
        assert self._process is not None
        if self._reaped is None:
            with anyio.move_on_after(5):
                await self._process.wait()
        await self.kill()
        return self._process.returncode

    async def _send(self, data: bytes) -> None:
        assert self._process is not None and self._process.stdin is not None
        try:
            await self._process.stdin.send(data)
        except (*_STREAM_ENDED, OSError):
            raise _Gone() from None

    async def _receive(self) -> Frame:
        assert self._reader is not None
        try:
            header = await self._reader.receive_exactly(_HEADER.size)
            body = await self._reader.receive_exactly(_HEADER.unpack(header)[0])
        except _STREAM_ENDED:
            raise _Gone() from None
        try:
            frame: Frame = _decoder.decode(body)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise _Gone(f"the worker process sent an unreadable frame: {exc}") from None
        return frame


def _exited(code: int | None) -> str:
    if code is not None and code < 0:
        return f"the worker process exited with code {code} (killed by signal {-code})"
    return f"the worker process exited with code {code}"


def _startup_error(message: str, trace: str | None = None) -> RunError:
    return RunError(type=ErrorType.startup_error, message=message, traceback=trace)


# --- the child side -----------------------------------------------------------------------


class _Channel:
    """The child's end of the protocol; every call blocks."""

    def __init__(self, inp: BinaryIO, out: BinaryIO) -> None:
        self.inp, self.out = inp, out

    @classmethod
    def take_stdio(cls) -> _Channel:
        """Move the protocol off fds 0 and 1: fd 1 now goes to stderr, fd 0 reads /dev/null."""
        sys.stdout.flush()
        out = os.fdopen(os.dup(1), "wb")
        inp = os.fdopen(os.dup(0), "rb")
        os.dup2(2, 1)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        if isinstance(sys.stdout, io.TextIOWrapper):
            sys.stdout.reconfigure(line_buffering=True)
        return cls(inp, out)

    def send(self, frame: Frame) -> None:
        self.write(_frame(frame))

    @staticmethod
    def start_output(nonce: str) -> None:
        """Flush what was printed before this attempt, then mark where the attempt starts."""
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        if nonce:
            with contextlib.suppress(OSError):
                os.write(2, start_marker_bytes(nonce))

    @staticmethod
    def end_output(nonce: str) -> None:
        """Flush what the pipeline printed, then mark its end (see the module docstring)."""
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # a pipeline may have replaced or closed it
                stream.flush()
        if nonce:
            with contextlib.suppress(OSError):
                os.write(2, marker_bytes(nonce))

    def write(self, data: bytes) -> None:
        self.out.write(data)
        self.out.flush()

    def receive(self) -> RunRequest | None:
        """The next request, or None once the parent closed our stdin."""
        header = self.inp.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return None
        body = self.inp.read(_HEADER.unpack(header)[0])
        return msgspec.msgpack.decode(body, type=RunRequest)


def _encode_output(frame: Output | Finished) -> bytes:
    try:
        return _frame(frame)
    except (TypeError, ValueError, OverflowError, RecursionError, msgspec.EncodeError) as exc:
        raise ValueError(f"a pipeline output cannot be sent: {exc}") from exc


def _startup(module: str, pointer: str) -> tuple[Any, Callable[..., Any]]:
    """Load the pipeline and run its startup step; raises ``StartupFailed``."""
    from runtime.node import pipelines

    try:
        specs = pipelines.load_module(module)
    except (Exception, SystemExit) as exc:
        error = error_of(exc, ErrorType.startup_error)
        message = f"could not import {module}: {error.message}"
        raise StartupFailed(_startup_error(message, error.traceback)) from exc
    spec = next((s for s in specs if s.pointer == pointer), None)
    if spec is None:
        known = ", ".join(s.pointer for s in specs) or "none"
        raise StartupFailed(_startup_error(f"{module} has no pipeline {pointer} (it has: {known})"))
    try:
        return spec, pipelines.instantiate(spec)
    except (Exception, SystemExit) as exc:
        error = error_of(exc)
        raise StartupFailed(_startup_error(error.message, error.traceback)) from exc


def _serve_one(channel: _Channel, spec: Any, call: Callable[..., Any], request: RunRequest) -> None:
    from runtime.node import pipelines

    marker = request.log_marker
    channel.start_output(marker)
    try:
        args = pipelines.validate_inputs(spec, request.inputs)
    except pipelines.InputError as exc:
        channel.end_output(marker)
        channel.send(Failed(error=RunError(type=ErrorType.input_error, message=str(exc))))
        return
    try:
        result = call(*args)
        if inspect.isgenerator(result):
            for index, output in enumerate(pipelines.outputs(result)):
                channel.write(_encode_output(Output(index=index, output=output)))
            reply = _encode_output(Finished(outputs=[]))
        else:
            reply = _encode_output(Finished(outputs=list(pipelines.outputs(result))))
    except (Exception, SystemExit) as exc:
        reply = _frame(Failed(error=error_of(exc)))
    channel.end_output(marker)
    channel.write(reply)


def main(argv: list[str] | None = None) -> int:
    """The child's entry point: blocks serving runs until stdin closes; returns the exit code."""
    honour_parent()
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m runtime.node.worker <module-or-file.py> <pointer>", file=sys.stderr)
        return 2
    startup_marker = os.environ.pop(MARKER_ENV, "")
    channel = _Channel.take_stdio()
    try:
        try:
            spec, call = _startup(*args)
        except StartupFailed as failed:
            channel.end_output(startup_marker)
            channel.send(StartupError(error=failed.error))
            return 1
        channel.end_output(startup_marker)
        channel.send(Ready(pid=os.getpid()))
        while (request := channel.receive()) is not None:
            _serve_one(channel, spec, call, request)
    except (KeyboardInterrupt, BrokenPipeError):
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
