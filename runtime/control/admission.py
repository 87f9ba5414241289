"""Tier admission, exact across any number of gateway processes.

Each distinct tier limit N has a stream ``JETRUN_ADMIT_<N>`` with ``max_msgs_per_subject=N``,
``discard=new`` per subject, and ``max_age`` = the lookback window. A team's permits are messages
on ``jetrun.admit.<N>.<team>``: the server itself refuses the (N+1)th, so concurrent gateways can
never admit more than N. A permit is given back by deleting its message when the run ends; a
permit older than the lookback window expires by itself, which is the lookback rule.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import anyio
import msgspec
from nats.js import JetStreamContext, api
from nats.js.errors import APIError, NotFoundError

from contracts.events import AdmissionSlot
from contracts.run import RunRecord
from runtime.infra import jspub
from runtime.infra.config import Config
from runtime.infra.jsretry import RETRYABLE, retrying
from runtime.infra.streams import admission_config, admission_stream
from runtime.infra.streamsetup import ensure_stream, require_stream

log = logging.getLogger("jetrun.admission")

PER_SUBJECT_LIMIT_REACHED = 10077
SETUP_DEADLINE_S = 120.0  # creating streams on a cluster waits for leader elections


class Permit(msgspec.Struct, frozen=True, kw_only=True):
    run_id: str
    team: str
    at: float


class LimitReached(Exception):
    """The team is at its tier's concurrency limit; no run was created."""

    def __init__(self, tier: str, limit: int, active: int) -> None:
        super().__init__(
            f"team is at the {tier} tier's limit of {limit} concurrent runs ({active} active)"
        )
        self.tier, self.limit, self.active = tier, limit, active


def stream_name(limit: int) -> str:
    return admission_stream(limit)


def permit_subject(limit: int, team: str) -> str:
    return f"jetrun.admit.{limit}.{team}"


DELETE_API = "$JS.API.STREAM.MSG.DELETE"
RELEASE_TRY_S = 5.0  # one try of giving a permit back
DELETE_FAILED = 10057  # the server's answer for a message that is not there


class _Delete(msgspec.Struct, frozen=True):
    seq: int
    no_erase: bool = True  # deleted, not overwritten first: a permit holds no secret


_encoder = msgspec.json.Encoder()
_delete_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Permit)
Lookup = Callable[[str], RunRecord | None]


