"""Waiting for the run index on plain asyncio futures with a timer (the services run on
asyncio): every request waits on the index at least twice (its own append, then its run's
change), and an anyio ``Event`` with a ``move_on_after`` scope per wait cost about four times as
much. One future per wait, so a cancelled wait (a client that went away) cancels only its own.

A wait for a run carries what it waits for (``Until``: a predicate of the run), tested where
the run changes: a sync request waiting for its run's end is woken once, by the end, not also
by ``dispatched`` (a task step, a new timer and a new future for nothing)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Until(Generic[T]):
    """One wait for a run: woken once ``done(run)`` holds (or on ``wake_all``)."""

    __slots__ = ("done", "future")

    def __init__(self, done: Callable[[T], bool], future: asyncio.Future[None]) -> None:
        self.done, self.future = done, future


def wake_all(waiters: list[Until[T]]) -> None:
    for waiter in waiters:
        if not waiter.future.done():
            waiter.future.set_result(None)


def wake_done(changed: dict[str, list[Until[T]]], run_id: str, run: T) -> None:
    """Wake the waits for ``run_id`` that ``run`` satisfies; the others go on waiting."""
    waiters = changed.get(run_id)
    if not waiters:
        return
    left = [waiter for waiter in waiters if not _woken(waiter, run)]
    if left:
        changed[run_id] = left
    else:
        del changed[run_id]


def _woken(waiter: Until[T], run: T) -> bool:
    future = waiter.future
    if future.done():  # timed out or cancelled: its wait drops it too
        return True
    if waiter.done(run):
        future.set_result(None)
        return True
    return False


def drop(changed: dict[str, list[Until[T]]], run_id: str, waiter: Until[T]) -> None:
    """A wait that ended without being woken (timed out, cancelled) leaves no waiter."""
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
