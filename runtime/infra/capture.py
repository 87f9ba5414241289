"""Capturing what a pipeline prints, one attempt at a time, within a cap. Pure: no I/O.

A worker's stdout and stderr come on two pipes per attempt (see ``runtime.node.worker_output``),
each read into its own stream of lines; ``finish`` ends the capture once the attempt's pipes
are read and closed.

Both streams share one cap: each line costs its length plus ``LINE_OVERHEAD`` bytes against it,
so a flood of empty lines is bounded too. Past the cap, output is counted and dropped, and the
capture ends with a truncation marker line (on stderr).
"""

from __future__ import annotations

from collections.abc import Callable

from contracts.logs import STDERR, STDOUT, LogLine, Stream, truncation_marker

LINE_OVERHEAD = 32
DEFAULT_MAX_BYTES = 1_048_576
MAX_LINE_BYTES = 16_384
STREAMS: tuple[Stream, ...] = (STDOUT, STDERR)


class LogCapture:
    """Splits each stream's output into ``LogLine``s; ``feed`` never blocks. Lines come out
    of ``take`` in the order read, each naming its stream."""

    def __init__(
        self,
        now: Callable[[], float],
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_line_bytes: int = MAX_LINE_BYTES,
    ) -> None:
        self.now = now
        self.max_bytes = max_bytes
        self.max_line_bytes = max_line_bytes
        self.kept_bytes = 0
        self.dropped_bytes = 0
        self._partial: dict[Stream, bytes] = {stream: b"" for stream in STREAMS}
        self._lines: list[LogLine] = []
        self._finished = False

    @property
    def over_cap(self) -> bool:
        return self.dropped_bytes > 0

    def feed(self, data: bytes, stream: Stream = STDOUT) -> None:
        """Take output bytes of ``stream`` (ignored once finished)."""
        if self._finished:
            return
        buf = self._partial[stream] + data
        cut = buf.rfind(b"\n") + 1
        self._partial[stream] = buf[cut:]
        self._complete(buf[:cut], stream, final=False)
        self._bound_partial(stream)

    def finish(self) -> None:
        """The attempt's output ended: flush the last partial lines and add the truncation
        marker if anything was dropped. Idempotent."""
        if self._finished:
            return
        self._finished = True
        for stream, partial in self._partial.items():
            self._complete(partial, stream, final=True)
            self._partial[stream] = b""
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

    def _bound_partial(self, stream: Stream) -> None:
        """A line with no newline in sight is cut into pieces."""
        limit = self.max_line_bytes
        while len(self._partial[stream]) > limit:
            partial = self._partial[stream]
            head, self._partial[stream] = partial[:limit], partial[limit:]
            if self.over_cap:
                self.dropped_bytes += len(head)
            else:
                self._keep(head, stream, self.now())
