"""The replay checkpoint as stored, on a scheduler's ``/metrics`` (``jetrun up``'s included).

The checkpoint (``runtime.control.views``) is where every starting process begins reading the
log. Its writer (the leading scheduler, or the recorder beside ``jetrun up``'s scheduler with
dedicated gateways: ``runtime.control.recorder``) stores it every ``checkpoint_every_s`` from
where its own tail stands. Nothing else shows that writer's health: with the recorder down,
stopped or crashing as it starts, runs still flow and every check passes, while the checkpoint
stops moving (each process that starts replays the log from further back, and runs that ended
are neither listed in the run history nor stored as views). So: its age (well above
``checkpoint_every_s``: the writer is down or stuck) and how far behind the log's end it was
written (its writer lags).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from runtime.control.views import Checkpoint, RunViews
from runtime.infra.eventlog import EventLog


class CheckpointMetrics(Collector):
    """``jetrun_checkpoint_age_seconds`` and ``jetrun_checkpoint_behind_events``, read from
    the bucket at each scrape (``refresh``); NaN when there is none or it cannot be read."""

    def __init__(
        self, views: RunViews, log: EventLog, wall: Callable[[], float] = time.time
    ) -> None:
        self.views, self.log, self.wall = views, log, wall
        self.checkpoint: Checkpoint | None = None
        self.log_last_seq: int | None = None

    async def refresh(self) -> None:
        # unknown until read again: a scrape cut short (an outage) shows no stale figure
        self.checkpoint, self.log_last_seq = None, None
        try:
            self.checkpoint = await self.views.checkpoint()
            self.log_last_seq = await self.log.last_seq()
        except Exception:
            return

    def collect(self) -> Iterable[Metric]:
        age = GaugeMetricFamily(
            "jetrun_checkpoint_age_seconds",
            "Seconds since the replay checkpoint was stored (its writer stores it every "
            "checkpoint_every_s: far above that, the writer is down or stuck)",
        )
        behind = GaugeMetricFamily(
            "jetrun_checkpoint_behind_events",
            "Events the log held past the replay checkpoint's position when last read (its "
            "writer's tail lags the log by about this many)",
        )
        checkpoint, last = self.checkpoint, self.log_last_seq
        since = math.nan if checkpoint is None else max(0.0, self.wall() - checkpoint.at)
        age.add_metric([], since)
        lag = math.nan if checkpoint is None or last is None else max(0, last - checkpoint.seq)
        behind.add_metric([], lag)
        yield from (age, behind)


__all__ = ["CheckpointMetrics"]
