"""What the webhook outbox decides, with no I/O. Pure.

The outbox consumes the terminal events of runs that have a callback URL (appended on
``jetrun.ev.<run_id>.<kind>.callback``) and acknowledges them one batch at a time
(``AckWindow``); ``fitted`` is a delivery as it can be stored; ``retry_after`` says when an
event the outbox could not handle is tried again, and when it goes to the dead letters instead
(``unhandled``), so that it cannot hold back the one ack that covers every team's events.
"""

from __future__ import annotations

from typing import Generic, TypeVar

import msgspec

from contracts.run import Run, RunRecord
from contracts.webhooks import Delivery, delivery_id_for

M = TypeVar("M")
HEADER_ROOM = 4096  # of a message's max_payload, left for its headers
ATTEMPTS = 6  # times the outbox tries to handle one event before it goes to the dead letters
RETRY_BASE_S = 1.0  # the wait after the first failed attempt, doubled after each
RETRY_MAX_S = 30.0
_delivery_encoder = msgspec.json.Encoder()


def subject_parts(subject: str) -> tuple[str, str]:
    """``(run_id, kind)`` of an event subject ``jetrun.ev.<run_id>.<kind>[.<more>]``."""
    parts = subject.split(".")
    return parts[2], parts[3]


class AckWindow(Generic[M]):
    """When the outbox may acknowledge, on a consumer with ``AckPolicy.ALL``: one ack, of the
    newest message handled, covers every message the consumer delivered up to it, so it is
    sent only once every message the server counts as outstanding has been handled.

    ``handled`` each message once its work is done (its delivery stored), ``failed`` one that
    was not (it was nak'd). Two ways to know that nothing else is outstanding:

    - ``ready``, with the consumer's ``num_ack_pending`` and ack floor (one consumer info):
      True when the server's outstanding messages are exactly the ones handled here above
      its ack floor (each of those is outstanding: an ack covers all or nothing up to it).
      Anything else outstanding (a message that failed, one lost in transit across a
      reconnect, one an earlier process was given before it was killed, one another process
      holds, one still on its way) holds the ack back until it is handled. ``verified``
      then takes the consumer's delivery count as the new start.
    - ``unbroken``, with no request: every delivery since that start (the consumer numbers
      them 1, 2, 3, ... redeliveries included, and one connection receives them in order)
      came here and was handled. A missing number (another process's, or lost) or a failure
      sends the next ack through ``ready`` again."""

    def __init__(self) -> None:
        self._handled: set[int] = set()  # stream sequences handled since the last ack
        self._newest: tuple[int, M] | None = None  # (sequence, its message)
        self.floor = 0  # the sequence acked last: every message up to it is acked
        self._next: int | None = None  # the delivery number expected next (None: unknown)
        self._broken = True  # a delivery missed or failed since the last verified start

    def handled(self, seq: int, msg: M, delivery: int | None = None) -> None:
        self._delivered(delivery)
        if seq <= self.floor:
            return  # covered by an ack already (a late redelivery)
        self._handled.add(seq)
        if self._newest is None or seq > self._newest[0]:
            self._newest = (seq, msg)

    def failed(self, delivery: int | None = None) -> None:
        self._delivered(delivery)
        self._broken = True

    def _delivered(self, delivery: int | None) -> None:
        if delivery is None or self._next is None:
            self._broken = True
            return
        if delivery < self._next:
            return  # delivered before the verified start (a redelivery of a handled one)
        if delivery != self._next:
            self._broken = True  # a delivery that did not come here
        self._next = delivery + 1

    @property
    def newest(self) -> M | None:
        """The message whose ack would cover every one handled; None when none is."""
        return None if self._newest is None else self._newest[1]

    @property
    def unbroken(self) -> bool:
        return self._newest is not None and not self._broken

    def ready(self, outstanding: int, acked_to: int = 0) -> bool:
        """``outstanding``: the consumer's ``num_ack_pending``; ``acked_to``: its ack floor's
        stream sequence (what an ack whose answer was lost did is learnt here)."""
        if acked_to > self.floor:
            self.floor = acked_to
            self._handled = {seq for seq in self._handled if seq > acked_to}
            if self._newest is not None and self._newest[0] <= acked_to:
                self._newest = None
        return self._newest is not None and outstanding == len(self._handled)

    def verified(self, delivered: int) -> None:
        """``ready`` held when the consumer had made ``delivered`` deliveries."""
        self._next, self._broken = delivered + 1, False

    def acked(self) -> None:
        if self._newest is not None:
            self.floor = self._newest[0]
        self._handled.clear()
        self._newest = None

    def __len__(self) -> int:
        return len(self._handled)


def fitted(delivery: Delivery, max_payload: int) -> tuple[Delivery, bytes, str | None]:
    """``(delivery, its encoding, None)`` when it fits in one message. A run's view can be
    larger than a message may be (its inputs and streamed outputs together): then the delivery
    with the run's inputs and outputs left out, and why it cannot be sent. It goes to the dead
    letters: an event whose delivery can never be stored would otherwise be retried for ever,
    and hold back the outbox's one ack of every team's events."""
    payload = _delivery_encoder.encode(delivery)
    limit = max_payload - HEADER_ROOM
    if len(payload) <= limit:
        return delivery, payload, None
    run = msgspec.structs.replace(delivery.run, inputs=[], outputs=[])
    trimmed = msgspec.structs.replace(delivery, run=run)
    why = (
        f"the run's view is {len(payload):,} bytes, over the {limit:,} a message may hold:"
        f" not sent (its inputs and outputs are left out here; GET /v4/runs/{run.id} has them)"
    )
    return trimmed, _delivery_encoder.encode(trimmed), why


def retry_after(attempts: int, limit: int = ATTEMPTS, base_s: float = RETRY_BASE_S) -> float | None:
    """How long until an event the outbox failed to handle ``attempts`` times (the consumer's
    delivery count) is handled again: ``base_s``, doubled after each attempt up to
    ``RETRY_MAX_S``; None once ``limit`` attempts failed: it goes to the dead letters (held for
    ever, it would hold back the one ack of every later event, every team's, and stop the
    outbox once ``max_ack_pending`` of them were outstanding)."""
    if attempts >= limit:
        return None
    return min(base_s * 2.0 ** max(attempts - 1, 0), RETRY_MAX_S)


def unhandled(run_id: str, record: RunRecord | None) -> Delivery:
    """The dead letter's delivery for an event the outbox gave up on: the run as far as the log
    could be read (``record``; None: only its id is known, its team is empty). Its URL is empty
    (nothing was queued: ``replay`` handles it again from the log), and so is it for a run
    the log does not show ended: that view must never be sent as the run's end."""
    found = record if record is not None else RunRecord(id=run_id)
    return Delivery(delivery_id=delivery_id_for(run_id), team=found.team, url="", run=Run.of(found))


def failure(err: BaseException, deadline_s: float) -> str:
    """What went wrong handling an event, for its dead letter."""
    if isinstance(err, TimeoutError):
        return f"not handled within {deadline_s:g} s"
    return f"{type(err).__name__}: {err}"[:2000]
