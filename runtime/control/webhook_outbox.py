"""What the webhook outbox decides, with no I/O. Pure.

The outbox consumes the terminal events of runs that have a callback URL (appended on
``jetrun.ev.<run_id>.<kind>.callback``), handles them concurrently and acknowledges them one
batch at a time (``AckWindow``: never past an event not handled yet); ``fitted`` is a
delivery as it can be stored; ``retry_after`` says when an event the outbox could not handle
is tried again, and when it goes to the dead letters instead (``unhandled``), so that it
cannot hold back the one ack that covers every team's events.
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
    """When the outbox may acknowledge, on a consumer with ``AckPolicy.ALL``: one ack of a
    message covers every message the consumer delivered with a sequence up to it. The outbox
    handles events concurrently, so they finish in any order: the ack goes to the highest
    sequence below which every event known here is handled (``target``), and only once
    nothing the server counts as outstanding is unknown here.

    ``received`` each message as it arrives (in delivery order): True when it is to be
    handled (not one handled or being handled here already); then ``handled`` once its work is
    done (its delivery stored, or it is in the dead letters), or ``failed`` (nak'd: it comes
    again). An event being handled or failed holds the ack below it. Two ways to know that
    nothing else is outstanding:

    - ``ready``, with the consumer's ``num_ack_pending`` and ack floor (one consumer info, asked
      while no fetch is under way): True when the server's outstanding messages are exactly
      the ones known here above its ack floor (handled, being handled, or failed: each is
      outstanding until an ack covers it). Anything else outstanding (one lost in transit
      across a reconnect, one an earlier process was given before it was killed, one another
      process holds, one still on its way) holds the ack back. ``verified`` then takes the
      consumer's delivery count as the new start.
    - ``unbroken``, with no request: every delivery since that start (the consumer numbers
      them 1, 2, 3, ... redeliveries included, and one connection receives them in order)
      came here. A missing number (another process's, or lost) or a failure sends the next
      ack through ``ready`` again."""

    def __init__(self) -> None:
        self._handled: dict[int, M] = {}  # stream sequence -> its message, handled since the ack
        self._busy: set[int] = set()  # being handled here
        self._failed: set[int] = set()  # nak'd here, not handled since
        self.floor = 0  # the sequence acked last: every message up to it is acked
        self._next: int | None = None  # the delivery number expected next (None: unknown)
        self._broken = True  # a delivery missed or failed since the last verified start
        self._top = 0  # the newest delivery number received
        self._acked_delivery: int | None = None  # the consumer's delivery ack floor, if known

    def received(self, seq: int, delivery: int | None = None) -> bool:
        self._delivered(delivery)
        self._top = max(self._top, delivery or 0)
        if seq <= self.floor or seq in self._handled or seq in self._busy:
            return False  # acked, handled, or being handled (redelivered after its ack_wait)
        self._failed.discard(seq)
        self._busy.add(seq)
        return True

    def handled(self, seq: int, msg: M) -> None:
        self._busy.discard(seq)
        if seq > self.floor:
            self._handled[seq] = msg

    def failed(self, seq: int) -> None:
        self._busy.discard(seq)
        if seq > self.floor:
            self._failed.add(seq)
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
    def target(self) -> tuple[int, M] | None:
        """The message whose ack covers every handled one below the first event known here
        that is not handled (being handled, or failed), with its sequence; None: none."""
        below = min(self._busy | self._failed, default=None)
        seqs = [s for s in self._handled if below is None or s < below]
        if not seqs:
            return None
        top = max(seqs)
        return top, self._handled[top]

    @property
    def busy(self) -> int:
        """Events being handled here."""
        return len(self._busy)

    @property
    def unbroken(self) -> bool:
        return self.target is not None and not self._broken

    def ready(self, outstanding: int, acked_to: int = 0) -> bool:
        """``outstanding``: the consumer's ``num_ack_pending``; ``acked_to``: its ack floor's
        stream sequence (what an ack whose answer was lost did is learnt here; one below the
        floor here: an ack the server did not take, so what comes again is handled again)."""
        if acked_to > self.floor:
            self._covered(acked_to)
        self.floor = acked_to
        known = len(self._handled) + len(self._busy) + len(self._failed)
        return self.target is not None and outstanding == known

    def verified(self, delivered: int, acked_delivery: int = 0) -> None:
        """``ready`` held when the consumer had made ``delivered`` deliveries and its ack
        floor's delivery number was ``acked_delivery``."""
        self._next, self._broken = delivered + 1, False
        self._acked_delivery = acked_delivery

    @property
    def ack_delivery(self) -> int | None:
        """The delivery number the next ack names; None: it must wait for a newer delivery.
        The server takes an ack (``AckPolicy.ALL``) only if its delivery number is above that
        of the last one it took (and then acks up to its stream sequence, whatever message
        that number was): events finish here in any order, and a redelivered event has a
        newer number than later events delivered before it, so each ack names one more than
        the last, never past the newest delivery received (each ack covers at least one
        event received since the last, each with a number of its own)."""
        if self._acked_delivery is None or self._acked_delivery >= self._top:
            return None
        return self._acked_delivery + 1

    def acked(self, seq: int, delivery: int) -> None:
        """An ack of ``seq`` (a ``target``) naming ``delivery`` was answered."""
        self._acked_delivery = delivery
        if seq > self.floor:
            self._covered(seq)

    def _covered(self, seq: int) -> None:
        self.floor = seq
        self._handled = {s: m for s, m in self._handled.items() if s > seq}
        self._busy = {s for s in self._busy if s > seq}
        self._failed = {s for s in self._failed if s > seq}

    def __len__(self) -> int:
        return len(self._handled)


def ack_subject(reply: str, delivery: int) -> str | None:
    """``reply`` (a message's ack subject) naming ``delivery`` as its delivery number: the
    ack of its stream sequence that ``AckWindow.ack_delivery`` says the server takes. None for
    a subject of another form."""
    tokens = reply.split(".")
    at = 5 if len(tokens) == 9 else 7 if len(tokens) >= 11 else None
    if tokens[:2] != ["$JS", "ACK"] or at is None:
        return None
    tokens[at + 1] = str(delivery)
    return ".".join(tokens)


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