class Admission:
    """Takes and gives back permits. ``lookup`` reads a run from a local projection; it is used
    to reclaim permits of runs that ended before their permit was given back."""

    def __init__(
        self,
        js: JetStreamContext,
        limits: set[int],
        *,
        lookback_s: float,
        replicas: int = 1,
        lookup: Lookup | None = None,
        deadline_s: float = 30.0,
    ) -> None:
        self.js = js
        self.limits = limits
        self.lookback_s = lookback_s
        self.replicas = replicas
        self.lookup = lookup
        self.deadline_s = deadline_s

    async def ensure(self) -> None:
        """Create or update one stream per distinct limit. Idempotent."""
        async with anyio.create_task_group() as tg:
            for limit in sorted(self.limits):
                tg.start_soon(ensure_stream, self.js, self._config(limit), SETUP_DEADLINE_S)

    async def require(self) -> None:
        """Wait until every permit stream exists (``jetrun setup`` creates them)."""
        async with anyio.create_task_group() as tg:
            for limit in sorted(self.limits):
                tg.start_soon(require_stream, self.js, stream_name(limit), SETUP_DEADLINE_S)

    def _config(self, limit: int) -> api.StreamConfig:
        return admission_config(limit, lookback_s=self.lookback_s, replicas=self.replicas)

    async def try_admit(
        self, *, team: str, tier: str, limit: int | None, run_id: str, now: float
    ) -> AdmissionSlot | None:
        """Take a permit for ``run_id``; None when the tier is unlimited. Idempotent per run.
        Raises ``LimitReached`` when the team is at its limit (after reclaiming permits of runs
        that have already ended)."""
        if limit is None:
            return None
        try:
            return await self._take(limit, team, run_id, now)
        except LimitReached as full:
            if not await self._reclaim(limit, team):
                raise LimitReached(tier, limit, full.active) from None
        try:
            return await self._take(limit, team, run_id, now)
        except LimitReached as full:
            raise LimitReached(tier, limit, full.active) from None

    async def _take(self, limit: int, team: str, run_id: str, now: float) -> AdmissionSlot:
        """Publish the run's permit (message id = run id, so a retry takes one permit). A
        retry that finds its permit already given back (the sweep returned it while the run's
        outcome was unknown) takes a fresh one under a derived id."""
        payload = _encoder.encode(Permit(run_id=run_id, team=team, at=now))
        subject = permit_subject(limit, team)
        msg_id = run_id
        for _ in range(3):
            ack = await self._publish(subject, payload, msg_id, limit)
            slot = AdmissionSlot(stream=stream_name(limit), seq=ack.seq)
            if not ack.duplicate or await self._held(slot):
                return slot
            msg_id = f"{run_id}:{ack.seq}"  # concurrent retries derive the same id
        raise LimitReached("", limit, limit)

    async def _publish(self, subject: str, payload: bytes, msg_id: str, limit: int) -> api.PubAck:
        async def publish() -> api.PubAck:
            return await self.js.publish(subject, payload, headers={"Nats-Msg-Id": msg_id})

        try:
            return await retrying(f"admit {subject}", publish, self.deadline_s)
        except APIError as err:
            if err.err_code != PER_SUBJECT_LIMIT_REACHED:
                raise
            raise LimitReached("", limit, limit) from None

    async def _held(self, slot: AdmissionSlot) -> bool:
        """Whether the permit at ``slot`` is still there."""

        async def get() -> object:
            return await self.js.get_msg(slot.stream, slot.seq)

        try:
            await retrying(f"check {slot.stream}:{slot.seq}", get, self.deadline_s)
        except NotFoundError:
            return False
        return True

    async def _reclaim(self, limit: int, team: str) -> bool:
        """Give back the permits of this team's runs that have ended; True if any was freed."""
        if self.lookup is None:
            return False
        freed = False
        for seq, permit in await self.holders(limit, team):
            run = self.lookup(permit.run_id)
            if run is not None and run.is_terminal:
                freed |= await self.release(AdmissionSlot(stream=stream_name(limit), seq=seq))
        return freed

    async def holders(self, limit: int, team: str) -> list[tuple[int, Permit]]:
        """The permits a team holds under ``limit``: at most ``limit`` messages."""
        return await self._scan(stream_name(limit), permit_subject(limit, team))

    async def all_permits(self) -> list[tuple[AdmissionSlot, Permit]]:
        found = []
        for limit in sorted(self.limits):
            name = stream_name(limit)
            for seq, permit in await self._scan(name, f"jetrun.admit.{limit}.>"):
                found.append((AdmissionSlot(stream=name, seq=seq), permit))
        return found

    async def _scan(self, stream: str, subject: str) -> list[tuple[int, Permit]]:
        found: list[tuple[int, Permit]] = []
        seq = 1
        while True:
            try:
                msg = await self.js.get_msg(stream, seq=seq, subject=subject, next=True)
            except NotFoundError:
                return found
            if msg.data is not None and msg.seq is not None:
                try:
                    found.append((msg.seq, _decoder.decode(msg.data)))
                except msgspec.DecodeError:
                    log.warning("skipping undecodable permit %s:%s", stream, msg.seq)
            seq = (msg.seq or seq) + 1

    async def release(self, slot: AdmissionSlot) -> bool:
        """Give a permit back. Idempotent: False if it was already gone."""
        try:
            return bool(await self.js.delete_msg(slot.stream, slot.seq))
        except (NotFoundError, APIError):
            return False

    async def release_all(self, slots: Sequence[AdmissionSlot]) -> list[bool | Exception]:
        """Give permits back together from this task: every delete is sent, then the answers
        are awaited (no task, and not nats-py's request path, per permit; not erased, only
        deleted). Per slot: True, False if it was already gone, or the exception of an outage
        (give that one back later with ``release``, or leave it to the sweep)."""
        publisher = jspub.publisher_of(self.js)
        sent: list[jspub.Pending | Exception] = []
        try:
            for slot in slots:
                subject = f"{DELETE_API}.{slot.stream}"
                data = _delete_encoder.encode(_Delete(seq=slot.seq))
                try:
                    sent.append(await publisher.send(subject, data, None, RELEASE_TRY_S))
                except RETRYABLE as err:
                    sent.append(err)
            results: list[bool | Exception] = []
            for pending in sent:
                if isinstance(pending, Exception):
                    results.append(pending)
                    continue
                try:
                    await pending.ack()
                    results.append(True)
                except APIError as err:  # 10057: no such message (already given back)
                    gone = err.err_code == DELETE_FAILED or not isinstance(err, RETRYABLE)
                    results.append(False if gone else err)
                except RETRYABLE as err:
                    results.append(err)
            return results
        finally:
            for pending in sent:
                if isinstance(pending, jspub.Pending):
                    pending.cancel()

    async def sweep(self, now: float, grace_s: float) -> int:
        """Give back permits of ended runs, and of runs that never got recorded (a gateway
        that died between the permit and the event) once older than ``grace_s``."""
        if self.lookup is None:
            return 0
        released = 0
        for slot, permit in await self.all_permits():
            run = self.lookup(permit.run_id)
            ended = run is not None and run.is_terminal
            orphan = run is None and now - permit.at > grace_s
            if (ended or orphan) and await self.release(slot):
                released += 1
        return released

    @classmethod
    def for_config(
        cls,
        js: JetStreamContext,
        config: Config,
        *,
        replicas: int,
        lookup: Lookup | None,
        deadline_s: float = 30.0,
    ) -> Admission:
        """One permit stream per distinct limit among the config's tiers."""
        limits = {v for v in config.tiers.values() if v is not None}
        return cls(
            js,
            limits,
            lookback_s=config.settings.lookback_s,
            replicas=replicas,
            lookup=lookup,
            deadline_s=deadline_s,
        )
