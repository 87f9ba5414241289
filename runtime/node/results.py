"""Whether an attempt's result fits in the event log.

NATS refuses a message over the server's ``max_payload`` (1 MiB by default). A result that does
not fit would be dropped, and the run later declared lost; the agent checks every result event
before appending it and fails the attempt instead, with an error that says why.
"""

from __future__ import annotations

from contracts.errors import ErrorType, RunError
from contracts.events import AttemptEvent, Event, RunFailed, encode_event

#: Room left for the message's headers (``Nats-Msg-Id`` and the expected-sequence headers).
HEADER_ROOM = 4096


class ResultTooLarge(Exception):
    """An event of an attempt cannot be stored; ``error`` is the attempt's failure."""

    def __init__(self, error: RunError) -> None:
        super().__init__(error.message)
        self.error = error


def encoded(event: Event, limit: int) -> bytes:
    """``event`` as the log stores it (``encode_event``); raises ``ResultTooLarge`` if that
    is more than ``limit`` bytes, or if it cannot be encoded at all (nesting too deep for the
    encoder). Never blocks."""
    try:
        payload = encode_event(event)
    except (TypeError, ValueError, OverflowError, RecursionError) as err:
        message = f"the {event.kind} result cannot be encoded: {type(err).__name__}: {err}"
        raise ResultTooLarge(RunError(type=ErrorType.pipeline_error, message=message)) from None
    size = len(payload)
    if size > limit:
        what = "an output" if event.kind == "output" else "the result"
        raise ResultTooLarge(too_large(what, size, limit))
    return payload


def too_large(what: str, size: int, limit: int) -> RunError:
    """The failure of an attempt whose ``what`` is ``size`` bytes, over ``limit``."""
    message = (
        f"output too large: {what} is {size:,} bytes encoded; the event log takes at most"
        f" {limit:,} bytes per message (NATS max_payload). Return a file or a URL instead."
    )
    return RunError(type=ErrorType.pipeline_error, message=message)


def shortened(error: RunError, keep: int = 16_384) -> RunError:
    """``error`` with its message and traceback cut to ``keep`` characters each (the end of a
    traceback is kept: that is where the exception is)."""
    message = error.message if len(error.message) <= keep else error.message[:keep] + " [cut]"
    trace = error.traceback
    if trace is not None and len(trace) > keep:
        trace = "[cut] " + trace[-keep:]
    return RunError(type=error.type, message=message, traceback=trace)


def fitted(event: AttemptEvent, limit: int) -> tuple[AttemptEvent, bytes]:
    """``event``, or the attempt's failure if the event log cannot take it (a result over
    ``limit`` bytes, or one that cannot be encoded; a failure too large to store has its
    message and traceback cut), with its encoding: what is measured is what is sent."""
    try:
        return event, encoded(event, limit)
    except ResultTooLarge as err:
        error = shortened(event.error) if isinstance(event, RunFailed) else err.error
    failed = RunFailed(run_id=event.run_id, at=event.at, attempt=event.attempt, error=error)
    return failed, encode_event(failed)
