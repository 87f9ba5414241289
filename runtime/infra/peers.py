"""The schedulers of a release before the batched events, heard by their heartbeats.

The scheduler publishes a ``SchedulerHeartbeat`` on ``jetrun.scheduler.heartbeat``; one of
this release says ``batches``. The leading scheduler (its dispatches) and every agent (its
ends) hear them, and write no batch while one of an earlier release was heard lately.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from contracts.agents import SchedulerHeartbeat
from runtime.infra.guard import Guard

log = logging.getLogger("jetrun.peers")

SCHEDULER_HEARTBEAT_SUBJECT = "jetrun.scheduler.heartbeat"
_decoder = msgspec.json.Decoder(SchedulerHeartbeat)


class PeerSchedulers:
    """The other schedulers' heartbeats, as the leader hears them: ``older_heard()`` while one
    of a release before batches (no ``batches`` in its heartbeat) was heard within
    ``timeout_s``. Such a scheduler skips the batches (``dispatched_runs``, ``ended_runs``): a
    run a batch dispatched reads ``routing`` to it and one a batch ended still runs, and were it
    to lead next it would dispatch the first again and declare the second lost (requeued): run
    twice. While one may lead, the leader dispatches each run alone and an agent appends each
    end alone (a rolling upgrade's standby)."""

    def __init__(self, own_id: str, monotonic: Callable[[], float], timeout_s: float) -> None:
        self.own_id = own_id
        self.monotonic = monotonic
        self.timeout_s = timeout_s
        self._older_at = float("-inf")

    async def subscribe(self, nc: Client, guard: Guard) -> Subscription:
        callback = guard.wrap("scheduler heartbeat handler", self._on_beat, fatal=False)
        return await nc.subscribe(SCHEDULER_HEARTBEAT_SUBJECT, cb=callback)

    async def _on_beat(self, msg: Msg) -> None:
        try:
            beat = _decoder.decode(msg.data)
        except msgspec.MsgspecError:
            log.warning("undecodable scheduler heartbeat")
            return
        if beat.scheduler_id != self.own_id and not beat.batches:
            self._older_at = self.monotonic()

    def older_heard(self) -> bool:
        return self.monotonic() - self._older_at <= self.timeout_s


__all__ = ["SCHEDULER_HEARTBEAT_SUBJECT", "PeerSchedulers"]
