"""Whether a run can flow: the scheduler's heartbeat and the checks behind a gateway's /readyz.

The scheduler publishes a ``SchedulerHeartbeat`` on the plain subject
``jetrun.scheduler.heartbeat`` every heartbeat interval once it has caught up with the log.
Anyone may listen (``SchedulerWatch``); the gateway's ``Readiness`` combines it with the NATS
connection, the event-log stream being present, and the store taking writes (a probe message on
its own small stream, so the run log stays clean). The checks that ask NATS are cached for a
second so probes cannot hammer NATS; the others are read fresh on every probe.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable

import anyio
import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.js import JetStreamContext, api
from nats.js.errors import NoStreamResponseError, NotFoundError

from contracts.agents import SchedulerHeartbeat
from runtime.infra.clock import Clock
from runtime.infra.guard import Guard
from runtime.infra.peers import SCHEDULER_HEARTBEAT_SUBJECT
from runtime.infra.streams import EVENTS_STREAM, PROBE_PREFIX, PROBE_STREAM, probe_config
from runtime.infra.streamsetup import ensure_stream, require_stream

log = logging.getLogger("jetrun.readiness")

CHECK_TIMEOUT_S = 1.0
CACHE_S = 1.0
# a page's worth, so a probe needs fresh space on the store's disk (a tiny one fits in a page
# already allocated and succeeds long after the disk is full)
PROBE_PAYLOAD = b"\0" * 4096

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(SchedulerHeartbeat)


async def publish_scheduler_heartbeats(
    nc: Client, beat: Callable[[], SchedulerHeartbeat], interval_s: float, clock: Clock
) -> None:
    """Publish ``beat()`` every ``interval_s`` until cancelled; a beat lost to a disconnect
    is not retried (the next one will do)."""
    while True:
        try:
            await nc.publish(SCHEDULER_HEARTBEAT_SUBJECT, _encoder.encode(beat()))
        except Exception as err:
            log.debug("scheduler heartbeat not sent: %r", err)
        await clock.sleep(interval_s)


class SchedulerWatch:
    """Hears scheduler heartbeats; ``alive()`` when one arrived within ``timeout_s`` on this
    process's monotonic clock."""

    def __init__(self, monotonic: Callable[[], float], timeout_s: float) -> None:
        self.monotonic = monotonic
        self.timeout_s = timeout_s
        self.last: SchedulerHeartbeat | None = None
        self._heard_at = float("-inf")

    async def subscribe(self, nc: Client, guard: Guard) -> Subscription:
        callback = guard.wrap("scheduler heartbeat handler", self._on_beat)
        return await nc.subscribe(SCHEDULER_HEARTBEAT_SUBJECT, cb=callback)

    async def _on_beat(self, msg: Msg) -> None:
        try:
            self.last = _decoder.decode(msg.data)
        except msgspec.MsgspecError:
            log.warning("undecodable scheduler heartbeat")
            return
        self._heard_at = self.monotonic()

    def alive(self) -> bool:
        return self.monotonic() - self._heard_at <= self.timeout_s


def new_scheduler_id() -> str:
    return f"scheduler-{uuid.uuid4().hex[:8]}"


class Readiness:
    """The gateway's readiness checks. ``checks()`` never raises and never blocks for more
    than about ``CHECK_TIMEOUT_S``."""

    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        watch: SchedulerWatch,
        *,
        replayed: Callable[[], bool],
        replicas: int = 1,
    ) -> None:
        self.nc = nc
        self.js = js
        self.watch = watch
        self.replayed = replayed
        self.replicas = replicas
        self._probe_subject = f"{PROBE_PREFIX}.{uuid.uuid4().hex}"
        self._cached: tuple[float, dict[str, bool]] | None = None

    def _probe_config(self) -> api.StreamConfig:
        return probe_config(replicas=self.replicas)

    async def ensure(self) -> None:
        """Create the probe stream. Idempotent. Needs the admin role."""
        await ensure_stream(self.js, self._probe_config(), 120.0)

    async def require(self) -> None:
        """Wait until the probe stream exists (``jetrun setup`` creates it)."""
        await require_stream(self.js, PROBE_STREAM, 120.0)

    async def checks(self) -> dict[str, bool]:
        """Checks of this process's own state are read fresh (a gateway that has just caught
        up says so on the next probe); the two that ask NATS are cached for ``CACHE_S``."""
        connected = self.nc.is_connected
        store = await self._store_checks() if connected else {}
        return {
            "nats_connected": connected,
            "event_log_replayed": self.replayed(),
            "event_log_stream": connected and store["event_log_stream"],
            "store_writable": connected and store["store_writable"],
            "scheduler_alive": self.watch.alive(),
        }

    async def _store_checks(self) -> dict[str, bool]:
        now = time.monotonic()
        if self._cached is not None and now - self._cached[0] < CACHE_S:
            return self._cached[1]
        results = {
            "event_log_stream": await self._bounded(self._stream_present),
            "store_writable": await self._bounded(self._probe),
        }
        self._cached = (time.monotonic(), results)
        return results

    async def _bounded(self, check: Callable[[], Awaitable[bool]]) -> bool:
        with anyio.move_on_after(CHECK_TIMEOUT_S):
            try:
                return await check()
            except Exception as err:
                log.info("readiness check %s failed: %r", check.__name__, err)
                return False
        return False

    async def _stream_present(self) -> bool:
        try:
            await self.js.stream_info(EVENTS_STREAM)
        except NotFoundError:
            return False
        return True

    async def _probe(self) -> bool:
        """One small write to the store (the probe stream is recreated if it was deleted)."""
        try:
            await self.js.publish(self._probe_subject, PROBE_PAYLOAD, timeout=CHECK_TIMEOUT_S)
        except (NoRespondersError, NoStreamResponseError):  # the probe stream is gone
            await self.js.add_stream(self._probe_config())
            await self.js.publish(self._probe_subject, PROBE_PAYLOAD, timeout=CHECK_TIMEOUT_S)
        return True
