"""The webhook deliverer (``jetrun webhooks``): POSTs each ended run to its callback URL.

Two durable consumers, so that nothing is lost to a restart:

1. **Outbox** (``webhooks-outbox`` on ``JETRUN_EVENTS``, terminal event kinds only): for the
   event that made a run with a ``callback_url`` terminal, store one ``Delivery`` on
   ``jetrun.webhooks.pending.<run_id>`` (``Nats-Msg-Id`` = its delivery id, so a re-processed
   event stores it once), then ack the event.
2. **Deliverer** (``webhooks-deliverer`` on ``JETRUN_WEBHOOKS``): POST it, signed, with retries,
   exponential back-off and jitter (stamina) on timeouts, connection errors, 408, 425, 429 and
   5xx; ack after a 2xx. Another 4xx, a refused destination, or the last failed attempt moves it
   to ``JETRUN_WEBHOOKS_DEAD`` (then ack), where ``jetrun webhooks dead`` lists it and
   ``jetrun webhooks replay`` queues it again.

At least once: a delivery is acked only after its 2xx, so a deliverer killed between the 2xx
and the ack sends it again after ``ack_wait``, with the same ``Jetrun-Delivery-Id``; receivers
deduplicate on it. A delivery acked is never sent again.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket

import anyio
import httpx
import msgspec
import nats.errors
import stamina
from anyio.abc import TaskGroup, TaskStatus
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError

from contracts.events import decode_event
from contracts.machine import evolve, fold
from contracts.run import Run
from contracts.webhooks import DeadDelivery, Delivery, delivery_id_for
from runtime.control.webhook_policy import (
    DELIVERY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    DestinationRefused,
    check_address,
    check_callback_url,
    sign,
)
from runtime.infra.clock import SYSTEM_CLOCK, Clock
from runtime.infra.config import Config
from runtime.infra.eventlog import EventLog, LogSettings, ensure_stream, submission_of
from runtime.infra.streams import (
    DEAD_PREFIX,
    DEAD_STREAM,
    EVENTS_PREFIX,
    EVENTS_STREAM,
    WEBHOOKS_PREFIX,
    WEBHOOKS_STREAM,
    dead_config,
    webhooks_config,
)

log = logging.getLogger("jetrun.webhooks")

TERMINAL_KINDS = ("completed", "failed", "timed_out", "preempted", "no_resources", "cancelled")
OUTBOX = "webhooks-outbox"
DELIVERER = "webhooks-deliverer"
MAX_REDELIVERIES = 20  # a delivery that keeps killing its deliverer goes to the dead letters
_delivery_decoder = msgspec.json.Decoder(Delivery)
_dead_decoder = msgspec.json.Decoder(DeadDelivery)
_json = msgspec.json.Encoder()


class Retry(Exception):
    """This attempt failed in a way that may pass: try again after a back-off."""


class GiveUp(Exception):
    """This delivery cannot succeed by retrying (a 4xx, a refused destination)."""


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
        self.delivered = 0
        self.dead = 0

    @property
    def ack_wait_s(self) -> float:
        """Longer than one attempt plus its back-off: in_progress() is sent before each."""
        return 2 * (self.policy.timeout_s + self.policy.max_backoff_s) + 1.0

    async def ensure(self) -> None:
        """Streams and the two durable consumers. Idempotent."""
        await self.log.ensure()
        replicas = self.settings.replicas
        for config in (webhooks_config(replicas=replicas), dead_config(replicas=replicas)):
            await ensure_stream(self.js, config, self.settings.setup_deadline_s)
        outbox = api.ConsumerConfig(
            durable_name=OUTBOX,
            filter_subjects=[f"{EVENTS_PREFIX}.*.{kind}" for kind in TERMINAL_KINDS],
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_wait=60.0,
            max_ack_pending=1024,
        )
        deliverer = api.ConsumerConfig(
            durable_name=DELIVERER,
            filter_subject=f"{WEBHOOKS_PREFIX}.>",
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_wait=self.ack_wait_s,
            max_ack_pending=4 * self.policy.concurrency,
        )
        await self._consumer(EVENTS_STREAM, outbox)
        await self._consumer(WEBHOOKS_STREAM, deliverer)

    async def _consumer(self, stream: str, config: api.ConsumerConfig) -> None:
        try:
            await self.js.add_consumer(stream, config)
        except BadRequestError as err:  # it exists with other settings: keep the operator's
            log.warning("consumer %s on %s kept as it is: %s", config.durable_name, stream, err)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Deliver until cancelled."""
        await self.ensure()
        outbox = await self.js.pull_subscribe_bind(durable=OUTBOX, stream=EVENTS_STREAM)
        pending = await self.js.pull_subscribe_bind(durable=DELIVERER, stream=WEBHOOKS_STREAM)
        transport = httpx.AsyncHTTPTransport(retries=0)
        async with (
            httpx.AsyncClient(transport=transport, trust_env=False) as http,
            anyio.create_task_group() as tg,
        ):
            self.http = http
            tg.start_soon(self._outbox_loop, outbox)
            tg.start_soon(self._deliver_loop, pending, tg)
            log.info("webhooks: delivering (ack_wait %.0f s)", self.ack_wait_s)
            task_status.started()

    # --- 1. outbox: terminal events -> deliveries ----------------------------------------------

    async def _outbox_loop(self, psub: JetStreamContext.PullSubscription) -> None:
        while True:
            for msg in await _fetch(psub, 64):
                try:
                    await self._on_terminal(msg)
                except Exception as err:
                    log.warning("webhooks outbox: %s will be retried: %r", msg.subject, err)
                    with contextlib.suppress(Exception):
                        await msg.nak(delay=1.0)

    async def _on_terminal(self, msg: Msg) -> None:
        seq = msg.metadata.sequence.stream
        event = decode_event(msg.data)
        submitted = await submission_of(self.log, event.run_id)
        url = getattr(submitted, "callback_url", None)
        if submitted is not None and url:
            stored = await self.log.read(event.run_id)
            before = fold((s.event for s in stored if s.seq < seq), run_id=event.run_id)
            after = evolve(before, event)
            if after.is_terminal and not before.is_terminal:  # the event that ended it
                await self._enqueue(Delivery(
                    delivery_id=delivery_id_for(event.run_id),
                    team=after.team,
                    url=url,
                    run=Run.of(after),
                ))  # fmt: skip
        await msg.ack_sync()

    async def _enqueue(self, delivery: Delivery, msg_id: str | None = None) -> None:
        subject = f"{WEBHOOKS_PREFIX}.{delivery.run.id}"
        headers = {"Nats-Msg-Id": msg_id or delivery.delivery_id}
        await self.js.publish(subject, _json.encode(delivery), headers=headers)

    # --- 2. deliverer: deliveries -> signed POSTs ---------------------------------------------

    async def _deliver_loop(self, psub: JetStreamContext.PullSubscription, tg: TaskGroup) -> None:
        slots = anyio.Semaphore(self.policy.concurrency)
        while True:
            await slots.acquire()
            msgs = await _fetch(psub, 1)
            if not msgs:
                slots.release()
                continue
            tg.start_soon(self._deliver_one, msgs[0], slots)

    async def _deliver_one(self, msg: Msg, slots: anyio.Semaphore) -> None:
        try:
            await self._deliver(msg)
        except Exception as err:  # NATS trouble: the delivery comes back after ack_wait
            log.warning("webhooks: %s not settled: %r", msg.subject, err)
        finally:
            slots.release()

    async def _deliver(self, msg: Msg) -> None:
        try:
            delivery = _delivery_decoder.decode(msg.data)
        except msgspec.MsgspecError as err:
            log.error("webhooks: undecodable delivery on %s dropped: %s", msg.subject, err)
            await msg.term()
            return
        team = self.config.teams.get(delivery.team)
        secret = team.webhook_secret if team is not None else None
        if not secret:
            await self._bury(msg, delivery, 0, f"team {delivery.team} has no webhook_secret")
            return
        if msg.metadata.num_delivered > MAX_REDELIVERIES:
            await self._bury(msg, delivery, 0, "redelivered too often (the deliverer kept dying)")
            return
        attempts = 0
        p = self.policy
        try:
            async for attempt in stamina.retry_context(
                on=Retry,
                attempts=p.max_attempts,
                timeout=None,
                wait_initial=p.initial_backoff_s,
                wait_max=p.max_backoff_s,
                wait_jitter=p.initial_backoff_s,
            ):
                with attempt:
                    attempts += 1
                    await msg.in_progress()
                    await self._post(delivery, secret)
        except (Retry, GiveUp) as failed:
            await self._bury(msg, delivery, attempts, str(failed))
            return
        await msg.ack_sync()
        self.delivered += 1
        log.info("webhooks: %s delivered", delivery.delivery_id, extra={"run_id": delivery.run.id})

    async def _post(self, delivery: Delivery, secret: str) -> None:
        """One signed POST; raises ``Retry`` or ``GiveUp`` unless the answer is 2xx."""
        try:
            host, port = check_callback_url(delivery.url, self.policy)
            address = await self._check_resolved(host, port)
        except DestinationRefused as refused:
            raise GiveUp(str(refused)) from None
        body = _json.encode(delivery.run)
        now = int(self.clock.now())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "jetrun-webhooks",
            DELIVERY_HEADER: delivery.delivery_id,
            TIMESTAMP_HEADER: str(now),
            SIGNATURE_HEADER: sign(secret, now, body),
        }
        status = await post_pinned(
            self.http, delivery.url, address, body, headers, self.policy.timeout_s
        )
        if 200 <= status < 300:
            return
        if status in (408, 425, 429) or status >= 500:
            raise Retry(f"HTTP {status}")
        raise GiveUp(f"HTTP {status}")

    async def _check_resolved(self, host: str, port: int) -> str:
        """The address to POST to: every address ``host`` resolves to is checked, and the
        POST goes to one of them (the name is not resolved again, so a DNS answer that
        changes between the check and the connection cannot aim it elsewhere)."""
        try:
            infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as err:
            raise Retry(f"cannot resolve {host}: {err}") from None
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
        for address in addresses:
            check_address(host, address, self.policy)
        if not addresses:
            raise Retry(f"{host} resolves to no address")
        return str(addresses[0])

    async def _bury(self, msg: Msg, delivery: Delivery, attempts: int, error: str) -> None:
        """Record the delivery in the dead letters, then ack it."""
        dead = DeadDelivery(delivery=delivery, attempts=attempts, error=error, at=self.clock.now())
        seq = msg.metadata.sequence.stream
        headers = {"Nats-Msg-Id": f"{delivery.delivery_id}:dead:{seq}"}
        subject = f"{DEAD_PREFIX}.{delivery.run.id}"
        await self.js.publish(subject, _json.encode(dead), headers=headers)
        await msg.ack_sync()
        self.dead += 1
        log.warning(
            "webhooks: %s failed after %d attempts: %s",
            delivery.delivery_id,
            attempts,
            error,
            extra={"run_id": delivery.run.id, "team": delivery.team},
        )


