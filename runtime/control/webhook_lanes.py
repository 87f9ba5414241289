"""Slots for the webhook outbox's events, shared fairly between teams.

The outbox handles events concurrently (``WebhookService._outbox_loop``): at most ``total`` at
once, and at most ``per_team`` of one team's, so that a team whose events are slow to handle (a
run with tens of thousands of streamed outputs to read, a read that times out) fills only its
own lane, never every slot. A team's event waits for its team's slot first, then for one of the
shared slots; both are FIFO (``anyio.Semaphore``), so teams take turns for the shared ones and
a team waits at most for one event of each team ahead of it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio


class Lanes:
    def __init__(self, total: int, per_team: int) -> None:
        self.total = max(1, total)
        self.per_team = max(1, min(per_team, self.total))
        self._shared = anyio.Semaphore(self.total)
        self._teams: dict[str, tuple[anyio.Semaphore, int]] = {}  # lane, events in it

    @contextlib.asynccontextmanager
    async def slot(
        self, team: str, keep: Callable[[], Awaitable[None]] | None = None, every_s: float = 20.0
    ) -> AsyncIterator[None]:
        """Hold one of ``team``'s slots and one shared slot. While waiting, ``keep()`` is
        called every ``every_s`` (the message's ``in_progress``: it is not redelivered
        meanwhile); its errors are ignored."""
        lane = self._enter(team)
        try:
            await _waiting(lane.acquire, keep, every_s)
            try:
                await _waiting(self._shared.acquire, keep, every_s)
                try:
                    yield
                finally:
                    self._shared.release()
            finally:
                lane.release()
        finally:
            self._leave(team)

    def busy(self, team: str) -> int:
        """Events of ``team`` holding or waiting for a slot."""
        return self._teams.get(team, (None, 0))[1]

    def _enter(self, team: str) -> anyio.Semaphore:
        lane, users = self._teams.get(team) or (anyio.Semaphore(self.per_team), 0)
        self._teams[team] = (lane, users + 1)
        return lane

    def _leave(self, team: str) -> None:
        lane, users = self._teams[team]
        if users <= 1:
            del self._teams[team]  # a team with nothing in flight costs nothing
        else:
            self._teams[team] = (lane, users - 1)


async def _waiting(
    acquire: Callable[[], Awaitable[None]],
    keep: Callable[[], Awaitable[None]] | None,
    every_s: float,
) -> None:
    if keep is None:
        await acquire()
        return
    async with anyio.create_task_group() as tg:

        async def keeping() -> None:
            while True:
                await anyio.sleep(every_s)
                with contextlib.suppress(Exception):
                    await keep()

        tg.start_soon(keeping)
        await acquire()
        tg.cancel_scope.cancel()
