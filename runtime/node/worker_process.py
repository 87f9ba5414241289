"""The worker process: ``python -m runtime.node.worker_process <module-spec> <pointer>``.

It imports the pipeline module, runs the startup step once (the cold start), reports ``Ready``
or ``StartupError``, then serves run requests one at a time until the agent closes its
request socket. Frames are msgpack, each prefixed by its length (4 bytes, big-endian). Its
stdin is a socket (one end of a socket pair): the child writes its frames to a duplicate of
it, and fd 0 then reads /dev/null, so a pipeline's prints (fds 1 and 2) cannot corrupt the
protocol. fds 1 and 2 are pipes the agent reads: the startup step's, given at spawn, then each
attempt's own, whose write ends come in one message with its request (``SCM_RIGHTS``) on a
second socket (fd ``$JETRUN_OUTPUT_FD``; one message: one syscall on each side per attempt);
between attempts they are /dev/null (see ``runtime.node.worker_stdio``). What the pipeline
printed is flushed before each reply, so the agent has it all once the reply came.

Child to parent: ``Ready``, ``StartupError``, then per run any number of ``Output`` (streamed,
one per ``yield``) and one ``Finished`` or ``Failed``. A run's outputs are the streamed ones
followed by ``Finished.outputs``, carried as JSON (the bytes their event carries, weighed by the
agent before it decodes them). This module holds the frames both sides speak and the child's
side; it imports nothing the child does not need.
"""

from __future__ import annotations

import array
import inspect
import io
import os
import socket
import struct
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from contracts.errors import ErrorType, RunError
from contracts.values import RunIO
from runtime.infra.lifetime import honour_parent
from runtime.node import pipelines
from runtime.node.worker_stdio import Stdio

HEADER = struct.Struct(">I")
OUTPUT_ENV = "JETRUN_OUTPUT_FD"  # the socket each attempt's stdout and stderr pipes come on


class Ready(msgspec.Struct, frozen=True, kw_only=True, tag="ready"):
    pid: int


class StartupError(msgspec.Struct, frozen=True, kw_only=True, tag="startup_error"):
    error: RunError


class RunRequest(msgspec.Struct, frozen=True, kw_only=True, tag="run"):
    inputs: list[RunIO]


class Output(msgspec.Struct, frozen=True, kw_only=True, tag="output"):
    index: int
    output: bytes  # the RunIO as JSON, as its event carries it (see ``Finished``)


class Finished(msgspec.Struct, frozen=True, kw_only=True, tag="finished"):
    """``outputs`` is a JSON array of RunIO, as the event carries it: every frame has a fixed
    shape of a few fields, so the agent decodes one into about its own size in memory and
    weighs the outputs before it decodes them (a frame of many tiny values cannot cost it
    more than an event the log can take)."""

    outputs: bytes = b"[]"


class Failed(msgspec.Struct, frozen=True, kw_only=True, tag="failed"):
    error: RunError


Frame = Ready | StartupError | RunRequest | Output | Finished | Failed
encoder = msgspec.msgpack.Encoder()
decoder = msgspec.msgpack.Decoder(Frame)


class StartupFailed(Exception):
    """The pipeline could not start: import failed, no such pointer, startup() raised, or the
    worker died during startup. ``error.type`` is ``startup_error``."""

    def __init__(self, error: RunError) -> None:
        super().__init__(error.message)
        self.error = error


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


def frame_bytes(frame: Frame) -> bytes:
    body = encoder.encode(frame)
    return HEADER.pack(len(body)) + body


def startup_error(message: str, trace: str | None = None) -> RunError:
    return RunError(type=ErrorType.startup_error, message=message, traceback=trace)


# --- the child side -----------------------------------------------------------------------


