"""``GET /v4/runs/{id}/logs``: a run's captured output as JSON, or followed as NDJSON or SSE.

The gateway checks the caller's team first (another team's run is a 404, like a missing one).
``?follow=1`` streams every stored line, then new ones, until the run is terminal and its logs
are read to the end: NDJSON (one ``RunLogLine`` per line) by default, Server-Sent Events when
the request accepts ``text/event-stream`` (``event: line`` per line, then ``event: end``).
Each line names its stream (``stdout`` or ``stderr``); ``?stream=stderr`` keeps one of them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from contracts.logs import STDERR, STDOUT, LogChunk, RunLogLine, RunLogs, Stream, lines_of
from contracts.run import RunRecord
from runtime.control.http_input import error
from runtime.infra.runlogs import LogStore

_encoder = msgspec.json.Encoder()
_STREAMS: dict[str, Stream] = {STDOUT: STDOUT, STDERR: STDERR}


def wants_follow(request: Request) -> bool:
    return request.query_params.get("follow", "").lower() in ("1", "true", "yes")


def stream_filter(request: Request) -> Stream | None:
    """``?stream=stdout|stderr``: only that stream's lines (422 for anything else)."""
    wanted = request.query_params.get("stream") or None
    if wanted is None:
        return None
    if (stream := _STREAMS.get(wanted)) is not None:
        return stream
    raise error(422, "invalid_field", "stream must be stdout or stderr", "stream")


def _lines(chunk: LogChunk, stream: Stream | None) -> list[RunLogLine]:
    lines = lines_of(chunk)
    return lines if stream is None else [line for line in lines if line.stream == stream]


async def read_logs(store: LogStore, run: RunRecord, stream: Stream | None = None) -> RunLogs:
    chunks = await store.read(run.id)
    lines = [line for chunk in chunks for line in _lines(chunk, stream)]
    truncated = any(chunk.dropped_bytes for chunk in chunks)
    return RunLogs(run_id=run.id, state=str(run.state), lines=lines, truncated=truncated)


def follow_logs(
    store: LogStore,
    request: Request,
    run_id: str,
    current: Callable[[], RunRecord | None],
    stream: Stream | None = None,
) -> Response:
    """Stream the run's lines until it has ended and every stored line was sent."""
    sse = "text/event-stream" in request.headers.get("accept", "")

    def ended() -> bool:
        run = current()
        return run is None or run.is_terminal

    async def body() -> AsyncIterator[bytes]:
        async for chunk in store.follow(run_id, ended):
            for line in _lines(chunk, stream):
                data = _encoder.encode(line)
                yield b"event: line\ndata: " + data + b"\n\n" if sse else data + b"\n"
        if sse:
            run = current()
            state = str(run.state) if run is not None else "unknown"
            yield b"event: end\ndata: " + _encoder.encode({"state": state}) + b"\n\n"

    media = "text/event-stream" if sse else "application/x-ndjson"
    return StreamingResponse(body(), media_type=media, headers={"Cache-Control": "no-cache"})
