"""The recorder: run views, the run history and the checkpoint, written from a tail of its own.

A scheduler keeps them itself by default (``runtime.control.views.ViewKeeper``: a run's view
once it ends, every run's history entry, the checkpoint). ``jetrun up`` with dedicated gateways
runs its scheduler without (``Scheduler(keeps=False)``) and this process beside it instead
(``jetrun recorder``, NATS role: scheduler), so that the one event loop that cannot be spread
over cores only decides: storing a view, its acknowledgement, the history's blocks and the
listeners that feed them cost this process instead.

The recorder follows the log into its own ``RunIndex`` from the checkpoint, as every reader
does, and runs the keeper there: it forgets an ended run only once the run's view is stored and
its history entry is written, so the checkpoint it writes covers every run whose view or entry
is not stored yet, and after a crash (its own, or the machine's) it reads them again and stores
them. Gateways do not depend on it to answer: a run they no longer hold is read from its view,
else from its events (``find_run``). Views are idempotent puts and history blocks conditional
appends, so a second writer (a scheduler that keeps, beside it) stores nothing twice under two
numbers, and each writer's checkpoint holds every run it has not stored itself: either is a
safe place to start reading.
"""

from __future__ import annotations

import anyio
from anyio.abc import TaskStatus
from nats.aio.client import Client

from runtime.control.logfeed import LogFeed
from runtime.control.views import RunViews, ViewKeeper
from runtime.infra.clock import SYSTEM_CLOCK, Clock
from runtime.infra.config import Config
from runtime.infra.eventlog import EventLog, LogSettings
from runtime.infra.guard import Guard
from runtime.infra.projection import RunIndex
from runtime.infra.streamsetup import require_all


class Recorder:
    def __init__(
        self,
        nc: Client,
        config: Config,
        *,
        clock: Clock = SYSTEM_CLOCK,
        log_settings: LogSettings | None = None,
    ) -> None:
        settings = log_settings or LogSettings()
        self.config = config
        self.clock = clock
        self.log = EventLog(nc, settings)
        self.views = RunViews(self.log.js, replicas=settings.replicas)
        self.index = RunIndex()
        self.keeper = ViewKeeper(self.views, self.index, config.settings)
        self.guard = Guard("recorder")
        self.feed = LogFeed(self.log, self.views)
        self.feed.join_guarded(self.index, self.guard)
        self.caught_up = False

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Replay the log from the checkpoint, then store views, history entries and the
        checkpoint as runs come and end, until cancelled (or a tail callback failed)."""
        await require_all(self.log, self.views)
        position = await self.feed.start()
        try:
            deadline = self.config.settings.replay_deadline_s
            await self.index.catch_up(position.target, timeout=deadline)
            self.caught_up = True
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.keeper.run, self.clock, lambda: True)
                task_status.started()
                await self.guard.watch()
        finally:
            with anyio.CancelScope(shield=True):
                await self.feed.leave()
