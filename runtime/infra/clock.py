"""Clocks are injected: services ask a clock for the time and for sleeps; tests pass their own."""

from __future__ import annotations

import time
from typing import Protocol

import anyio


class Clock(Protocol):
    def now(self) -> float:
        """Wall-clock time, Unix seconds: what events record."""

    def monotonic(self) -> float:
        """For timeouts and liveness: never jumps."""

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)


SYSTEM_CLOCK = SystemClock()
