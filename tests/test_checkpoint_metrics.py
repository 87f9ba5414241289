"""A scheduler's /metrics show the replay checkpoint's age and how far behind the log it was
written, against a real nats-server: the one sign that its writer (the recorder beside
``jetrun up``'s scheduler with dedicated gateways) is down, stuck or lagging while runs flow."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator

import anyio
import pytest
from nats.aio.client import Client
from prometheus_client.parser import text_string_to_metric_families

from runtime.control.recorder import Recorder
from runtime.control.scheduler import Scheduler
from runtime.control.views import Checkpoint, RunViews
from runtime.health import add_scheduler
from runtime.infra.eventlog import EventLog, LogSettings
from runtime.infra.metrics import Exposition
from runtime.provision import provision
from tests.test_history import CONFIG, T0, submitted

pytestmark = pytest.mark.anyio


@pytest.fixture
async def log(nc: Client) -> AsyncIterator[EventLog]:
    await provision(nc, CONFIG, LogSettings())
    yield EventLog(nc)


async def checkpoint_gauges(exposition: Exposition) -> tuple[float, float]:
    text = (await exposition.render()).decode()
    found = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    return found["jetrun_checkpoint_age_seconds"], found["jetrun_checkpoint_behind_events"]


async def test_a_schedulers_metrics_show_the_checkpoints_age_and_lag(
    nc: Client, log: EventLog
) -> None:
    for i in range(3):
        await log.append(submitted(f"run{i}", T0 + i))
    scheduler = Scheduler(nc, CONFIG, keeps=False)  # jetrun up's: it writes no checkpoint
    exposition = Exposition()
    add_scheduler(exposition, scheduler)
    views = RunViews(log.js)
    await views.require()
    with anyio.fail_after(30):
        async with scheduler.following():
            age, behind = await checkpoint_gauges(exposition)
            assert math.isnan(age) and math.isnan(behind)  # none stored: unknown, not 0

            async with anyio.create_task_group() as tg:  # the recorder stores one, then stops
                await tg.start(Recorder(nc, CONFIG).run)
                while await views.checkpoint() is None:
                    await anyio.sleep(0.05)
                tg.cancel_scope.cancel()
            age, behind = await checkpoint_gauges(exposition)
            assert 0 <= age < 30 and behind == 0

            for i in range(3, 7):  # runs flow on; nobody moves the checkpoint
                await log.append(submitted(f"run{i}", T0 + i))
            age, behind = await checkpoint_gauges(exposition)
            assert behind == 4

            stale = Checkpoint(replay_from=1, seq=await log.last_seq(), at=time.time() - 600)
            await views.put_checkpoint(stale)  # its writer long gone
            age, behind = await checkpoint_gauges(exposition)
            assert age >= 600 and behind == 0
