"""Stream settings: created once from ``runtime.infra.streams``; a running system's streams are
never downgraded or rewritten by a service that starts with other settings."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.aio.client import Client
from nats.js import api

from runtime.control.admission import Admission
from runtime.infra import streams
from runtime.infra.catalog import Catalog
from runtime.infra.eventlog import EventLog, LogSettings
from runtime.infra.natsserver import free_port
from runtime.infra.streams import CATALOG_STREAM, EVENTS_STREAM, admission_stream
from tests.harness import Stack, wait_ready

pytestmark = pytest.mark.anyio


def events(replicas: int, max_age_s: float = 0.0) -> api.StreamConfig:
    return streams.events_config(replicas=replicas, duplicate_window_s=600.0, max_age_s=max_age_s)


def test_reconcile_only_ever_raises_replicas() -> None:
    production = dataclasses.replace(events(3), max_age=7 * 86400.0)
    assert streams.reconcile(production, events(1)) is None
    assert streams.reconcile(production, events(3)) is None
    raised = streams.reconcile(dataclasses.replace(production, num_replicas=1), events(3))
    assert raised is not None and raised.num_replicas == 3
    assert raised.max_age == 7 * 86400.0  # what the operator chose stays
    assert streams.differences(production, events(3)) == {"max_age": (7 * 86400.0, 0.0)}
    assert streams.differences(events(3), events(1)) == {}


async def test_a_service_never_rewrites_what_an_operator_or_another_service_chose(
    nc: Client, caplog: pytest.LogCaptureFixture
) -> None:
    js = nc.jetstream()
    await EventLog(nc).ensure()
    # the operator keeps events for a week
    info = await js.stream_info(EVENTS_STREAM)
    await js.update_stream(dataclasses.replace(info.config, max_age=7 * 86400.0))
    # the gateway counts admissions over a day, a scheduler started with a minute
    await Admission(js, {3}, lookback_s=86400.0).ensure()
    with caplog.at_level(logging.WARNING, logger="jetrun.streams"):
        await EventLog(nc, LogSettings(max_age_s=0.0)).ensure()
        await Admission(js, {3}, lookback_s=60.0).ensure()
        await Catalog(js).ensure()
    assert (await js.stream_info(EVENTS_STREAM)).config.max_age == 7 * 86400.0
    admit = (await js.stream_info(admission_stream(3))).config
    assert admit.max_age == 86400.0 and admit.duplicate_window == 600.0
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "JETRUN_EVENTS keeps max_age" in warned and "JETRUN_ADMIT_3 keeps max_age" in warned


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Stack]:
    async with Stack(tmp_path / "stack") as stack:
        stack.tmp.mkdir()
        await stack.start_cluster(3)
        yield stack


@pytest.mark.slow
async def test_a_service_started_with_one_replica_never_downgrades_the_cluster(
    cluster: Stack,
) -> None:
    cluster.start_scheduler()  # --replicas 3 (a gateway is ready once a scheduler is heard)
    await cluster.start_gateway(timeout=90)  # --replicas 3: creates every stream at R3
    port = free_port()
    cluster._cli(
        "gateway-r1",
        "gateway",
        "--replicas",
        "1",
        *cluster.nats_args("gateway"),
        "--config",
        str(cluster.config_path),
        "--port",
        str(port),
    )
    await wait_ready(f"http://127.0.0.1:{port}", 90)
    nc = await cluster.connect()
    try:
        js = nc.jetstream()
        for name in (EVENTS_STREAM, CATALOG_STREAM, admission_stream(3), admission_stream(12)):
            assert (await js.stream_info(name)).config.num_replicas == 3, name
    finally:
        await nc.close()
