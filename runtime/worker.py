"""Attempts run in worker processes that the agent can kill.

The child is ``python -m runtime.worker <module> <pointer>``: it imports the pipeline module,
runs the startup step once (the cold start) and then serves runs one at a time. It talks over
its stdin and a duplicate of its original stdout, in length-prefixed msgpack frames; fd 1 is
pointed at stderr so a pipeline's prints cannot corrupt the protocol.
"""

from __future__ import annotations

import contextlib
import os
import struct
import subprocess
import sys
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, BinaryIO

import anyio
import msgspec
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from contracts.errors import ErrorType, RunError
from contracts.values import RunIO

_HEADER = struct.Struct(">I")


class Ready(msgspec.Struct, frozen=True, tag="ready"):
    pass


class StartupError(msgspec.Struct, frozen=True, tag="startup_error"):
    error: RunError


class RunRequest(msgspec.Struct, frozen=True, tag="run"):
    inputs: list[RunIO]


class Output(msgspec.Struct, frozen=True, tag="output"):
    index: int
    output: RunIO


class Result(msgspec.Struct, frozen=True, tag="result"):
    outputs: list[RunIO] | None = None
    error: RunError | None = None


Frame = Ready | StartupError | RunRequest | Output | Result
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Frame)

WorkerResult = Result
OnOutput = Callable[[int, RunIO], Awaitable[None]]


class StartupFailed(Exception):
    """The pipeline's startup step failed (or the worker died during it)."""

    def __init__(self, error: RunError) -> None:
        super().__init__(error.message)
        self.error = error


def error_of(exc: BaseException, kind: ErrorType = ErrorType.pipeline_error) -> RunError:
    """The run error for an exception: MemoryError is ``oom``, torch's OutOfMemoryError is
    ``cuda_oom``."""
    if isinstance(exc, MemoryError):
        kind = ErrorType.oom
    elif type(exc).__name__ == "OutOfMemoryError":
        kind = ErrorType.cuda_oom
    message = f"{type(exc).__name__}: {exc}"
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return RunError(type=kind, message=message, traceback=text)


# --- the parent side -----------------------------------------------------------------------


class PipelineWorker:
    """One worker process for one pipeline. Not safe for concurrent ``run`` calls."""

    def __init__(self, module: str, pointer: str) -> None:
        self.module = str(Path(module).resolve()) if module.endswith(".py") else module
        self.pointer = pointer
        self._proc: Process | None = None
        self._reader: BufferedByteReceiveStream | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self) -> None:
        """Spawn the process and wait for its startup step. Raises ``StartupFailed``."""
        self._proc = await anyio.open_process(
            [sys.executable, "-m", "runtime.worker", self.module, self.pointer],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            start_new_session=False,
        )
        assert self._proc.stdout is not None
        self._reader = BufferedByteReceiveStream(self._proc.stdout)
        frame = await self._receive()
        if isinstance(frame, StartupError):
            await self.kill()
            raise StartupFailed(frame.error)
        if not isinstance(frame, Ready):
            code = await self._exit_code()
            raise StartupFailed(
                RunError(
                    type=ErrorType.startup_error,
                    message=f"the worker process exited with code {code} during startup",
                )
            )

    async def run(self, inputs: list[RunIO], on_output: OnOutput | None = None) -> Result:
        """Run one attempt; blocks until it ends. Streamed outputs go to ``on_output`` as they
        come. A dead worker gives an ``unknown`` error."""
        assert self._proc is not None and self._proc.stdin is not None
        try:
            await self._proc.stdin.send(_frame(RunRequest(inputs)))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            return await self._died()
        while True:
            frame = await self._receive()
            if isinstance(frame, Output):
                if on_output is not None:
                    await on_output(frame.index, frame.output)
            elif isinstance(frame, Result):
                return frame
            else:
                return await self._died()

    async def kill(self) -> None:
        """SIGKILL the process and reap it. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        with anyio.CancelScope(shield=True):
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            await proc.wait()
            await proc.aclose()

    async def _receive(self) -> Frame | None:
        assert self._reader is not None
        try:
            header = await self._reader.receive_exactly(_HEADER.size)
            (size,) = _HEADER.unpack(header)
            frame: Frame = _decoder.decode(await self._reader.receive_exactly(size))
            return frame
        except (anyio.IncompleteRead, anyio.EndOfStream, anyio.ClosedResourceError):
            return None

    async def _exit_code(self) -> int | None:
        assert self._proc is not None
        with anyio.move_on_after(5):
            return await self._proc.wait()
        await self.kill()
        return self._proc.returncode

    async def _died(self) -> Result:
        code = await self._exit_code()
        return Result(
            error=RunError(
                type=ErrorType.unknown,
                message=f"the worker process exited with code {code} during the run",
            )
        )


def _frame(frame: Frame) -> bytes:
    body = _encoder.encode(frame)
    return _HEADER.pack(len(body)) + body


# --- the child side ------------------------------------------------------------------------


def _send(out: BinaryIO, frame: Frame) -> None:
    out.write(_frame(frame))
    out.flush()


def _read(inp: BinaryIO) -> Frame | None:
    header = inp.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    frame: Frame = _decoder.decode(inp.read(size))
    return frame


def serve(module: str, pointer: str) -> None:
    """The worker's main loop (in the child process)."""
    from runtime import pipelines

    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    inp = sys.stdin.buffer
    try:
        spec = pipelines.find(module, pointer)
        call = pipelines.start(spec)
    except BaseException as exc:
        _send(out, StartupError(error_of(exc, ErrorType.startup_error)))
        return
    _send(out, Ready())
    while (request := _read(inp)) is not None:
        if isinstance(request, RunRequest):
            _send(out, _attempt(spec, call, request.inputs, out))


def _attempt(spec: Any, call: Callable[..., Any], inputs: list[RunIO], out: BinaryIO) -> Result:
    from runtime import pipelines

    try:
        args = pipelines.validate_inputs(spec, inputs)
    except pipelines.InputError as exc:
        return Result(error=RunError(type=ErrorType.input_error, message=str(exc)))
    try:
        result = call(*args)
        if not pipelines.is_stream(result):
            return Result(outputs=pipelines.outputs_of(result))
        outputs = []
        for index, output in enumerate(pipelines.stream_outputs(result)):
            _send(out, Output(index, output))
            outputs.append(output)
        return Result(outputs=outputs)
    except Exception as exc:
        return Result(error=error_of(exc))


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2])
