"""Retention set by an operator (``jetrun admin apply-retention``) survives service restarts."""

from __future__ import annotations

import pytest
from nats.aio.client import Client

from runtime.control.gateway import Gateway
from runtime.control.retention import RetentionRefused, plan, wanted
from runtime.control.scheduler import Scheduler
from runtime.infra.config import parse
from runtime.infra.natsserver import NatsServer
from runtime.infra.streams import (
    EVENTS_STREAM,
    LISTING_STREAM,
    LOGS_STREAM,
    VIEWS_STREAM,
    events_config,
)
from runtime.infra.streamsetup import ensure_all
from runtime.services import apply_retention_at

pytestmark = pytest.mark.anyio

DAY = 86_400.0
SETTINGS = parse({"settings": {"events_max_age_s": 7 * DAY, "views_max_age_s": 90 * DAY}})


def test_bad_retention_is_refused_before_anything_changes() -> None:
    for settings in (
        {"events_max_age_s": -1},
        {"views_max_age_s": -5},
        {"events_max_age_s": 60, "keep_ended_s": 300},  # shorter than the in-memory window
    ):
        with pytest.raises(RetentionRefused):
            wanted(parse({"settings": settings}).settings)


def test_the_plan_changes_only_what_differs_and_keeps_dedup_within_max_age() -> None:
    events = events_config(replicas=1, duplicate_window_s=600.0, max_age_s=0.0)
    short = parse({"settings": {"events_max_age_s": 300, "keep_ended_s": 60}}).settings
    (update,) = plan({EVENTS_STREAM: events}, short)
    assert update.max_age == 300 and update.duplicate_window == 300 and update.subjects
    assert plan({EVENTS_STREAM: update}, short) == []
    forever = parse({}).settings
    assert plan({EVENTS_STREAM: events}, forever) == []


async def test_retention_applied_by_an_operator_survives_restarts(
    nats_server: NatsServer, nc: Client
) -> None:
    config = parse(
        {
            "teams": {"acme": {"tier": "basic", "tokens": ["tok"]}},
            "settings": {"replay_deadline_s": 5},
        }
    )
    gateway = Gateway(nc, config)
    await ensure_all(gateway.log, gateway.logs, gateway.views)
    changed = await apply_retention_at(
        nats_server.url, SETTINGS.settings, nats_server.credentials("admin")
    )
    assert sorted(changed) == sorted(
        [
            (EVENTS_STREAM, 7 * DAY),
            (LOGS_STREAM, 7 * DAY),
            (VIEWS_STREAM, 90 * DAY),
            (LISTING_STREAM, 90 * DAY),  # the run history is kept like the views
        ]
    )
    # services restart with their defaults (keep for ever): nothing is reverted
    await ensure_all(Gateway(nc, config).log, Gateway(nc, config).logs, Gateway(nc, config).views)
    await Scheduler(nc, config).ensure()
    js = nc.jetstream()
    ages = {name: (await js.stream_info(name)).config.max_age for name in dict(changed)}
    assert ages == {
        EVENTS_STREAM: 7 * DAY,
        LOGS_STREAM: 7 * DAY,
        VIEWS_STREAM: 90 * DAY,
        LISTING_STREAM: 90 * DAY,
    }
    assert (
        await apply_retention_at(
            nats_server.url, SETTINGS.settings, nats_server.credentials("admin")
        )
        == []
    )
