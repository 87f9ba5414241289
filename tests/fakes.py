"""Test doubles that are not about NATS: a clock that moves only when told."""

from __future__ import annotations

import anyio
import anyio.lowlevel


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self._now = now
        self._mono = 0.0

    def now(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        self._now += seconds
        self._mono += seconds

    async def sleep(self, seconds: float) -> None:
        await anyio.lowlevel.checkpoint()
