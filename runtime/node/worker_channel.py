"""The agent's end of a worker's protocol socket: frames in (requests go out with their
attempt's pipes on a second socket, see ``runtime.node.worker``).

A protocol of the event loop: the socket stays registered for reading for the worker's life,
each read is one callback that splits complete frames off the buffer (length-prefixed msgpack,
see ``runtime.node.worker_process``), and a waiting ``receive`` wakes once per frame.

What a worker sends is bounded, whatever its pipeline does: a frame may be at most
``MAX_FRAME_BYTES`` (more than any event the log can take: NATS caps ``max_payload`` at
64 MiB), announced larger it ends the channel before a byte of it is kept; and while
``MAX_QUEUED`` frames, or ``MAX_QUEUED_BYTES`` of them, wait to be received the socket is not
read, so a pipeline that streams outputs faster than they are appended waits for them.

Once the worker process exits, what it wrote is read and then nothing more is awaited (within
``EXIT_GRACE_S``): a process its pipeline forked may hold the socket open for as long as it
likes, and must not hold the attempt with it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import cast

import msgspec

from runtime.node.worker_process import HEADER, Frame, decoder

MAX_FRAME_BYTES = 72 * 1024 * 1024
MAX_QUEUED = 64
MAX_QUEUED_BYTES = 16 * 1024 * 1024  # of frames waiting (the first is taken whatever its size)
EXIT_GRACE_S = 1.0  # after the worker exited, for what it wrote to be read


class Gone(Exception):
    """The worker stopped answering (exited, killed or sent garbage)."""


class FrameChannel(asyncio.Protocol):
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()  # made by the loop's create_unix_connection
        self.transport: asyncio.Transport | None = None
        self._chunks: list[bytes] = []  # received, not yet a whole frame
        self._size = 0  # their length
        self._need = HEADER.size  # how many bytes the next frame needs, once known
        self._frames: deque[tuple[Frame, int]] = deque()  # with their sizes
        self._queued_bytes = 0
        self._gone: Gone | None = None  # set once nothing more can come
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._exit_due = False  # the worker exited and its grace is over while paused

    # --- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's: no subclass

    def data_received(self, data: bytes) -> None:
        if self._gone is not None:
            return
        self._chunks.append(data)
        self._size += len(data)
        if self._size < self._need:  # a frame that came in pieces is joined once, whole
            return
        buffer = b"".join(self._chunks) if len(self._chunks) > 1 else data
        view, start = memoryview(buffer), 0
        while len(buffer) - start >= HEADER.size:
            size = HEADER.unpack_from(buffer, start)[0]
            if size > MAX_FRAME_BYTES:
                self._stop(Gone(_too_large(size)))
                return
            end = start + HEADER.size + size
            if len(buffer) < end:
                break
            try:
                self._frames.append((decoder.decode(view[start + HEADER.size : end]), size))
            except (msgspec.DecodeError, RecursionError) as exc:
                self._stop(Gone(f"the worker process sent an unreadable frame: {exc}"))
                return
            self._queued_bytes += size
            start = end
        rest = buffer[start:] if start else buffer
        self._chunks = [rest] if rest else []
        self._size = len(rest)
        self._need = HEADER.size
        if len(rest) >= HEADER.size:
            self._need += HEADER.unpack_from(rest)[0]
        if self._frames:
            full = len(self._frames) >= MAX_QUEUED or self._queued_bytes >= MAX_QUEUED_BYTES
            if full and self.transport is not None:
                self._paused = True
                self.transport.pause_reading()
            self._wake()

    def eof_received(self) -> bool:
        self._stop(Gone())
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop(Gone())

    # --- the agent's side ----------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Frames received and not yet taken by ``receive``."""
        return len(self._frames)

    async def receive(self) -> Frame:
        """The next frame; raises ``Gone`` once none can come."""
        while not self._frames:
            if self._gone is not None:
                raise self._gone
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        frame, size = self._frames.popleft()
        self._queued_bytes -= size
        if self._paused and self._drained() and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
            if self._exit_due:
                self._exit_due = False
                self.worker_exited()
        return frame

    def _drained(self) -> bool:
        """Few enough frames wait to read the socket again."""
        return len(self._frames) <= MAX_QUEUED // 2 and self._queued_bytes <= MAX_QUEUED_BYTES // 2

    def worker_exited(self) -> None:
        """The worker process exited: the channel ends once what it wrote before has been
        read (``EXIT_GRACE_S``; longer while frames wait to be taken and the socket is not
        read), even if a process it forked still holds the socket open."""
        if self._gone is None:
            self.loop.call_later(EXIT_GRACE_S, self._exit_grace_over)

    def _exit_grace_over(self) -> None:
        if self._paused:  # what is still in the socket is read once frames are taken
            self._exit_due = True
        else:
            self._stop(Gone())

    def close(self) -> None:
        """Close the socket (the worker reads end of file). Idempotent."""
        if self.transport is not None:
            self.transport.close()
        self._stop(Gone())

    def _stop(self, gone: Gone) -> None:
        if self._gone is None:
            self._gone = gone
            self._chunks, self._size = [], 0
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


def _too_large(size: int) -> str:
    return (
        f"the worker process sent a frame of {size:,} bytes; at most {MAX_FRAME_BYTES:,} are"
        " taken (no event of the log can be that large)"
    )