class _Channel:
    """The child's end of the protocol; every call blocks. A frame goes out in one write of
    the socket (no buffer in between: each is whole and sent at once). A request comes in
    one message with its attempt's pipes (``SCM_RIGHTS``) on ``requests``."""

    def __init__(self, out: socket.socket, requests: socket.socket) -> None:
        self.out, self.requests = out, requests

    @classmethod
    def take_stdio(cls, requests: int | None) -> _Channel:
        """Move the protocol (a socket) off fd 0, which then reads /dev/null; fds 1 and 2 stay
        the pipeline's stdout and stderr. Requests come on the fd ``requests`` (the protocol
        socket if None)."""
        sys.stdout.flush()
        out = socket.socket(fileno=os.dup(0))
        inbound = socket.socket(fileno=requests if requests is not None else os.dup(0))
        inbound.setblocking(True)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        if isinstance(sys.stdout, io.TextIOWrapper):
            sys.stdout.reconfigure(line_buffering=True)
        return cls(out, inbound)

    def send(self, frame: Frame) -> None:
        self.write(frame_bytes(frame))

    def write(self, data: bytes) -> None:
        self.out.sendall(data)

    def receive(self) -> tuple[RunRequest, list[int]] | None:
        """The next request and the fds that came with it (its attempt's stdout and stderr),
        or None once the agent closed the socket."""
        data, ancillary, _, _ = self.requests.recvmsg(_FIRST_READ, _FDS_SPACE)
        fds = array.array("i")
        for level, kind, item in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(item[: len(item) - len(item) % fds.itemsize])
        size = len(data)
        end = HEADER.size + HEADER.unpack_from(data)[0] if size >= HEADER.size else -1
        frame = memoryview(data)[HEADER.size : end] if 0 < end <= size else self._whole(data)
        if frame is None:
            for fd in fds:
                os.close(fd)
            return None
        return _requests.decode(frame), fds.tolist()

    def _whole(self, data: bytes) -> memoryview | None:
        """The body of the frame ``data`` begins (the rest read as it comes); None at EOF."""
        buffer = bytearray(data)
        while len(buffer) < HEADER.size:
            more = self.requests.recv(_FIRST_READ)
            if not more:
                return None
            buffer += more
        end = HEADER.size + HEADER.unpack_from(buffer)[0]
        while len(buffer) < end:
            more = self.requests.recv(end - len(buffer))
            if not more:
                return None
            buffer += more
        return memoryview(buffer)[HEADER.size : end]


_FIRST_READ = 16_384
_FDS_SPACE = socket.CMSG_SPACE(2 * array.array("i").itemsize)
_requests = msgspec.msgpack.Decoder(RunRequest)
_Received = tuple[RunRequest, list[int]]
_values = msgspec.json.Encoder()


def output_bytes(output: RunIO | list[RunIO]) -> bytes:
    """Outputs as the frames carry them (JSON); raises ``ValueError`` if they cannot be sent."""
    try:
        return _values.encode(output)
    except (TypeError, ValueError, OverflowError, RecursionError, msgspec.EncodeError) as exc:
        raise ValueError(f"a pipeline output cannot be sent: {exc}") from exc


def _startup(module: str, pointer: str) -> tuple[Any, Callable[..., Any]]:
    """Load the pipeline and run its startup step; raises ``StartupFailed``."""
    try:
        specs = pipelines.load_module(module)
    except (Exception, SystemExit) as exc:
        error = error_of(exc, ErrorType.startup_error)
        message = f"could not import {module}: {error.message}"
        raise StartupFailed(startup_error(message, error.traceback)) from exc
    spec = next((s for s in specs if s.pointer == pointer), None)
    if spec is None:
        known = ", ".join(s.pointer for s in specs) or "none"
        raise StartupFailed(startup_error(f"{module} has no pipeline {pointer} (it has: {known})"))
    try:
        return spec, pipelines.instantiate(spec)
    except (Exception, SystemExit) as exc:
        error = error_of(exc)
        raise StartupFailed(startup_error(error.message, error.traceback)) from exc


def _serve_one(
    channel: _Channel, stdio: Stdio, spec: Any, call: Callable[..., Any], received: _Received
) -> None:
    request, fds = received
    stdio.begin(fds)
    try:
        args = pipelines.validate_inputs(spec, request.inputs)
    except pipelines.InputError as exc:
        stdio.end()
        channel.send(Failed(error=RunError(type=ErrorType.input_error, message=str(exc))))
        return
    try:
        result = call(*args)
        if inspect.isgenerator(result):
            for index, output in enumerate(pipelines.outputs(result)):
                channel.write(frame_bytes(Output(index=index, output=output_bytes(output))))
            reply = frame_bytes(Finished())
        else:
            outputs = output_bytes(list(pipelines.outputs(result)))
            reply = frame_bytes(Finished(outputs=outputs))
    except (Exception, SystemExit) as exc:
        reply = frame_bytes(Failed(error=error_of(exc)))
    stdio.end()
    channel.write(reply)


def main(argv: list[str] | None = None) -> int:
    """The child's entry point: blocks serving runs until stdin closes; returns the exit code."""
    honour_parent()
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        usage = "usage: python -m runtime.node.worker_process <module-or-file.py> <pointer>"
        print(usage, file=sys.stderr)
        return 2
    output = os.environ.pop(OUTPUT_ENV, "")
    if output:
        os.set_inheritable(int(output), False)  # not for the programs a pipeline runs
    channel = _Channel.take_stdio(int(output) if output else None)
    stdio = Stdio()
    stdio.install()
    try:
        try:
            spec, call = _startup(*args)
        except StartupFailed as failed:
            stdio.end()
            channel.send(StartupError(error=failed.error))
            return 1
        stdio.end()
        channel.send(Ready(pid=os.getpid()))
        while (received := channel.receive()) is not None:
            _serve_one(channel, stdio, spec, call, received)
    except (KeyboardInterrupt, BrokenPipeError):
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
