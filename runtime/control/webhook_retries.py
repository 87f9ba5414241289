"""The webhook outbox's retries: an event it failed to handle once is parked, durably, and
retried from there, so that the outbox's one ack (``AckPolicy.ALL``) moves on past it.

Held in the outbox's consumer for its retries (about 2.5 minutes), a failing event kept the ack
of every later event back; once ``max_ack_pending`` of them were outstanding the server stopped
delivering, and every team's callbacks waited for one team's event. Now the event (its subject,
its log sequence, its bytes, the attempts so far) is stored on
``jetrun.webhooks.retry.<run_id>`` in ``JETRUN_WEBHOOKS_RETRY`` (``Nats-Msg-Id`` = its log
sequence: parked again after a restart, stored once) before the outbox counts it handled, so
no ack ever covers an event that is neither handled nor parked. A durable consumer of its own
(explicit acks: one event's retries hold back no other's) hands each parked event back after
its back-off; it is handled in its team's lane like any other, and acked (removed: the stream
is a work queue) once handled or in the dead letters. A crash loses none: what a dead process
held comes back after ``ack_wait``, and a restarted outbox carries on from the consumer.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import anyio
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError

from runtime.control.webhook_delivery import fetch
from runtime.control.webhook_outbox import RETRY_MAX_S, retry_after, subject_parts
from runtime.infra.clock import Clock
from runtime.infra.streams import RETRY_PREFIX, RETRY_STREAM

log = logging.getLogger("jetrun.webhooks")

RETRY_CONSUMER = "webhooks-retry"
RETRY_PENDING = 256  # parked events handed out and not settled, at most
SUBJECT_HEADER = "Jetrun-Event-Subject"  # the event's subject in the log
SEQ_HEADER = "Jetrun-Event-Seq"  # its sequence in the log
ATTEMPTS_HEADER = "Jetrun-Attempts"  # attempts that failed before it was parked
DUE_HEADER = "Jetrun-Retry-At"  # when it is tried first (seconds since the epoch)

Keep = Callable[[], Awaitable[None]]


class Crowded(Exception):
    """The event's team's lane is full: the event is parked (its first attempt still to come)
    rather than wait for it in the outbox, where it would hold back the ack of every later
    event, every team's."""


class Outbox(Protocol):
    """What the retries need of the outbox (``WebhookService``)."""

    attempts: int
    retry_base_s: float
    outbox_ack_wait_s: float
    clock: Clock

    async def attempt(
        self, subject: str, data: bytes, seq: int, keep: Keep, crowd: bool = False
    ) -> Exception | None:
        """Handle the event once, in its team's lane: None, or why it failed."""
        ...

    async def give_up(self, subject: str, seq: int, attempts: int, err: Exception) -> None:
        """Put the event in the dead letters."""
        ...


def delivery_count(msg: Msg) -> int:
    """How many times the consumer has delivered ``msg`` (this time included)."""
    try:
        return int(msg.metadata.num_delivered or 1)
    except Exception:  # not a JetStream message: its first
        return 1


class Retries:
    def __init__(self, js: JetStreamContext, outbox: Outbox) -> None:
        self.js, self.outbox = js, outbox

    async def ensure(self) -> None:
        """The parked events' durable consumer. Idempotent."""
        config = api.ConsumerConfig(
            durable_name=RETRY_CONSUMER,
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_wait=self.outbox.outbox_ack_wait_s,
            max_ack_pending=RETRY_PENDING,
        )
        try:
            await self.js.add_consumer(RETRY_STREAM, config)
        except BadRequestError as err:  # it exists with other settings: the operator's
            log.warning("consumer %s kept as it is: %s", RETRY_CONSUMER, err)

    async def failed(self, msg: Msg, seq: int, err: Exception) -> bool:
        """An outbox event's attempt failed: True once it is parked (or, after its last
        attempt, in the dead letters), so an ack may cover it; False: it could not be (NATS
        trouble), it was nak'd and comes again."""
        attempts = 0 if isinstance(err, Crowded) else delivery_count(msg)
        delay = retry_after(attempts, self.outbox.attempts, self.outbox.retry_base_s)
        delay = 0.0 if attempts == 0 else delay
        try:
            if delay is None:
                await self.outbox.give_up(msg.subject, seq, attempts, err)
            else:
                await self.park(msg.subject, msg.data, seq, attempts, delay)
                level = logging.DEBUG if attempts == 0 else logging.WARNING  # 0: crowded
                log.log(
                    level,
                    "webhooks outbox: %s (attempt %d) parked, retried in %g s: %r",
                    msg.subject,
                    attempts,
                    delay,
                    err,
                )
            return True
        except Exception as park_err:
            log.warning("webhooks outbox: %s neither parked nor buried: %r", msg.subject, park_err)
        with contextlib.suppress(Exception):
            await msg.nak(delay=self.outbox.retry_base_s)
        return False

    async def park(self, subject: str, data: bytes, seq: int, attempts: int, delay: float) -> None:
        run_id, _ = subject_parts(subject)
        headers = {
            "Nats-Msg-Id": f"event{seq}",
            SUBJECT_HEADER: subject,
            SEQ_HEADER: str(seq),
            ATTEMPTS_HEADER: str(attempts),
            DUE_HEADER: repr(self.outbox.clock.now() + delay),
        }
        await self.js.publish(f"{RETRY_PREFIX}.{run_id}", data, headers=headers)

    async def run(self) -> None:
        """Retry parked events until cancelled, each in its own task."""
        psub = await self.js.pull_subscribe_bind(durable=RETRY_CONSUMER, stream=RETRY_STREAM)
        async with anyio.create_task_group() as tg:
            while True:
                for msg in await fetch(psub, 64):
                    tg.start_soon(self._retry, msg)

    async def _retry(self, msg: Msg) -> None:
        try:
            await self._retry_one(msg)
        except Exception as err:  # NATS trouble: it comes back after ack_wait
            log.warning("webhooks outbox: retry of %s not settled: %r", msg.subject, err)

    async def _retry_one(self, msg: Msg) -> None:
        headers = msg.headers or {}
        try:
            subject, seq = headers[SUBJECT_HEADER], int(headers[SEQ_HEADER])
            before, due = int(headers[ATTEMPTS_HEADER]), float(headers[DUE_HEADER])
        except (KeyError, ValueError):
            log.error("webhooks outbox: parked message %s unreadable: dropped", msg.subject)
            await msg.term()
            return
        delivered = delivery_count(msg)
        if delivered == 1:  # its first back-off, from when it was parked
            await anyio.sleep(min(max(due - self.outbox.clock.now(), 0.0), RETRY_MAX_S))
        attempts = before + delivered
        err = await self.outbox.attempt(subject, msg.data, seq, msg.in_progress)
        if err is None:
            await msg.ack_sync()
            return
        delay = retry_after(attempts, self.outbox.attempts, self.outbox.retry_base_s)
        if delay is None:
            try:
                await self.outbox.give_up(subject, seq, attempts, err)
                await msg.ack_sync()
                return
            except Exception as bury_err:  # NATS trouble: tried again later
                log.warning("webhooks outbox: %s not buried: %r", subject, bury_err)
                delay = self.outbox.retry_base_s
        log.warning(
            "webhooks outbox: %s (attempt %d) retried in %g s: %r", subject, attempts, delay, err
        )
        await msg.nak(delay=delay)
