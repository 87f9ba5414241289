"""NATS subscription callbacks that fail loudly.

nats-py runs each subscription callback in its own task and hands an exception to the
connection's error callback, after which the message is gone for good. A component's state built
from such messages (an index tailing the log, a fleet built from heartbeats, an agent's view of
its dispatches) would then silently differ from the log. ``Guard.wrap`` logs the exception at
ERROR with its traceback, and when the callback is ``fatal`` makes ``Guard.watch`` raise
``CallbackFailed`` in the component's task group: the process exits non-zero, and its
supervisor restarts it to rebuild its state from the log.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import NoReturn, ParamSpec

import anyio

log = logging.getLogger("jetrun.guard")

P = ParamSpec("P")


class CallbackFailed(Exception):
    """A fatal callback raised: this process's state may no longer match the log."""


class Guard:
    """Wraps one component's callbacks. Create it inside the event loop."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.failure: CallbackFailed | None = None
        self._failed = anyio.Event()

    def wrap(
        self, what: str, callback: Callable[P, Awaitable[None]], *, fatal: bool = True
    ) -> Callable[P, Awaitable[None]]:
        """``callback`` that never raises into nats-py: an exception is logged at ERROR with
        its traceback and, if ``fatal``, fails ``watch()``."""

        async def guarded(*args: P.args, **kwargs: P.kwargs) -> None:
            try:
                await callback(*args, **kwargs)
            except Exception as err:
                self._fail(what, err, fatal=fatal)

        return guarded

    def wrap_sync(
        self, what: str, callback: Callable[P, object], *, fatal: bool = True
    ) -> Callable[P, None]:
        """``wrap`` for a plain function (an index's apply, called from the connection's
        reader; what it returns is dropped): it never raises either."""

        def guarded(*args: P.args, **kwargs: P.kwargs) -> None:
            try:
                callback(*args, **kwargs)
            except Exception as err:
                self._fail(what, err, fatal=fatal)

        return guarded

    def _fail(self, what: str, err: Exception, *, fatal: bool) -> None:
        consequence = "stopping so that a restart rebuilds it" if fatal else "carrying on"
        log.error("%s: %s raised (%s)", self.owner, what, consequence, exc_info=err)
        if fatal and self.failure is None:
            self.failure = CallbackFailed(f"{self.owner}: {what} raised {err!r}")
            self.failure.__cause__ = err
            self._failed.set()

    async def watch(self) -> NoReturn:
        """Block until a fatal callback fails, then raise its ``CallbackFailed``."""
        await self._failed.wait()
        assert self.failure is not None
        raise self.failure
