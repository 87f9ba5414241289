"""While a gateway catches up with the event log its HTTP port already answers: the API says
503 ``starting`` (with ``Retry-After``), and /healthz, /readyz and /metrics answer as usual, so a
load balancer sees a process that is up and not yet ready instead of a closed port. The check
itself is in the gateway's front layer (``runtime.control.http_front``)."""

from __future__ import annotations

from starlette.responses import Response

from runtime.control.http_input import error, error_response


def starting_response() -> Response:
    """The answer of ``/v4/...`` until the gateway is ready."""
    refusal = error(503, "starting", "this gateway is catching up with the event log")
    refusal.headers["Retry-After"] = "1"
    return error_response(refusal)
