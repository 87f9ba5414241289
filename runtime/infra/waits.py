"""Waiting for the run index on plain asyncio futures with a timer (the services run on
asyncio): every request waits on the index (its run's change), and an anyio ``Event`` with a
``move_on_after`` scope per wait cost about four times as much. One future per wait, so a
cancelled wait (a client that went away) cancels only its own.

A wait for a run's change carries what it waits for (``Waiter.done``): the index wakes it only
once the run it applied an event to satisfies it, not at every change (a sync request's task
is woken once, at its run's end, instead of at each of its run's four or five events)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from contracts.run import RunRecord


class Waiter(NamedTuple):
    done: Callable[[RunRecord], bool]
    future: asyncio.Future[None]


def wake(waiters: list[Waiter], run: RunRecord) -> list[Waiter]:
    """Wake the waiters that ``run`` (as it stands now) satisfies; the others, still waiting."""
    left: list[Waiter] = []
    for waiter in waiters:
        future = waiter.future
        if future.done():  # timed out or cancelled: it drops itself
            continue
        if waiter.done(run):
            future.set_result(None)
        else:
            left.append(waiter)
    return left


def drop(changed: dict[str, list[Waiter]], run_id: str, waiter: Waiter) -> None:
    """A wait that ended without its run changing (timed out, cancelled) leaves no waiter."""
    waiters = changed.get(run_id)
    if waiters is not None and waiter in waiters:
        waiters.remove(waiter)
        if not waiters:
            del changed[run_id]


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def wait(
    waiter: asyncio.Future[None], timeout: float, loop: asyncio.AbstractEventLoop
) -> None:
    """Until ``waiter`` is woken, or ``timeout`` seconds have passed (``loop``: the running
    loop, which the caller has at hand: asking for it is a ``getpid`` system call on 3.11)."""
    timer = loop.call_later(max(timeout, 0.0), _expire, waiter)
    try:
        await waiter
    finally:
        timer.cancel()
