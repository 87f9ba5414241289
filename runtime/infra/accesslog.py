"""The gateway's access log: one ``jetrun.access`` record per request, after its response.

Fields: method, path, status, duration_ms, client, and team once the request was
authenticated (the gateway puts it in the request's ``state``). Tokens and bodies are never
logged. The gateway's front layer (``runtime.control.http_front``) calls ``write``.

A record per request is the larger part of the cost of an answer the gateway reads from memory,
so it is made cheaply and handed to the logger's handlers directly (``Logger.handle``): not
through ``Logger.info``, which walks up the stack to find its caller, and not field by field as
``LogRecord.__init__`` does (the source file, the thread and the process are the same for every
access record of a thread): the first record of a thread is made by ``Logger.makeRecord`` and
later ones start from a copy of its fields, with their own time, arguments and request fields.
A record factory installed with ``logging.setLogRecordFactory`` makes every record. Nothing is
made when INFO is off for ``jetrun.access``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("jetrun.access")
_INFO = logging.INFO
_MESSAGE = "%s %s %d"
_LogRecord = logging.LogRecord


class _Template:
    """The fields of the last access record made in full, and the thread it was made in (one
    tuple, replaced whole). A forked child forgets it (``os.register_at_fork``): its records
    carry its own process id. Asking ``os.getpid()`` per record instead is a system call
    (0.8 µs here: glibc no longer caches it)."""

    made: tuple[int, dict[str, Any]] | None = None


def _forget() -> None:
    _Template.made = None


os.register_at_fork(after_in_child=_forget)


def write(scope: Mapping[str, Any], status: int, elapsed_s: float) -> None:
    """The access line of the request of ASGI ``scope``, answered ``status`` in ``elapsed_s``."""
    if not log.isEnabledFor(_INFO):
        return
    method, path = scope["method"], scope["path"]
    client = scope.get("client")
    state = scope.get("state")
    record = _record((method, path, status))
    fields = record.__dict__
    fields["method"] = method
    fields["path"] = path
    fields["status"] = status
    fields["duration_ms"] = round(elapsed_s * 1000, 2)
    fields["client"] = f"{client[0]}:{client[1]}" if client else None
    fields["team"] = state.get("team") if state else None
    log.handle(record)


def _record(args: tuple[Any, ...]) -> logging.LogRecord:
    made = _Template.made
    thread = threading.get_ident()
    if made is None or made[0] != thread or logging.getLogRecordFactory() is not _LogRecord:
        record = log.makeRecord(log.name, _INFO, __file__, 0, _MESSAGE, args, None, "write")
        _Template.made = (thread, dict(record.__dict__))
        return record
    template = made[1]
    record = _LogRecord.__new__(_LogRecord)
    fields = record.__dict__
    fields.update(template)
    now = time.time()
    fields["args"] = args
    fields["created"] = now
    fields["msecs"] = int((now - int(now)) * 1000) + 0.0  # as LogRecord.__init__
    fields["relativeCreated"] = template["relativeCreated"] + (now - template["created"]) * 1000
    return record
