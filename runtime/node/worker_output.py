"""What a worker process prints: its stdout and stderr (two pipes) read into one
``LogCapture`` per attempt, up to the attempt's end markers (see ``runtime.node.worker``);
a flood past the capture's cap is read slowly, and output with no capture of its own goes to
the ``jetrun.worker`` logger, capped."""

from __future__ import annotations

import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator

import anyio
from anyio.abc import ByteReceiveStream

from contracts.logs import Stream
from runtime.infra.capture import LogCapture

log = logging.getLogger("jetrun.worker")

_STREAM_ENDED = (
    anyio.IncompleteRead,
    anyio.EndOfStream,
    anyio.ClosedResourceError,
    anyio.BrokenResourceError,
)
_READ_SIZE = 65_536
_OVER_CAP_PAUSE_S = 0.005  # past its cap a flood is read (and dropped) at <= 13 MB/s
# how long to wait for an attempt's end marker after its result; a worker that misses it is
# killed, so that what it printed late can never land in another attempt's logs
_END_GRACE_S = 5.0
_UNCAPTURED_MAX_BYTES = 65_536


class WorkerOutput(ABC):
    """A base class of ``PipelineWorker``: the reading of its child's output, on the worker's
    state declared here."""

    pointer: str
    _outputs: dict[Stream, ByteReceiveStream]
    _leftovers: dict[Stream, bytes]

    @abstractmethod
    async def kill(self) -> None:
        """Kill the worker process (one that missed its end markers is retired)."""

    def _uncaptured(self) -> LogCapture:
        return LogCapture(time.time, max_bytes=_UNCAPTURED_MAX_BYTES)

    @contextlib.asynccontextmanager
    async def _capturing(
        self, capture: LogCapture, *, own: bool, strict: bool = True
    ) -> AsyncIterator[None]:
        """Read the child's stdout and stderr into ``capture`` while the body runs, then until
        both end markers (for at most a short grace); ``capture`` is finished on the way out,
        and its lines logged if it is ``own``."""
        ended = {stream: anyio.Event() for stream in self._outputs}
        try:
            async with anyio.create_task_group() as tg:
                for stream, done in ended.items():
                    tg.start_soon(self._pump, capture, stream, done)
                yield
                with anyio.move_on_after(_END_GRACE_S):
                    for done in ended.values():
                        await done.wait()
                tg.cancel_scope.cancel()
                if strict and not all(done.is_set() for done in ended.values()):
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
                    extra = {"pipeline": self.pointer, "stream": line.stream}
                    log.info("%s: %s", self.pointer, line.text, extra=extra)

    async def _pump(self, capture: LogCapture, stream: Stream, ended: anyio.Event) -> None:
        """Feed ``stream`` into ``capture`` until its end marker (or the pipe closes)."""
        output = self._outputs[stream]
        try:
            data = self._leftovers.pop(stream, b"")
            done = capture.feed(data, stream) if data else False
            while not done:
                try:
                    data = await output.receive(_READ_SIZE)
                except _STREAM_ENDED:
                    break
                done = capture.feed(data, stream)
                if capture.over_cap:
                    await anyio.sleep(_OVER_CAP_PAUSE_S)  # a flood must not starve the agent
            self._leftovers[stream] = capture.leftover(stream)
        finally:
            ended.set()