async def post_pinned(
    http: httpx.AsyncClient,
    url: str,
    address: str,
    body: bytes,
    headers: dict[str, str],
    timeout_s: float,
) -> int:
    """POST ``body`` to ``url`` at ``address`` (an IP the policy allowed; ``Host`` and TLS
    name stay the URL's) and return the status. The whole exchange has ``timeout_s``,
    however slowly a receiver answers, and the response body is never read (a receiver
    cannot make the deliverer hold gigabytes). Raises ``Retry`` on a timeout or an HTTP
    error."""
    target = httpx.URL(url)
    pinned = target.copy_with(host=address)
    headers = {**headers, "Host": target.netloc.decode("ascii")}
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    try:
        with anyio.fail_after(timeout_s):
            request = http.build_request(
                "POST", pinned, content=body, headers=headers, extensions=extensions
            )
            response = await http.send(request, stream=True)
            await response.aclose()  # the status is all a delivery needs
    except TimeoutError:
        raise Retry(f"no answer within {timeout_s} s") from None
    except httpx.HTTPError as err:
        raise Retry(f"{type(err).__name__}: {err}") from None
    return response.status_code


async def _fetch(psub: JetStreamContext.PullSubscription, batch: int) -> list[Msg]:
    """Up to ``batch`` messages; none after a second without any, or while NATS is away."""
    try:
        return await psub.fetch(batch, timeout=1.0)
    except nats.errors.TimeoutError:
        return []
    except Exception as err:  # disconnected, leader change: the durable consumer waits
        log.debug("webhooks: fetch failed: %r", err)
        await anyio.sleep(0.5)
        return []


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


async def replay(js: JetStreamContext, ids: set[str], everything: bool = False) -> list[str]:
    """Queue dead deliveries again (by delivery id or run id, or all); each leaves the dead
    letters once queued. Returns the delivery ids queued."""
    queued: list[str] = []
    for seq, dead in await dead_letters(js):
        d = dead.delivery
        if not everything and d.delivery_id not in ids and d.run.id not in ids:
            continue
        subject = f"{WEBHOOKS_PREFIX}.{d.run.id}"
        headers = {"Nats-Msg-Id": f"{d.delivery_id}:replay:{seq}"}
        await js.publish(subject, _json.encode(d), headers=headers)
        await js.delete_msg(DEAD_STREAM, seq)
        queued.append(d.delivery_id)
    return queued
