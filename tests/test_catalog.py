"""The pipeline catalogue sees changed settings without a restart (real nats-server)."""

from __future__ import annotations

import anyio
import pytest
from nats.aio.client import Client

from contracts.agents import PipelineInfo
from runtime.infra.catalog import Catalog
from tests.fakes import FakeClock

pytestmark = pytest.mark.anyio

OLD = PipelineInfo(pointer="t/p:v1", accelerator="cpu", timeout_s=10.0, max_retries=0)
NEW = PipelineInfo(pointer="t/p:v1", accelerator="gpu", timeout_s=30.0, max_retries=2)


async def test_a_cached_entry_is_read_again_once_older_than_max_age(nc: Client) -> None:
    clock = FakeClock()
    reader = Catalog(nc.jetstream(), max_age_s=5.0, monotonic=clock.monotonic)
    await reader.ensure()
    agent = Catalog(nc.jetstream())
    await agent.register(OLD)
    assert await reader.lookup("t/p:v1") == OLD
    await agent.register(NEW)  # the agent restarted with new settings
    clock.advance(4.9)
    assert await reader.lookup("t/p:v1") == OLD  # cached, within its age
    clock.advance(0.1)
    assert await reader.lookup("t/p:v1") == NEW


async def test_a_following_catalogue_sees_a_change_as_it_is_stored(nc: Client) -> None:
    clock = FakeClock()  # never advanced: only the stream can bring the change
    reader = Catalog(nc.jetstream(), monotonic=clock.monotonic)
    await reader.ensure()
    agent = Catalog(nc.jetstream())
    await agent.register(OLD)
    async with reader.following():
        assert await reader.lookup("t/p:v1") == OLD
        await agent.register(NEW)
        with anyio.fail_after(10):
            while reader.cached("t/p:v1") != NEW:
                await anyio.sleep(0.01)
        assert await reader.lookup("t/p:v1") == NEW
