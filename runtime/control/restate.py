"""Live runs outlive their events: the leading scheduler restates a live run before its events
age out of the log.

With a ``max_age`` on the event log (``jetrun admin apply-retention``), a run can still be
queued (or running) when the events it was folded from (``submitted`` with its inputs, first of
all) are removed. Every live run whose first event is older than half the log's ``max_age`` is
appended again as one ``restated`` event (``contracts.machine`` rule 7): the run as it stands,
its inputs, callback URL and place in its queue included. A process that starts from the
checkpoint after the old events are gone (a restarted scheduler or gateway), a gateway asked
for the run, the webhook deliverer and an agent whose dispatch did not carry the inputs all
find the run there; the index then counts the run from the restatement on, so the checkpoint
moves past its old events. A restatement is appended only while the run's last event is the
one it was made from (an expected subject sequence), so it never hides a newer event; one that
lost that race is made again on the next round.

A run is safe as long as a scheduler leads at least once in every half ``max_age``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio
from nats.errors import MaxPayloadError
from nats.js.errors import APIError

from contracts.machine import restate
from runtime.infra.clock import Clock
from runtime.infra.eventlog import EventLog
from runtime.infra.jsretry import RETRYABLE
from runtime.infra.projection import RunIndex
from runtime.infra.streams import EVENTS_STREAM

log = logging.getLogger("jetrun.restate")

RESTATE_AFTER = 0.5  # of the log's max_age: a run's first event older than this is restated
PER_ROUND = 2_000  # restatements per round at most (a deep queue is restated over rounds)
IN_FLIGHT = 64
MAX_AGE_EVERY_S = 5.0  # how often the log's max_age is read again (an operator may change it)


def restate_before(now: float, max_age_s: float) -> float | None:
    """Runs whose first event is older than this are restated now; None: the log keeps events
    for ever, nothing ages out."""
    if max_age_s <= 0:
        return None
    return now - max_age_s * RESTATE_AFTER


class Restater:
    """``step`` restates what is due once; ``run`` repeats it while this process leads."""

    def __init__(self, log: EventLog, index: RunIndex) -> None:
        self.log = log
        self.index = index
        self.max_age_s = 0.0
        self._max_age_read = float("-inf")
        self.restated = 0

    async def read_max_age(self, mono: float) -> float:
        if mono - self._max_age_read >= MAX_AGE_EVERY_S:
            info = await self.log.js.stream_info(EVENTS_STREAM)
            self.max_age_s = float(info.config.max_age or 0.0)
            self._max_age_read = mono
        return self.max_age_s

    async def step(self, now: float, mono: float) -> int:
        """Restate the live runs that are due; returns how many were appended."""
        try:
            before = restate_before(now, await self.read_max_age(mono))
        except RETRYABLE as err:
            log.warning("event log settings not read now (%r); later", err)
            return 0
        if before is None:
            return 0
        due = self.index.restatable(before, PER_ROUND)
        limiter = anyio.CapacityLimiter(IN_FLIGHT)
        appended = 0

        async def one(run_id: str, of_seq: int) -> None:
            nonlocal appended
            run = self.index.get(run_id)
            if run is None or run.is_terminal:
                return
            event = restate(run, of_seq, now, self.index.ticket(run_id))
            async with limiter:
                try:
                    await self.log.append(event, expect_last_seq=of_seq)
                except APIError as err:  # a newer event came first (or the server refused)
                    log.info("run %s not restated now (%s); next round", run_id, err)
                    return
                except RETRYABLE as err:
                    log.warning("run %s not restated now (%r); next round", run_id, err)
                    return
                except MaxPayloadError:  # its outputs so far: more than one message holds
                    log.error(
                        "run %s cannot be restated: the run as it stands is over a message's"
                        " size; a reader that starts after its first events age out will not"
                        " find it",
                        run_id,
                        extra={"run_id": run_id, "team": run.team},
                    )
                    return
            appended += 1

        async with anyio.create_task_group() as tg:
            for run, of_seq in due:
                tg.start_soon(one, run.id, of_seq)
        if appended:
            log.info("restated %d live runs before their events age out of the log", appended)
        self.restated += appended
        return appended

    async def run(self, clock: Clock, leading: Callable[[], bool], every_s: float = 1.0) -> None:
        while True:
            if leading():
                await self.step(clock.now(), clock.monotonic())
            await clock.sleep(every_s)
