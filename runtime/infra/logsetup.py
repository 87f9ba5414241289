"""Service logs: readable lines by default, JSON lines when asked.

``jetrun --log-format json ...`` or ``JETRUN_LOG_FORMAT=json`` (child processes inherit it).
Records carry ``run_id``, ``team``, ``pipeline``, ``agent_id`` and ``attempt`` wherever they
apply: code binds them for a block (``with bound(run_id=...)``; anyio tasks started inside
inherit them) or passes them as ``extra=``. Plain stdlib ``logging`` with two small formatters:
every module keeps its ``logging.getLogger`` and uvicorn's and nats' records get the same shape,
with no second logging system to configure.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import msgspec

FORMAT_ENV = "JETRUN_LOG_FORMAT"
FIELDS = ("run_id", "team", "pipeline", "agent_id", "attempt")
ACCESS_FIELDS = ("method", "path", "status", "duration_ms", "client")
_context: ContextVar[dict[str, Any]] = ContextVar("jetrun_log_context", default={})  # noqa: B039
_json = msgspec.json.Encoder()


@contextlib.contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """Add ``fields`` to every record logged in this block (and in tasks it starts)."""
    token = _context.set({**_context.get(), **fields})
    try:
        yield
    finally:
        _context.reset(token)


def bind(**fields: Any) -> None:
    """Add ``fields`` for the rest of the current context (inside a ``bound`` block)."""
    _context.set({**_context.get(), **fields})


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    return {
        key: getattr(record, key)
        for key in (*FIELDS, *ACCESS_FIELDS)
        if getattr(record, key, None) is not None
    }


def _timestamp(record: logging.LogRecord) -> str:
    at = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class TextFormatter(logging.Formatter):
    """``2026-01-01T12:00:00.000Z INFO jetrun.agent: message run_id=... attempt=1``"""

    def format(self, record: logging.LogRecord) -> str:
        text = f"{_timestamp(record)} {record.levelname} {record.name}: {record.getMessage()}"
        extra = " ".join(f"{k}={v}" for k, v in fields_of(record).items())
        if extra:
            text = f"{text} {extra}"
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


def configure(*, verbose: bool = False, fmt: str | None = None) -> None:
    """Set up the root logger for a jetrun process (idempotent). ``fmt``: ``text`` or
    ``json``; default from ``$JETRUN_LOG_FORMAT``, else text."""
    fmt = (fmt or os.environ.get(FORMAT_ENV) or "text").lower()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("nats").setLevel(logging.CRITICAL)
    for chatty in ("httpx", "httpcore"):  # a line per request: the access log says it once
        logging.getLogger(chatty).setLevel(logging.WARNING)
