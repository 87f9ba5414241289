"""Submitting a run over NATS (request/reply on ``jetrun.submit``, served by the gateways).

The request carries the team's bearer token and the same body as ``POST /v4/runs``; a gateway
answers with the run (status 202) or the same typed refusal an HTTP client would get (401, 404,
422, 429, 503 and their ``detail``). Every path into the system goes through one admission.
"""

from __future__ import annotations

from typing import Any

import msgspec

from contracts.run import Run

SUBMIT_SUBJECT = "jetrun.submit"


class SubmitRequest(msgspec.Struct, frozen=True, kw_only=True):
    token: str
    body: msgspec.Raw  # exactly what POST /v4/runs takes: {pipeline, inputs, async_run, ...}
    idempotency_key: str | None = None


class SubmitReply(msgspec.Struct, frozen=True, kw_only=True):
    """``status`` as HTTP would say it: 202 with ``run``, or an error with ``detail``."""

    status: int
    run: Run | None = None
    detail: Any = None
    retry_after: float | None = None
