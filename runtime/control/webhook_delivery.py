"""Delivering webhooks, fairly between teams: one team's slow or dead endpoint never holds
another team's callbacks.

Each delivery is stored on ``jetrun.webhooks.pending.<team>.<run_id>``, and each team in the
config has a durable consumer of its own (``webhooks-team-<team>``) whose ``max_ack_pending``
is the team's cap (``[webhooks] team_concurrency``): a team's hung deliveries fill only its own
consumer, never the stream's other teams'. The deliverer's slots (``concurrency``) are shared
by the teams in the order they asked for one (a FIFO semaphore), so a team waits at most for
one delivery of each other team ahead of it; a delivery waiting for a slot keeps its message
(``in_progress``) so it is not handed out twice.

One attempt: a signed POST with retries, exponential back-off and jitter (stamina) on timeouts,
connection errors, 408, 425, 429 and 5xx; ack after a 2xx. Another 4xx, a refused destination,
or the last failed attempt moves it to ``JETRUN_WEBHOOKS_DEAD`` (then ack).

Deliveries an older deliverer queued on ``jetrun.webhooks.pending.<run_id>`` (no team) are
drained from its consumer (``webhooks-deliverer``), which is deleted once empty.
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
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError, NotFoundError

from contracts.webhooks import DeadDelivery, Delivery
from runtime.control.webhook_policy import (
    DELIVERY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    DestinationRefused,
    check_address,
    check_callback_url,
    sign,
)
from runtime.infra.clock import Clock
from runtime.infra.config import Config
from runtime.infra.streams import DEAD_PREFIX, WEBHOOKS_PREFIX, WEBHOOKS_STREAM

log = logging.getLogger("jetrun.webhooks")

TEAM_CONSUMER = "webhooks-team-{team}"
LEGACY_DELIVERER = "webhooks-deliverer"  # the one consumer of deliveries queued without a team
MAX_REDELIVERIES = 20  # a delivery that keeps killing its deliverer goes to the dead letters
_delivery_decoder = msgspec.json.Decoder(Delivery)
_json = msgspec.json.Encoder()


class Retry(Exception):
    """This attempt failed in a way that may pass: try again after a back-off."""


class GiveUp(Exception):
    """This delivery cannot succeed by retrying (a 4xx, a refused destination)."""


def pending_subject(team: str, run_id: str) -> str:
    return f"{WEBHOOKS_PREFIX}.{team}.{run_id}"


def team_consumer(team: str) -> str:
    return TEAM_CONSUMER.format(team=team)


class Deliverer:
    """The deliveries of every team in the config; ``run`` delivers until cancelled."""

    def __init__(self, js: JetStreamContext, config: Config, clock: Clock) -> None:
        self.js, self.config, self.clock = js, config, clock
        self.policy = config.webhooks
        self.slots = anyio.Semaphore(self.policy.concurrency)  # waiters served in FIFO order
        self.team_cap = max(1, min(self.policy.team_concurrency, self.policy.concurrency))
        self.delivered = 0
        self.dead = 0
        self.http: httpx.AsyncClient | None = None

    @property
    def ack_wait_s(self) -> float:
        """Longer than one attempt plus its back-off: in_progress() is sent before each."""
        return 2 * (self.policy.timeout_s + self.policy.max_backoff_s) + 1.0

    async def ensure(self) -> None:
        """One durable consumer per team in the config. Idempotent."""
        for team in self.config.teams:
            config = api.ConsumerConfig(
                durable_name=team_consumer(team),
                filter_subject=pending_subject(team, "*"),
                ack_policy=api.AckPolicy.EXPLICIT,
                deliver_policy=api.DeliverPolicy.ALL,
                ack_wait=self.ack_wait_s,
                max_ack_pending=self.team_cap,
            )
            try:
                await self.js.add_consumer(WEBHOOKS_STREAM, config)
            except BadRequestError as err:  # it exists with other settings: the operator's
                log.warning("consumer %s kept as it is: %s", config.durable_name, err)

    async def run(self, http: httpx.AsyncClient) -> None:
        self.http = http
        async with anyio.create_task_group() as tg:
            for team in self.config.teams:
                psub = await self.js.pull_subscribe_bind(
                    durable=team_consumer(team), stream=WEBHOOKS_STREAM
                )
                tg.start_soon(self._team_loop, psub)
            tg.start_soon(self._legacy_loop)

    async def _team_loop(self, psub: JetStreamContext.PullSubscription) -> None:
        mine = anyio.Semaphore(self.team_cap)
        async with anyio.create_task_group() as tg:
            while True:
                await mine.acquire()
                msgs = await fetch(psub, 1, timeout=2.0)
                if not msgs:
                    mine.release()
                    continue
                tg.start_soon(self._deliver_one, msgs[0], mine)

    async def _deliver_one(self, msg: Msg, mine: anyio.Semaphore) -> None:
        try:
            await self._take_slot(msg)
            try:
                await self.deliver(msg)
            finally:
                self.slots.release()
        except Exception as err:  # NATS trouble: the delivery comes back after ack_wait
            log.warning("webhooks: %s not settled: %r", msg.subject, err)
        finally:
            mine.release()

    async def _take_slot(self, msg: Msg) -> None:
        """Wait for a shared slot, keeping ``msg`` ours meanwhile."""
        async with anyio.create_task_group() as tg:

            async def keep() -> None:
                while True:
                    await anyio.sleep(self.ack_wait_s / 3)
                    with contextlib.suppress(Exception):
                        await msg.in_progress()

            tg.start_soon(keep)
            await self.slots.acquire()
            tg.cancel_scope.cancel()

    async def _legacy_loop(self) -> None:
        """Deliver what an older deliverer queued without a team, then delete its consumer."""
        try:
            await self.js.consumer_info(WEBHOOKS_STREAM, LEGACY_DELIVERER)
        except NotFoundError:
            return  # none: nothing was queued the old way
        psub = await self.js.pull_subscribe_bind(durable=LEGACY_DELIVERER, stream=WEBHOOKS_STREAM)
        while True:
            msgs = await fetch(psub, 16)
            for msg in msgs:
                if msg.subject.count(".") == 3:  # jetrun.webhooks.pending.<run_id>
                    async with self.slots:
                        await self.deliver(msg)
                else:  # queued per team: that team's consumer delivers it
                    await msg.ack()
            if not msgs:
                info = await psub.consumer_info()
                if not info.num_pending and not info.num_ack_pending:
                    with contextlib.suppress(Exception):
                        await self.js.delete_consumer(WEBHOOKS_STREAM, LEGACY_DELIVERER)
                    log.info("webhooks: deliveries queued without a team all settled")
                    return

    async def deliver(self, msg: Msg) -> None:
        try:
            delivery = _delivery_decoder.decode(msg.data)
        except msgspec.MsgspecError as err:
            log.error("webhooks: undecodable delivery on %s dropped: %s", msg.subject, err)
            await msg.term()
            return
        team = self.config.teams.get(delivery.team)
        secret = team.webhook_secret if team is not None else None
        seq = msg.metadata.sequence.stream
        if not secret:
            await self.bury(delivery, 0, f"team {delivery.team} has no webhook_secret", seq)
            await msg.ack_sync()
            return
        if msg.metadata.num_delivered > MAX_REDELIVERIES:
            error = "redelivered too often (the deliverer kept dying)"
            await self.bury(delivery, 0, error, seq)
            await msg.ack_sync()
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
            await self.bury(delivery, attempts, str(failed), seq)
            await msg.ack_sync()
            return
        await msg.ack_sync()
        self.delivered += 1
        log.info("webhooks: %s delivered", delivery.delivery_id, extra={"run_id": delivery.run.id})

    async def _post(self, delivery: Delivery, secret: str) -> None:
        """One signed POST; raises ``Retry`` or ``GiveUp`` unless the answer is 2xx."""
        assert self.http is not None
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

    async def bury(self, delivery: Delivery, attempts: int, error: str, seq: int | str) -> None:
        """Record the delivery in the dead letters (``seq`` makes the record's id)."""
        dead = DeadDelivery(delivery=delivery, attempts=attempts, error=error, at=self.clock.now())
        headers = {"Nats-Msg-Id": f"{delivery.delivery_id}:dead:{seq}"}
        subject = f"{DEAD_PREFIX}.{delivery.run.id}"
        await self.js.publish(subject, _json.encode(dead), headers=headers)
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


async def fetch(
    psub: JetStreamContext.PullSubscription, batch: int, timeout: float = 1.0
) -> list[Msg]:
    """Up to ``batch`` messages; none after ``timeout`` without any, or while NATS is away."""
    try:
        return await psub.fetch(batch, timeout=timeout)
    except nats.errors.TimeoutError:
        return []
    except Exception as err:  # disconnected, leader change: the durable consumer waits
        log.debug("webhooks: fetch failed: %r", err)
        await anyio.sleep(0.5)
        return []
