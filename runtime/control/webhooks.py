"""The webhook deliverer (``jetrun webhooks``): POSTs each ended run to its callback URL.

Durable consumers, so that nothing is lost to a restart:

1. **Outbox** (``webhooks-outbox`` on ``JETRUN_EVENTS``): the terminal events of runs
   submitted with a ``callback_url`` only, which their writers append on
   ``jetrun.ev.<run_id>.<kind>.callback`` (``runtime.infra.eventlog``): a run without one
   costs the outbox nothing. For the event that made such a run terminal, store one
   ``Delivery`` on ``jetrun.webhooks.pending.<team>.<run_id>`` (``Nats-Msg-Id`` = its delivery
   id, so a re-processed event stores it once). Events are handled concurrently, each team's
   within its own lane (``Lanes``), so one team's slow or hanging events never hold another
   team's. The consumer acks a batch at a time (``AckPolicy.ALL``), up to the highest
   sequence below which every event known here is handled, and only when nothing it counts
   as outstanding is unknown here (``AckWindow``), so an ack never covers an event whose
   delivery is not stored. An event it
   cannot handle (an exception, or ``EVENT_DEADLINE_S`` passed) is parked in
   ``JETRUN_WEBHOOKS_RETRY`` and retried from there (``runtime.control.webhook_retries``), so
   the ack moves on past it; after ``ATTEMPTS`` tries it goes to the dead letters with why
   (``give_up``). An event whose team's lane is full is parked too (``Crowded``), rather than
   wait here holding back the ack and the fetch budget of every team.
2. **Deliverer** (one consumer per team on ``JETRUN_WEBHOOKS``, ``runtime.control.
   webhook_delivery``): POST it, signed, with retries and back-off, each team within its own
   cap and the deliverer's slots shared fairly between teams; ack after a 2xx. A delivery that
   cannot succeed moves to ``JETRUN_WEBHOOKS_DEAD`` (then ack), where ``jetrun webhooks dead``
   lists it and ``jetrun webhooks replay`` queues it again.

At least once: a delivery is acked only after its 2xx, so a deliverer killed between the 2xx
and the ack sends it again after ``ack_wait``, with the same ``Jetrun-Delivery-Id``; receivers
deduplicate on it. A delivery acked is never sent again.
"""

from __future__ import annotations

import contextlib
import logging

import anyio
import httpx
import msgspec
from anyio.abc import TaskStatus
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import APIError

from contracts.events import decode_event
from contracts.machine import evolve, fold
from contracts.run import Run
from contracts.webhooks import DeadDelivery, Delivery, delivery_id_for
from runtime.control.webhook_delivery import Deliverer, fetch, pending_subject
from runtime.control.webhook_lanes import Lanes
from runtime.control.webhook_outbox import (
    ATTEMPTS,
    RETRY_BASE_S,
    AckWindow,
    ack_subject,
    failure,
    fitted,
    subject_parts,
    unhandled,
)
from runtime.control.webhook_retries import Crowded, Keep, Retries
from runtime.infra.clock import SYSTEM_CLOCK, Clock
from runtime.infra.config import Config
from runtime.infra.eventlog import (
    EventLog,
    LogSettings,
    ack_sequences,
    callback_ends,
    on_its_subject,
    submission_of,
)
from runtime.infra.streams import (
    DEAD_PREFIX,
    DEAD_STREAM,
    EVENTS_STREAM,
    dead_config,
    retry_config,
    webhooks_config,
)
from runtime.infra.streamsetup import ensure_stream

log = logging.getLogger("jetrun.webhooks")

OUTBOX = "webhooks-outbox"
OUTBOX_BATCH = 256
OUTBOX_ACK_WAIT_S = 60.0
OUTBOX_LINGER_S = 0.05  # after a short batch: let events gather (fewer, fuller fetches)
OUTBOX_SLOTS = 32  # events handled at once
OUTBOX_TEAM_SLOTS = 8  # of those, one team's at most
EVENT_DEADLINE_S = 20.0  # handling one event (reading its run, storing its delivery)
_dead_decoder = msgspec.json.Decoder(DeadDelivery)
_json = msgspec.json.Encoder()


