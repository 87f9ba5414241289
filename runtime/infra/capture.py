"""Capturing what a pipeline prints, one attempt at a time, within a cap. Pure: no I/O.

A worker's stdout and stderr come on two pipes, each read into its own stream of lines. At the
end of each attempt (and of its startup step) the worker flushes both and writes an end marker
on each, carrying a nonce the agent chose for that attempt, so output is attributed to the
attempt that printed it and a pipeline that prints marker-like text cannot end another
attempt's capture. The capture is ``done`` once every stream's end marker was seen.

Both streams share one cap: each line costs its length plus ``LINE_OVERHEAD`` bytes against it,
so a flood of empty lines is bounded too. Past the cap, output is counted and dropped, and the
capture ends with a truncation marker line (on stderr).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

from contracts.logs import STDERR, STDOUT, LogLine, Stream, truncation_marker

LINE_OVERHEAD = 32
DEFAULT_MAX_BYTES = 1_048_576
MAX_LINE_BYTES = 16_384
STREAMS: tuple[Stream, ...] = (STDOUT, STDERR)


class _Nonces:
    """Unpredictable nonces of 16 hex digits, drawn from the OS 64 at a time (one system call
    per 64 attempts instead of one each)."""

    def __init__(self, batch: int = 64) -> None:
        self.batch = batch
        self._pool = ""
        self._at = 0

    def take(self) -> str:
        if self._at >= len(self._pool):
            self._pool, self._at = secrets.token_hex(8 * self.batch), 0
        nonce = self._pool[self._at : self._at + 16]
        self._at += 16
        return nonce


_nonces = _Nonces()


def new_marker() -> tuple[str, bytes]:
    """A fresh nonce and the end-marker bytes the worker writes for it."""
    nonce = _nonces.take()
    return nonce, marker_bytes(nonce)


def marker_bytes(nonce: str) -> bytes:
    return b"\x1ejetrun-end " + nonce.encode() + b"\n"


def start_marker_bytes(nonce: str) -> bytes:
    """Written by the worker when it begins the attempt of ``nonce`` (see ``expect_start``)."""
    return b"\x1ejetrun-start " + nonce.encode() + b"\n"


class _Split:
    """One stream's state: the partial line, whether its start and end markers were seen."""

    def __init__(self) -> None:
        self.partial = b""
        self.done = False
        self.started = True
        self.leftover = b""  # bytes after the end marker: the next capture's


class LogCapture:
    """Splits each stream's output into ``LogLine``s until its end marker; ``feed`` never
    blocks. Lines come out of ``take`` in the order read, each naming its stream."""

    def __init__(
        self,
        now: Callable[[], float],
        *,
        nonce: str | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_line_bytes: int = MAX_LINE_BYTES,
    ) -> None:
        self.nonce = nonce or _nonces.take()
        self.marker = marker_bytes(self.nonce)
        self._start_marker = start_marker_bytes(self.nonce)
        self.now = now
        self.max_bytes = max_bytes
        self.max_line_bytes = max_line_bytes
        self.kept_bytes = 0
        self.dropped_bytes = 0
        self.stray_bytes = 0  # dropped before the start marker (printed between attempts)
        self._splits = {stream: _Split() for stream in STREAMS}
        self._lines: list[LogLine] = []
        self._finished = False

    @property
    def over_cap(self) -> bool:
        return self.dropped_bytes > 0

    @property
    def done(self) -> bool:
        """Every stream's end marker was seen (or ``finish`` was called)."""
        return all(split.done for split in self._splits.values())

    def leftover(self, stream: Stream) -> bytes:
        """What ``stream`` carried after its end marker: the next capture's."""
        return self._splits[stream].leftover

    def expect_start(self) -> None:
        """Drop what comes before this attempt's start marker: output printed between two
        attempts (a pipeline's thread after its run returned) belongs to neither, and the
        next attempt may be another team's run. Call before the first ``feed``."""
        for split in self._splits.values():
            split.started = False

    def feed(self, data: bytes, stream: Stream = STDOUT) -> bool:
        """Take output bytes of ``stream``; True once its end marker was seen."""
        split = self._splits[stream]
        if not split.started:
            data = self._until_start(split, data)
            if not split.started:
                return False
        if split.done:
            split.leftover += data
            return True
        buf = split.partial + data
        at = buf.find(self.marker)
        if at >= 0:
            split.leftover = buf[at + len(self.marker) :]
            split.partial = b""
            self._complete(buf[:at], stream, final=True)
            split.done = True
            return True
        cut = buf.rfind(b"\n") + 1
        split.partial = buf[cut:]
        self._complete(buf[:cut], stream, final=False)
        self._bound_partial(split, stream)
        return False

    def _until_start(self, split: _Split, data: bytes) -> bytes:
        """The bytes after the start marker (``started`` then); before it, they are dropped
        but for a tail that may be the start of a marker split across two reads."""
        buf, marker = split.partial + data, self._start_marker
        at = buf.find(marker)
        if at < 0:
            keep = min(len(buf), len(marker) - 1)
            self.stray_bytes += len(buf) - keep
            split.partial = buf[len(buf) - keep :]
            return b""
        self.stray_bytes += at
        split.started, split.partial = True, b""
        return buf[at + len(marker) :]

    def finish(self) -> None:
        """The attempt's output ended (markers seen, or the worker exited): flush the last
        partial lines and add the truncation marker if anything was dropped. Idempotent."""
        if self._finished:
            return
        self._finished = True
        for stream, split in self._splits.items():
            split.done = True
            if split.started:
                self._complete(split.partial, stream, final=True)
            else:  # held back in case a start marker straddled two reads: it never came
                self.stray_bytes += len(split.partial)
            split.partial = b""
        if self.dropped_bytes:
            marker = truncation_marker(self.dropped_bytes, self.max_bytes)
            self._lines.append(LogLine(at=self.now(), text=marker, stream=STDERR))

    @property
    def has_lines(self) -> bool:
        """Lines were captured since the last ``take``."""
        return bool(self._lines)

    def take(self) -> list[LogLine]:
        """The lines captured since the last call."""
        lines, self._lines = self._lines, []
        return lines

    def _complete(self, data: bytes, stream: Stream, *, final: bool) -> None:
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
            self._keep(part, stream, at)

    def _keep(self, part: bytes, stream: Stream, at: float) -> None:
        cost = len(part) + LINE_OVERHEAD
        if self.over_cap or self.kept_bytes + cost > self.max_bytes:
            self.dropped_bytes += len(part) + 1
            return
        self.kept_bytes += cost
        text = part.decode("utf-8", errors="replace").rstrip("\r")
        self._lines.append(LogLine(at=at, text=text, stream=stream))

    def _bound_partial(self, split: _Split, stream: Stream) -> None:
        """A line with no newline in sight is cut into pieces; the tail stays for a marker
        that may straddle two reads."""
        limit, keep = self.max_line_bytes, len(self.marker) - 1
        while len(split.partial) - limit >= keep:
            head, split.partial = split.partial[:limit], split.partial[limit:]
            if self.over_cap:
                self.dropped_bytes += len(head)
            else:
                self._keep(head, stream, self.now())
