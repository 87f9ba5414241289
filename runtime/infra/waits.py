"""Waiting for the run index on plain asyncio futures with a timer (the services run on
asyncio): every request waits on the index at least twice (its own append, then its run's
change), and an anyio ``Event`` with a ``move_on_after`` scope per wait cost about four times as
much. One future per wait, so a cancelled wait (a client that went away) cancels only its own."""

from __future__ import annotations

import asyncio


def wake(waiters: list[asyncio.Future[None]]) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(None)


def drop(
    changed: dict[str, list[asyncio.Future[None]]], run_id: str, waiter: asyncio.Future[None]
) -> None:
    """A wait that ended without its run changing (timed out, cancelled) leaves no waiter."""
    waiters = changed.get(run_id)
    if waiters is not None and waiter in waiters:
        waiters.remove(waiter)
        if not waiters:
            del changed[run_id]


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def wait(waiter: asyncio.Future[None], timeout: float) -> None:
    """Until ``waiter`` is woken, or ``timeout`` seconds have passed."""
    timer = asyncio.get_running_loop().call_later(max(timeout, 0.0), _expire, waiter)
    try:
        await waiter
    finally:
        timer.cancel()
