"""A run's captured output (its pipeline's stdout and stderr, each line naming its stream),
as stored and as served.

Agents store ``LogChunk``s, one or more per attempt; the API serves ``RunLogLine``s. A chunk's
``index`` orders the chunks of one attempt and makes a resent chunk idempotent.
"""

from __future__ import annotations

from typing import Literal

import msgspec

STDOUT: Literal["stdout"] = "stdout"
STDERR: Literal["stderr"] = "stderr"
Stream = Literal["stdout", "stderr"]


class LogLine(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    at: float  # when the agent read it (Unix seconds)
    text: str  # one line, without its newline
    stream: Stream = STDOUT  # which of the pipeline's streams printed it (older chunks: stdout)


class LogChunk(msgspec.Struct, frozen=True, kw_only=True):
    run_id: str
    attempt: int
    index: int
    lines: list[LogLine] = msgspec.field(default_factory=list)
    dropped_bytes: int = 0  # > 0 on the last chunk of an attempt that hit its cap

    def message_id(self) -> str:
        return f"{self.run_id}:{self.attempt}:{self.index}"


class RunLogLine(msgspec.Struct, frozen=True, kw_only=True):
    """One line of ``GET /v4/runs/{id}/logs`` (and of its NDJSON follow stream)."""

    attempt: int
    at: float
    text: str
    stream: Stream = STDOUT


class RunLogs(msgspec.Struct, frozen=True, kw_only=True):
    """``GET /v4/runs/{id}/logs``: every captured line, attempts in order. ``truncated`` says
    that an attempt printed more than its cap; a marker line says how much was dropped."""

    run_id: str
    state: str
    lines: list[RunLogLine]
    truncated: bool = False


def truncation_marker(dropped_bytes: int, cap_bytes: int) -> str:
    return f"[jetrun: output truncated: {dropped_bytes} more bytes dropped (cap {cap_bytes} bytes)]"


def lines_of(chunk: LogChunk) -> list[RunLogLine]:
    return [
        RunLogLine(attempt=chunk.attempt, at=line.at, text=line.text, stream=line.stream)
        for line in chunk.lines
    ]
