"""What readers of a ``RunIndex`` (``runtime.infra.projection``) wait for: the index to reach a
sequence of the log, or a run to be as they wait for it. Every wait has a deadline.

Plain futures with a timer: on the hot path of every request (an anyio Event and cancel scope
per wait cost about four times as much). The index wakes them: ``_wake_seq_waiters`` after it
moved ``last_seq``, and a run's waiters in ``_changed`` when the run changed.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable

from contracts.run import RunRecord
from runtime.infra.waits import Waiter, drop, wait


class IndexLagging(TimeoutError):
    """The index did not reach a sequence of the log in time."""


class IndexWaits:
    """The waiting half of ``RunIndex``."""

    last_seq: int

    def __init__(self) -> None:
        # the requests waiting for a run to change (each woken once the run is as it waits for),
        # and for a sequence (a heap: lowest first)
        self._changed: dict[str, list[Waiter]] = {}
        self._seq_waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._waiter_ids = itertools.count()  # ties in seq are broken by arrival

    def get(self, run_id: str) -> RunRecord | None:
        """The run as it stands now, or None (the index's)."""
        raise NotImplementedError

    async def wait_for_seq(self, seq: int, *, timeout: float) -> bool:
        """Wait until the index has applied (or skipped) ``seq``; False after ``timeout``
        seconds. Every wait has a deadline: the caller says what to do when it passes."""
        if self.last_seq >= seq:
            return True
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        heapq.heappush(self._seq_waiters, (seq, next(self._waiter_ids), waiter))
        await wait(waiter, timeout, loop)
        return self.last_seq >= seq

    async def catch_up(self, seq: int, *, timeout: float) -> None:
        """Wait until the index has reached ``seq`` (a replay on start); raises
        ``IndexLagging`` after ``timeout`` seconds, so a service that cannot catch up fails
        loudly instead of never becoming ready."""
        if not await self.wait_for_seq(seq, timeout=timeout):
            raise IndexLagging(
                f"the index reached sequence {self.last_seq} of {seq} within {timeout:g} s"
            )

    def _wake_seq_waiters(self) -> None:
        """O(woken log n) per event: with hundreds of requests in flight, each waiting for its
        own append, a scan of every waiter on every event would be quadratic."""
        waiters = self._seq_waiters
        while waiters and waiters[0][0] <= self.last_seq:
            waiter = heapq.heappop(waiters)[2]
            if not waiter.done():  # else it timed out or was cancelled
                waiter.set_result(None)

    async def wait_until(
        self, run_id: str, done: Callable[[RunRecord], bool], timeout: float
    ) -> RunRecord | None:
        """Wait until the run exists and ``done(run)``; returns the run as it is then (also on
        timeout), or None if it does not exist. The wait is woken only by a change of the run
        that makes ``done(run)`` true (or by its queue's events, which ``done`` is asked about
        when they are read), so ``done`` must be a plain function of the run."""
        run = self.get(run_id)
        if run is not None and done(run):
            return run
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            if left <= 0:
                return run
            # one future per wait: a cancelled wait cancels only its own
            waiter = Waiter(done, loop.create_future())
            self._changed.setdefault(run_id, []).append(waiter)
            try:
                await wait(waiter.future, left, loop)
            finally:
                drop(self._changed, run_id, waiter)  # woken: already gone from its list
            run = self.get(run_id)
            if run is not None and done(run):
                return run
