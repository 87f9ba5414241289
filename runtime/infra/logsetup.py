"""Service logs: readable lines by default, JSON lines when asked.

``jetrun --log-format json ...`` or ``JETRUN_LOG_FORMAT=json`` (child processes inherit it).
Records carry ``run_id``, ``team``, ``pipeline``, ``agent_id`` and ``attempt`` wherever they
apply: code binds them for a block (``with bound(run_id=...)``; anyio tasks started inside
inherit them) or passes them as ``extra=``. Plain stdlib ``logging`` with two small formatters:
every module keeps its ``logging.getLogger`` and uvicorn's and nats' records get the same shape,
with no second logging system to configure.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import math
import os
import sys
from collections.abc import Collection
from contextvars import ContextVar
from typing import Any

import msgspec

FORMAT_ENV = "JETRUN_LOG_FORMAT"
FIELDS = ("run_id", "team", "pipeline", "agent_id", "attempt")
ACCESS_FIELDS = ("method", "path", "status", "duration_ms", "client")
ACCESS_LOGGER = "jetrun.access"  # runtime.infra.accesslog's: a line per request
_context: ContextVar[dict[str, Any]] = ContextVar("jetrun_log_context", default={})  # noqa: B039
_json = msgspec.json.Encoder()


class _Bound:
    """The block of ``bound``: a class rather than a generator, as the agent enters one for
    every attempt."""

    __slots__ = ("_fields", "_token")

    def __init__(self, fields: dict[str, Any]) -> None:
        self._fields = fields

    def __enter__(self) -> None:
        self._token = _context.set({**_context.get(), **self._fields})

    def __exit__(self, *exc: object) -> None:
        _context.reset(self._token)


def bound(**fields: Any) -> _Bound:
    """Add ``fields`` to every record logged in this block (and in tasks it starts)."""
    return _Bound(fields)


def bind(**fields: Any) -> None:
    """Add ``fields`` for the rest of the current context (inside a ``bound`` block)."""
    _context.set({**_context.get(), **fields})


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


_ALL_FIELDS = (*FIELDS, *ACCESS_FIELDS)


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The fields of ``FIELDS`` and ``ACCESS_FIELDS`` the record has (``extra=``, ``bound``):
    read from its ``__dict__``, where both put them (``getattr`` with a default raises and
    catches an AttributeError inside for each one missing)."""
    values = record.__dict__
    return {key: value for key in _ALL_FIELDS if (value := values.get(key)) is not None}


_last_second: tuple[int | None, str] = (
    None,
    "",
)  # the last second formatted: records come many a second


def _timestamp(record: logging.LogRecord) -> str:
    """``2026-01-01T12:00:00.123Z``: UTC, milliseconds (truncated, as ``datetime.isoformat``)."""
    global _last_second
    created = record.created
    second = math.floor(created)
    micros = round((created - second) * 1e6)  # as datetime rounds: half to even
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    cached, text = _last_second  # one tuple: a thread never sees half an update
    if second != cached:
        at = datetime.datetime.fromtimestamp(second, datetime.UTC)
        text = at.strftime("%Y-%m-%dT%H:%M:%S")
        _last_second = (second, text)
    return f"{text}.{micros // 1000:03d}Z"


class TextFormatter(logging.Formatter):
    """``2026-01-01T12:00:00.000Z INFO jetrun.agent: message run_id=... attempt=1``"""

    def format(self, record: logging.LogRecord) -> str:
        values = record.__dict__  # the fields in one pass, no dict of them (a line per request)
        parts = [_timestamp(record), record.levelname, f"{record.name}:", record.getMessage()]
        for key in _ALL_FIELDS:
            if (value := values.get(key)) is not None:
                parts.append(f"{key}={value}")
        text = " ".join(parts)
        if record.exc_info:
            text = f"{text}\n{self.formatException(record.exc_info)}"
        return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the fields that apply, exc."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            **fields_of(record),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return _json.encode(entry).decode()


class LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A ``StreamHandler`` whose per-request lines (INFO and DEBUG records of the loggers named
    in ``batched``: the access log) logged on an event loop are written at the end of the loop's
    iteration, all of that iteration's lines in one write: a line per request is not a system
    call per request. Every other line is written at once, with the lines waiting before it (a
    process killed in the middle of an iteration loses at most that iteration's access lines,
    never a line about its own life); lines logged off the loop (other threads, before or after
    it runs) likewise; ``flush`` (also at exit) and ``close`` write what waits. Lines keep their
    order."""

    def __init__(self, stream: Any = None, batched: Collection[str] = (ACCESS_LOGGER,)) -> None:
        super().__init__(stream)
        self.batched = frozenset(batched)
        self._waiting: list[str] = []  # lines to write at the end of the iteration
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop their write is due on

    def emit(self, record: logging.LogRecord) -> None:  # called with the handler's lock held
        try:
            line = self.format(record) + self.terminator
        except RecursionError:  # as StreamHandler
            raise
        except Exception:
            self.handleError(record)
            return
        loop = asyncio._get_running_loop()
        if loop is None or record.levelno >= logging.WARNING or record.name not in self.batched:
            self._waiting.append(line)
            self._write_waiting()
        elif self._waiting and loop is self._loop:  # the iteration's write is due
            self._waiting.append(line)
        else:
            self._write_waiting()  # due on a loop that is gone (its write never ran)
            self._waiting.append(line)
            self._loop = loop
            loop.call_soon(self._due)

    def _due(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self._waiting:
                self._write_waiting()

    def _write_waiting(self) -> None:
        if not self._waiting:
            return
        text, self._waiting, self._loop = "".join(self._waiting), [], None
        try:
            self.stream.write(text)
            self.stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(logging.makeLogRecord({"msg": text}))

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write_waiting()
        super().flush()


def configure(*, verbose: bool = False, fmt: str | None = None) -> None:
    """Set up the root logger for a jetrun process (idempotent). ``fmt``: ``text`` or
    ``json``; default from ``$JETRUN_LOG_FORMAT``, else text."""
    fmt = (fmt or os.environ.get(FORMAT_ENV) or "text").lower()
    handler = LineHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("nats").setLevel(logging.CRITICAL)
    for chatty in ("httpx", "httpcore"):  # a line per request: the access log says it once
        logging.getLogger(chatty).setLevel(logging.WARNING)
