"""Capturing what a pipeline prints, one attempt at a time, within a cap. Pure: no I/O.

A worker's stdout and stderr share one pipe (in the order written). At the end of each attempt
(and of its startup step) the worker flushes both and writes an end marker carrying a nonce the
agent chose for that attempt, so output is attributed to the attempt that printed it and a
pipeline that prints marker-like text cannot end another attempt's capture.

Each line costs its length plus ``LINE_OVERHEAD`` bytes against the cap, so a flood of empty
lines is bounded too. Past the cap, output is counted and dropped, and the capture ends with a
truncation marker line.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

from contracts.logs import LogLine, truncation_marker

LINE_OVERHEAD = 32
DEFAULT_MAX_BYTES = 1_048_576
MAX_LINE_BYTES = 16_384


def new_marker() -> tuple[str, bytes]:
    """A fresh nonce and the end-marker bytes the worker writes for it."""
    nonce = secrets.token_hex(8)
    return nonce, marker_bytes(nonce)


def marker_bytes(nonce: str) -> bytes:
    return b"\x1ejetrun-end " + nonce.encode() + b"\n"


def start_marker_bytes(nonce: str) -> bytes:
    """Written by the worker when it begins the attempt of ``nonce`` (see ``expect_start``)."""
    return b"\x1ejetrun-start " + nonce.encode() + b"\n"


class LogCapture:
    """Splits output into ``LogLine``s until the end marker; ``feed`` never blocks."""

    def __init__(
        self,
        now: Callable[[], float],
        *,
        nonce: str | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_line_bytes: int = MAX_LINE_BYTES,
    ) -> None:
        self.nonce = nonce or new_marker()[0]
        self.marker = marker_bytes(self.nonce)
        self.now = now
        self.max_bytes = max_bytes
        self.max_line_bytes = max_line_bytes
        self.kept_bytes = 0
        self.dropped_bytes = 0
        self.done = False
        self.leftover = b""  # bytes after the end marker: the next capture's
        self.started = True  # False: bytes before the start marker are dropped
        self.stray_bytes = 0  # dropped before the start marker (printed between attempts)
        self._partial = b""
        self._lines: list[LogLine] = []
        self._finished = False

    @property
    def over_cap(self) -> bool:
        return self.dropped_bytes > 0

    def expect_start(self) -> None:
        """Drop what comes before this attempt's start marker: output printed between two
        attempts (a pipeline's thread after its run returned) belongs to neither, and the
        next attempt may be another team's run. Call before the first ``feed``."""
        self.started = False

    def feed(self, data: bytes) -> bool:
        """Take output bytes; True once the end marker was seen (then call ``finish``)."""
        if not self.started:
            data = self._until_start(data)
            if not self.started:
                return False
        if self.done:
            self.leftover += data
            return True
        buf = self._partial + data
        at = buf.find(self.marker)
        if at >= 0:
            self.leftover = buf[at + len(self.marker) :]
            buf, self._partial = buf[:at], b""
            self._complete(buf, final=True)
            self.done = True
            return True
        cut = buf.rfind(b"\n") + 1
        self._partial = buf[cut:]
        self._complete(buf[:cut], final=False)
        self._bound_partial()
        return False

    def _until_start(self, data: bytes) -> bytes:
        """The bytes after the start marker (``started`` then); before it, they are dropped
        but for a tail that may be the start of a marker split across two reads."""
        buf, marker = self._partial + data, start_marker_bytes(self.nonce)
        at = buf.find(marker)
        if at < 0:
            keep = min(len(buf), len(marker) - 1)
            self.stray_bytes += len(buf) - keep
            self._partial = buf[len(buf) - keep :]
            return b""
        self.stray_bytes += at
        self.started, self._partial = True, b""
        return buf[at + len(marker) :]

    def finish(self) -> None:
        """The attempt's output ended (marker seen, or the worker exited): flush the last
        partial line and add the truncation marker if anything was dropped. Idempotent."""
        if self._finished:
            return
        self._finished = self.done = True
        if self._partial:
            self._complete(self._partial, final=True)
            self._partial = b""
        if self.dropped_bytes:
            marker = truncation_marker(self.dropped_bytes, self.max_bytes)
            self._lines.append(LogLine(at=self.now(), text=marker))

    def take(self) -> list[LogLine]:
        """The lines captured since the last call."""
        lines, self._lines = self._lines, []
        return lines

    def _complete(self, data: bytes, *, final: bool) -> None:
        if not data:
            return
        if self.over_cap:
            self.dropped_bytes += len(data)
            return
        parts = data.split(b"\n")
        if not final or parts[-1] == b"":
            parts.pop()  # the empty piece after the last newline
        at = self.now()
        for part in parts:
            self._keep(part, at)

    def _keep(self, part: bytes, at: float) -> None:
        cost = len(part) + LINE_OVERHEAD
        if self.over_cap or self.kept_bytes + cost > self.max_bytes:
            self.dropped_bytes += len(part) + 1
            return
        self.kept_bytes += cost
        text = part.decode("utf-8", errors="replace").rstrip("\r")
        self._lines.append(LogLine(at=at, text=text))

    def _bound_partial(self) -> None:
        """A line with no newline in sight is cut into pieces; the tail stays for a marker
        that may straddle two reads."""
        limit, keep = self.max_line_bytes, len(self.marker) - 1
        while len(self._partial) - limit >= keep:
            head, self._partial = self._partial[:limit], self._partial[limit:]
            if self.over_cap:
                self.dropped_bytes += len(head)
            else:
                self._keep(head, self.now())