class WebhookService:
    def __init__(
        self,
        nc: Client,
        config: Config,
        *,
        settings: LogSettings | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.nc, self.config, self.clock = nc, config, clock
        self.settings = settings or LogSettings()
        self.log = EventLog(nc, self.settings)
        self.js: JetStreamContext = self.log.js
        self.policy = config.webhooks
        self.deliverer = Deliverer(self.js, config, clock)
        self.outbox_ack_wait_s = OUTBOX_ACK_WAIT_S
        # an event not handled in ``attempts`` tries (``retry_base_s`` apart, doubling), each
        # within ``event_deadline_s``, goes to the dead letters
        self.attempts, self.retry_base_s = ATTEMPTS, RETRY_BASE_S
        self.event_deadline_s = EVENT_DEADLINE_S
        # events handled at once, in all and of one team (``Lanes``)
        self.outbox_concurrency, self.outbox_team_concurrency = OUTBOX_SLOTS, OUTBOX_TEAM_SLOTS
        self.lanes = Lanes(OUTBOX_SLOTS, OUTBOX_TEAM_SLOTS)  # made again by ``_outbox_loop``
        self.retries = Retries(self.js, self)

    @property
    def delivered(self) -> int:
        return self.deliverer.delivered

    @property
    def dead(self) -> int:
        return self.deliverer.dead

    async def ensure(self) -> None:
        """Streams and the durable consumers (the outbox, one per team). Idempotent."""
        await self.log.ensure()
        replicas = self.settings.replicas
        for config in (webhooks_config, dead_config, retry_config):
            await ensure_stream(self.js, config(replicas=replicas), self.settings.setup_deadline_s)
        await self._ensure_outbox()
        await self.retries.ensure()
        await self.deliverer.ensure()

    async def _ensure_outbox(self) -> None:
        """Create the outbox, or bring an older release's to this one's settings. One that read
        ``submitted`` and every run's end carries on from where it stands, reading only the
        ends of runs with a callback: ends an older release appended (without the callback
        token) after that point are not posted (see docs/architecture.md, Webhooks)."""
        try:
            await self.js.add_consumer(EVENTS_STREAM, outbox_config(None, self.outbox_ack_wait_s))
        except APIError as err:  # it exists with settings that cannot be updated
            info = await self.js.consumer_info(EVENTS_STREAM, OUTBOX)
            if info.config.ack_policy != api.AckPolicy.EXPLICIT:
                log.warning("consumer %s on %s kept as it is: %s", OUTBOX, EVENTS_STREAM, err)
                return
            # an older release's outbox (an ack per event): the same durable, acknowledged a
            # batch at a time, from its first unacknowledged event (any acknowledged after it
            # are read again: their deliveries are stored once, by message id)
            start = (info.ack_floor.stream_seq if info.ack_floor else 0) or 0
            await self.js.delete_consumer(EVENTS_STREAM, OUTBOX)
            config = outbox_config(start + 1, self.outbox_ack_wait_s)
            await self.js.add_consumer(EVENTS_STREAM, config)
            log.info("consumer %s now acknowledges a batch at a time (from %d)", OUTBOX, start + 1)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Deliver until cancelled."""
        await self.ensure()
        outbox = await self.js.pull_subscribe_bind(durable=OUTBOX, stream=EVENTS_STREAM)
        transport = httpx.AsyncHTTPTransport(retries=0)
        async with (
            httpx.AsyncClient(transport=transport, trust_env=False) as http,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(self._outbox_loop, outbox)
            tg.start_soon(self.deliverer.run, http)
            log.info("webhooks: delivering (ack_wait %.0f s)", self.deliverer.ack_wait_s)
            task_status.started()

    # --- the outbox: terminal events -> deliveries ---------------------------------------------

    async def _outbox_loop(self, psub: JetStreamContext.PullSubscription) -> None:
        """Fetch events while fewer than ``OUTBOX_BATCH`` are being handled, each handled in
        its own task (within its team's lane, or parked if that is full), and ack between
        fetches (nothing is on its way to this process then: a pull consumer
        delivers only what a fetch asks for). Parked events are retried alongside."""
        window: AckWindow[Msg] = AckWindow()
        self.lanes = Lanes(self.outbox_concurrency, self.outbox_team_concurrency)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.retries.run)
            while True:
                room = OUTBOX_BATCH - window.busy
                msgs = await fetch(psub, room) if room > 0 else []
                for msg in msgs:
                    seqs = ack_sequences(msg.reply)
                    if seqs is None:
                        seqs = (msg.metadata.sequence.stream, msg.metadata.sequence.consumer)
                    if window.received(*seqs):
                        tg.start_soon(self._handle_one, msg, seqs[0], window)
                await self._ack(psub, window)
                if len(msgs) < room or room <= 0:
                    await anyio.sleep(OUTBOX_LINGER_S)

    async def _handle_one(self, msg: Msg, seq: int, window: AckWindow[Msg]) -> None:
        """Handled, parked or buried: an ack may cover it; else no ack covers it until it
        is, and it comes again."""
        err = await self.attempt(msg.subject, msg.data, seq, msg.in_progress, crowd=True)
        if err is None or await self.retries.failed(msg, seq, err):
            window.handled(seq, msg)
        else:  # no ack covers it until it is handled
            window.failed(seq)

    async def _ack(self, psub: JetStreamContext.PullSubscription, window: AckWindow[Msg]) -> None:
        """One ack for every event handled below the first one not handled yet, once the
        consumer has nothing outstanding that is unknown here (``AckWindow``); otherwise
        later."""
        if window.target is None:
            return
        try:
            if not window.unbroken:  # ask the server what is outstanding
                info = await psub.consumer_info()
                floor = info.ack_floor
                if not window.ready(info.num_ack_pending or 0, (floor and floor.stream_seq) or 0):
                    return
                delivered = (info.delivered.consumer_seq or 0) if info.delivered else 0
                window.verified(delivered, (floor and floor.consumer_seq) or 0)
            target, delivery = window.target, window.ack_delivery
            if target is None or delivery is None:
                return
            subject = ack_subject(target[1].reply, delivery)
            if subject is None:
                return
            await self.nc.request(subject, b"+ACK", timeout=5.0)
            window.acked(target[0], delivery)
        except Exception as err:  # an outage: the events stay outstanding, acked later
            log.debug("webhooks outbox: ack later: %r", err)

    async def attempt(
        self, subject: str, data: bytes, seq: int, keep: Keep, crowd: bool = False
    ) -> Exception | None:
        """Handle an event once, in its team's lane (``keep``: its message's ``in_progress``
        while it waits): None, or why it failed (``crowd``: ``Crowded`` when its team's lane
        is full, for it to be parked rather than wait here holding back the ack)."""
        run_id, _ = subject_parts(subject)
        try:
            with anyio.fail_after(self.event_deadline_s):
                team = await self._team_of(run_id)
        except Exception as err:
            return err
        if crowd and self.lanes.busy(team) >= self.lanes.per_team:
            return Crowded(f"team {team or '(unknown)'}'s lane is full")
        async with self.lanes.slot(team, keep, self.outbox_ack_wait_s / 3):
            try:
                with anyio.fail_after(self.event_deadline_s):
                    await self._on_event(subject, data, seq)
                return None
            except Exception as err:
                return err

    async def _team_of(self, run_id: str) -> str:
        """The team of ``run_id`` (two direct gets at most, however long its run); empty for
        a run the log does not know."""
        submitted = await submission_of(self.log, run_id)
        return submitted.team if submitted is not None else ""

    async def give_up(self, subject: str, seq: int, attempts: int, err: Exception) -> None:
        """The event goes to the dead letters, with the run as far as the log can be read."""
        run_id, kind = subject_parts(subject)
        record = None
        with contextlib.suppress(Exception), anyio.fail_after(self.event_deadline_s):
            record = await self.log.load(run_id)
        why = (
            f"the outbox could not handle this run's {kind} event (log sequence {seq}) in"
            f" {attempts} attempts ({failure(err, self.event_deadline_s)}): no callback was"
            " queued for it"
        )
        await self.deliverer.bury(unhandled(run_id, record), attempts, why, f"event{seq}")

    async def _on_event(self, subject: str, data: bytes, seq: int) -> None:
        run_id, _ = subject_parts(subject)
        event = decode_event(data)
        if not on_its_subject(event, subject):  # another run's or kind's: forged, no event
            log.warning("skipping a %s event of %s on %s", event.kind, event.run_id, subject)
            return
        stored = await self.log.read(run_id)
        # a run with a callback is dispatched alone, on its own subjects (``passes.packed``):
        # no rule 10 here, so another agent's end of a run not dispatched is no end
        before = fold((s.event for s in stored if s.seq < seq), run_id, own_subjects=False)
        after = evolve(before, event)
        url = after.callback_url
        if url and after.is_terminal and not before.is_terminal:  # the event that ended it
            delivery = Delivery(
                delivery_id=delivery_id_for(run_id), team=after.team, url=url, run=Run.of(after)
            )
            delivery, payload, too_large = fitted(delivery, self.nc.max_payload)
            if too_large is not None:  # it could never be stored: the dead letters say why
                await self.deliverer.bury(delivery, 0, too_large, seq)
            elif after.team in self.config.teams:
                await self._enqueue(delivery, payload)
            else:  # no consumer will ever take it: straight to the dead letters
                await self.deliverer.bury(delivery, 0, f"team {after.team} is not configured", seq)

    async def _enqueue(self, delivery: Delivery, payload: bytes) -> None:
        subject = pending_subject(delivery.team, delivery.run.id)
        headers = {"Nats-Msg-Id": delivery.delivery_id}
        await self.js.publish(subject, payload, headers=headers)


def outbox_config(
    start_seq: int | None = None, ack_wait_s: float = OUTBOX_ACK_WAIT_S
) -> api.ConsumerConfig:
    """The outbox's durable consumer: the ends of runs with a callback URL, from the start of
    the log (or ``start_seq``), acknowledged a batch at a time (``AckPolicy.ALL``); what a
    dead process held comes back after ``ack_wait_s``."""
    return api.ConsumerConfig(
        durable_name=OUTBOX,
        filter_subjects=callback_ends(),
        ack_policy=api.AckPolicy.ALL,
        deliver_policy=(
            api.DeliverPolicy.ALL if start_seq is None else api.DeliverPolicy.BY_START_SEQUENCE
        ),
        opt_start_seq=start_seq,
        ack_wait=ack_wait_s,
        max_ack_pending=4 * OUTBOX_BATCH,
    )


# --- operator commands ----------------------------------------------------------------------


async def dead_letters(js: JetStreamContext) -> list[tuple[int, DeadDelivery]]:
    """Every dead delivery with its stream sequence, oldest first."""
    config = api.ConsumerConfig(
        ack_policy=api.AckPolicy.NONE, inactive_threshold=30.0, mem_storage=True
    )
    psub = await js.pull_subscribe(f"{DEAD_PREFIX}.>", stream=DEAD_STREAM, config=config)
    found: list[tuple[int, DeadDelivery]] = []
    try:
        pending = (await psub.consumer_info()).num_pending or 0
        while len(found) < pending:
            for msg in await psub.fetch(min(pending - len(found), 256), timeout=5.0):
                found.append((msg.metadata.sequence.stream, _dead_decoder.decode(msg.data)))
    finally:
        with contextlib.suppress(Exception):
            await psub.unsubscribe()
    return found


async def replay(
    js: JetStreamContext, ids: set[str], everything: bool = False, log: EventLog | None = None
) -> tuple[list[str], list[str]]:
    """Queue dead deliveries again (by delivery id or run id, or all); each leaves the dead
    letters once queued. A letter of an event the outbox could not handle (no URL: nothing was
    queued then) is handled again from the log as it is now (``log``): queued if its run ended
    with a callback URL, else left with why. Returns the delivery ids queued, and a line for
    each letter left."""
    queued: list[str] = []
    left: list[str] = []
    for seq, dead in await dead_letters(js):
        d = dead.delivery
        if not everything and d.delivery_id not in ids and d.run.id not in ids:
            continue
        payload = _json.encode(d)
        if not d.url:
            found = await _from_log(log, d.run.id)
            if isinstance(found, str):
                left.append(f"{d.delivery_id}: {found}")
                continue
            d, payload = found
        subject = pending_subject(d.team, d.run.id)
        headers = {"Nats-Msg-Id": f"{d.delivery_id}:replay:{seq}"}
        await js.publish(subject, payload, headers=headers)
        await js.delete_msg(DEAD_STREAM, seq)
        queued.append(d.delivery_id)
    return queued, left


async def _from_log(log: EventLog | None, run_id: str) -> tuple[Delivery, bytes] | str:
    """The delivery of ``run_id`` as the log has it now, or why there is none."""
    if log is None:
        return "its run must be read from the event log again"
    try:  # a run with a callback is dispatched and ended on its own subjects: no rule 10
        stored = await log.read(run_id)
        record = fold((s.event for s in stored), run_id, own_subjects=False)
    except Exception as err:
        return f"its run cannot be read from the event log: {err!r}"
    if not record.is_terminal or not record.callback_url:
        url = "" if record.callback_url else " with no callback URL"
        return f"its run is {record.state}{url} in the event log: nothing to send"
    delivery = Delivery(
        delivery_id=delivery_id_for(run_id),
        team=record.team,
        url=record.callback_url,
        run=Run.of(record),
    )
    delivery, payload, too_large = fitted(delivery, log.nc.max_payload)
    return too_large if too_large is not None else (delivery, payload)
