"""The gateway's access log: one ``jetrun.access`` record per request, after its response.

Fields: method, path, status, duration_ms, client, and team once the request was
authenticated (the gateway puts it in the request's ``state``). Tokens and bodies are never
logged. The gateway's front layer (``runtime.control.http_front``) calls ``write``.

The record is made and handed to the logger's handlers directly, as ``Logger.info`` would after
finding its caller's frame (a walk up the stack per call, the larger part of its cost); nothing
is made when INFO is off for ``jetrun.access``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("jetrun.access")
_INFO = logging.INFO
_MESSAGE = "%s %s %d"


def write(scope: Mapping[str, Any], status: int, elapsed_s: float) -> None:
    """The access line of the request of ASGI ``scope``, answered ``status`` in ``elapsed_s``."""
    if not log.isEnabledFor(_INFO):
        return
    method, path = scope["method"], scope["path"]
    client = scope.get("client")
    state = scope.get("state")
    record = log.makeRecord(
        log.name, _INFO, __file__, 0, _MESSAGE, (method, path, status), None, "write"
    )
    fields = record.__dict__
    fields["method"] = method
    fields["path"] = path
    fields["status"] = status
    fields["duration_ms"] = round(elapsed_s * 1000, 2)
    fields["client"] = f"{client[0]}:{client[1]}" if client else None
    fields["team"] = state.get("team") if state else None
    log.handle(record)
