"""One scheduler decides at a time: a lease in a NATS KV bucket, a hot standby beside it.

The key ``scheduler`` of the bucket ``JETRUN_LEASES`` (values expire ``ttl_s`` after their last
write) holds the id of the scheduler that decides. A scheduler takes the lease with a create
(compare-and-set on an absent key), renews it with an update on the revision it wrote, and gives
it back (a delete on its revision) when it stops. A standby follows the log like the leader (its
index is hot) and tries to take the lease every ``poll_s``: it gets it at most ``ttl_s`` after
the leader's last renewal, so a leader that died is replaced within a few seconds.

A write whose answer was lost (a timeout on a loaded machine, the server frozen for a moment)
may still have been stored: a refused or unanswered write is followed by a read of the key,
and a key holding this process's own id is its lease (at the revision read). Without that, a
standby whose create timed out but landed would find the key taken (by itself) and wait a
whole TTL, again and again on a busy machine; a leader would step down for a renewal that in
fact went through.

The lease says who should decide; it does not stop a stale leader (frozen, cut off, its clock
wrong) from appending: the fence does (``runtime.infra.fence``), on the server. A leader still
counts its lease from *before* the write that renewed it and stops counting ``margin_s`` early
(``valid``) to step down in time. The deterministic message ids of decisions (run, kind,
attempt) remain the last line: the same decision made twice is stored once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import anyio
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

from runtime.infra.jsretry import retrying
from runtime.infra.streamsetup import require_stream

log = logging.getLogger("jetrun.lease")

LEASE_BUCKET = "JETRUN_LEASES"
SCHEDULER_KEY = "scheduler"
LEASE_TTL_S = 3.0
SETUP_DEADLINE_S = 120.0  # as long as the other streams' setup may take on a cluster
LOST = (nats.errors.Error, nats.js.errors.Error, TimeoutError, OSError)


class Lease:
    def __init__(
        self,
        js: JetStreamContext,
        holder: str,
        *,
        monotonic: Callable[[], float],
        key: str = SCHEDULER_KEY,
        ttl_s: float = LEASE_TTL_S,
        replicas: int = 1,
    ) -> None:
        self.js, self.holder, self.key = js, holder, key
        self.monotonic = monotonic
        self.ttl_s, self.replicas = ttl_s, replicas
        self.margin_s = ttl_s / 3
        self.renew_every_s = ttl_s / 6
        self.poll_s = ttl_s / 6
        self._kv: KeyValue | None = None
        self._revision = 0
        self._until: float | None = None  # on this process's monotonic clock

    async def ensure(self) -> None:
        """Create the bucket if it is missing (an existing one keeps its settings). Retries
        outages like every stream's setup: on a cluster that is still electing its leaders a
        lookup can time out, and a scheduler must not die of that at startup."""

        async def attempt() -> KeyValue:
            try:
                return await self.js.key_value(LEASE_BUCKET)
            except nats.js.errors.BucketNotFoundError:
                config = KeyValueConfig(
                    bucket=LEASE_BUCKET, history=1, ttl=self.ttl_s, replicas=self.replicas
                )
                return await self.js.create_key_value(config)

        self._kv = await retrying(f"ensure bucket {LEASE_BUCKET}", attempt, SETUP_DEADLINE_S)

    async def require(self) -> None:
        """Wait until the bucket exists (``jetrun setup`` creates it), then use it."""
        await require_stream(self.js, f"KV_{LEASE_BUCKET}", 120.0)
        self._kv = await self.js.key_value(LEASE_BUCKET)

    def valid(self) -> bool:
        """Whether this process holds the lease now (with the safety margin)."""
        return self._until is not None and self.monotonic() < self._until

    @property
    def term(self) -> int:
        """The revision the lease was last written at by this process."""
        return self._revision

    async def acquire(self) -> int:
        """Block until this process holds the lease; returns its term (the revision taken)."""
        while True:
            if await self._try(take=True):
                return self._revision
            await anyio.sleep(self.poll_s)

    async def keep(self) -> None:
        """Renew the lease until it is lost (a renewal refused, or none got through in time);
        returns then."""
        while True:
            await anyio.sleep(self.renew_every_s)
            if not await self._try(take=False) and not self.valid():
                self._until = None
                return

    async def release(self) -> None:
        """Give the lease back at once (a standby need not wait for it to expire)."""
        if self._kv is None or self._until is None:
            return
        self._until = None
        with contextlib.suppress(*LOST):
            await self._kv.delete(self.key, last=self._revision)

    async def _try(self, *, take: bool) -> bool:
        assert self._kv is not None, "ensure() first"
        started = self.monotonic()
        value = self.holder.encode()
        try:
            with anyio.fail_after(self.margin_s):
                if take:
                    revision = await self._kv.create(self.key, value)
                else:
                    revision = await self._kv.update(self.key, value, last=self._revision)
        except (nats.js.errors.KeyWrongLastSequenceError, *LOST) as err:
            mine = await self._own_revision()  # the write may have landed, its answer lost
            if mine is None:
                self._refused(err, take=take)
                return False
            revision = mine
        self._revision = revision
        self._until = started + self.ttl_s - self.margin_s
        return True

    async def _own_revision(self) -> int | None:
        """The key's revision if it holds this process's id (a write of ours landed)."""
        assert self._kv is not None
        try:
            with anyio.fail_after(self.margin_s):
                entry = await self._kv.get(self.key)
        except (nats.js.errors.KeyNotFoundError, *LOST):
            return None
        if entry.value != self.holder.encode() or entry.revision is None:
            return None
        return int(entry.revision)

    def _refused(self, err: BaseException, *, take: bool) -> None:
        if take:
            return  # somebody else holds it: try again later
        if isinstance(err, nats.js.errors.KeyWrongLastSequenceError):
            log.warning("%s: the scheduler lease was taken over", self.holder)
            self._until = None  # ours ran out
        else:
            log.warning("%s: could not renew the scheduler lease (%r)", self.holder, err)


__all__ = ["LEASE_BUCKET", "SCHEDULER_KEY", "Lease"]
