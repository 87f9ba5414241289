"""A per-team cap on open streaming responses, exact across every gateway process.

A followed log (``GET /v4/runs/{id}/logs?follow=1``) or a streamed run (``POST
/v4/runs/stream``) keeps its connection busy until the run ends, and a busy connection is never
evicted by the connection cap (``runtime.infra.http_server``). Without a share per team, one tenant
could open a stream per connection the gateways have, on a run that waits, and every other
team's requests would be refused. ``settings.max_streams_per_team`` streams may be open per team
in all (however many gateways, ``jetrun up --gateways N`` included); past that a request is
answered ``429 too_many_streams`` (``Retry-After``), before anything is recorded.

The count lives on NATS (``JETRUN_STREAM_SLOTS``, ``runtime.infra.streams``): slot ``n`` of a team
is the subject ``jetrun.streams.<team>.<n>``, which holds at most one message. A gateway takes a
free slot by publishing on it with ``Nats-Expected-Last-Subject-Sequence: 0`` (the server refuses
it when the slot is held: two gateways never take the same one), renews the slots it holds every
third of their time to live (on its own last sequence), and gives one back by deleting its
message. A gateway that dies without giving its slots back loses them after the time to live.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Awaitable, Callable

import anyio
from nats.js import JetStreamContext
from nats.js.errors import APIError
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from contracts.api import ErrorDetail
from runtime.control.http_input import HTTPError
from runtime.infra.jsretry import RETRYABLE
from runtime.infra.streams import (
    STREAM_SLOT_TTL_S,
    STREAM_SLOTS_PREFIX,
    STREAM_SLOTS_STREAM,
    stream_slots_config,
)
from runtime.infra.streamsetup import ensure_stream, require_stream

log = logging.getLogger("jetrun.streamquota")

Release = Callable[[], Awaitable[None]]
WRONG_LAST_SEQUENCE = 10071  # the slot is held
SETUP_DEADLINE_S = 120.0


def slot_subject(team: str, n: int) -> str:
    return f"{STREAM_SLOTS_PREFIX}.{team}.{n}"


def _taken(err: Exception) -> bool:
    return isinstance(err, APIError) and err.err_code == WRONG_LAST_SEQUENCE


class StreamQuota:
    def __init__(
        self,
        js: JetStreamContext,
        per_team: int,
        *,
        replicas: int = 1,
        ttl_s: float = STREAM_SLOT_TTL_S,
    ) -> None:
        self.js = js
        self.per_team = per_team
        self.replicas = replicas
        self.ttl_s = ttl_s
        self.held: dict[str, int] = {}  # slot subject -> sequence of our message on it

    async def ensure(self) -> None:
        """Create the slots stream (the admin step)."""
        config = stream_slots_config(replicas=self.replicas, ttl_s=self.ttl_s)
        await ensure_stream(self.js, config, SETUP_DEADLINE_S)

    async def require(self) -> None:
        await require_stream(self.js, STREAM_SLOTS_STREAM, SETUP_DEADLINE_S)

    async def acquire(self, team: str) -> Release:
        """Take one of ``team``'s slots; 429 ``too_many_streams`` when every one is held (by
        any gateway), 503 when NATS cannot say. Await the returned function exactly once
        (``Held`` does it when the response ends)."""
        first = random.randrange(self.per_team)  # gateways mostly try different slots first
        for i in range(self.per_team):
            subject = slot_subject(team, (first + i) % self.per_team)
            if subject in self.held:
                continue
            seq = await self._publish(subject, expected=0)
            if seq is not None:
                self.held[subject] = seq
                return self._releaser(subject)
        message = (
            f"team {team} already holds {self.per_team} open streams (the limit, counted over "
            "every gateway); close one, or poll instead"
        )
        detail = ErrorDetail(code="too_many_streams", message=message)
        raise HTTPError(429, detail, {"Retry-After": "5"})

    async def _publish(self, subject: str, *, expected: int) -> int | None:
        """Our message on ``subject`` if its last sequence is ``expected``; its sequence, or
        None if the slot is held by another."""
        headers = {"Nats-Expected-Last-Subject-Sequence": str(expected)}
        try:
            ack = await self.js.publish(subject, b"", headers=headers, timeout=5.0)
        except APIError as err:
            if _taken(err):
                return None
            raise self._unavailable(err) from None
        except RETRYABLE as err:
            raise self._unavailable(err) from None
        return int(ack.seq)

    def _unavailable(self, err: Exception) -> HTTPError:
        log.warning("cannot take a stream slot: %r", err)
        message = "cannot count the team's open streams: NATS is unavailable; retry"
        return HTTPError(503, ErrorDetail(code="event_log_unavailable", message=message))

    def _releaser(self, subject: str) -> Release:
        released = False

        async def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            seq = self.held.pop(subject, None)
            if seq is not None:
                await self._delete(seq)

        return release

    async def _delete(self, seq: int) -> None:
        """Give a slot back; if NATS cannot be reached, it expires after its time to live."""
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            with anyio.fail_after(5.0):
                await self.js.delete_msg(STREAM_SLOTS_STREAM, seq)

    async def renew(self) -> None:
        """Publish again on every slot held here (before the time to live ends them). A slot
        lost meanwhile (an outage longer than the time to live) is taken again if free."""
        for subject, seq in list(self.held.items()):
            try:
                renewed = await self._publish(subject, expected=seq)
                if renewed is None:
                    renewed = await self._publish(subject, expected=0)
            except HTTPError:
                continue  # NATS is away: the next round tries again
            if subject not in self.held:  # given back meanwhile, to the old sequence
                if renewed is not None:
                    await self._delete(renewed)
                continue
            if renewed is None:
                log.warning("stream slot %s was lost and is held by another gateway", subject)
                self.held.pop(subject, None)
            else:
                self.held[subject] = renewed

    async def renew_loop(self) -> None:
        """``renew`` every third of the time to live, until cancelled; then give every slot
        held here back."""
        try:
            while True:
                await anyio.sleep(self.ttl_s / 3)
                await self.renew()
        finally:
            with anyio.CancelScope(shield=True):
                for subject in list(self.held):
                    await self._releaser(subject)()


class Held(Response):
    """``response``, and ``release`` once it has ended (finished, failed or disconnected)."""

    def __init__(self, response: Response, release: Release) -> None:  # no super().__init__
        self.response, self.release = response, release
        self.status_code = response.status_code

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.response(scope, receive, send)
        finally:
            await self.release()
