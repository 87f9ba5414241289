"""Retrying a JetStream call through outages (no responders, timeouts, leader changes, a
closed or full connection) until a deadline; a final answer is never retried."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
from nats.errors import (
    ConnectionClosedError,
    NoRespondersError,
    OutboundBufferLimitError,
    StaleConnectionError,
)
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import (
    APIError,
    NoStreamResponseError,
    ServerError,
    ServiceUnavailableError,
)

from runtime.infra.metrics import LOG_FAILURES, LOG_RETRIES, operation_of

log = logging.getLogger("jetrun.jsretry")

# Outages, not answers: no JetStream responder, timeouts, a leader change (503, or a reply that
# is not a stream's), a closed, stale or full connection. Retried with the same message id.
RETRYABLE = (
    NoRespondersError,
    NatsTimeoutError,
    TimeoutError,
    ServiceUnavailableError,
    ServerError,
    NoStreamResponseError,
    ConnectionClosedError,
    StaleConnectionError,
    OutboundBufferLimitError,
)


# A 503 that is a final answer, not an outage: a per-subject limit was reached (10077).
FINAL_ERR_CODES = frozenset({10077})


def _refused(err: Exception) -> bool:
    return isinstance(err, APIError) and err.err_code in FINAL_ERR_CODES


T = TypeVar("T")


async def retrying(what: str, call: Callable[[], Awaitable[T]], deadline_s: float) -> T:
    """Run ``call`` until it succeeds, retrying outages (no responders, timeouts, leader
    changes, a closed or full connection) until ``deadline_s`` has passed."""
    deadline = time.monotonic() + deadline_s
    delay = 0.02
    while True:
        try:
            return await call()
        except RETRYABLE as err:
            if _refused(err) or time.monotonic() >= deadline:
                LOG_FAILURES.labels(operation_of(what)).inc()
                raise
            LOG_RETRIES.labels(operation_of(what)).inc()
            log.debug("%s: retrying after %r", what, err)
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.5)
