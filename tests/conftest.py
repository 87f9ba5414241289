"""Shared fixtures: a real nats-server on a free loopback port with a temp store dir."""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator
from pathlib import Path

import pytest
from nats.aio.client import Client

from contracts.agents import PipelineInfo
from runtime.infra.catalog import Catalog
from runtime.infra.config import Config
from runtime.infra.eventlog import LogSettings
from runtime.infra.natsserver import NatsServer
from runtime.provision import provision
from tests.harness import FIXTURES, Stack, wait_replicas

DEMO_PIPELINES = [
    "demo/echo:v1",
    "demo/sleep:v1",
    "demo/fail:v1",
    "demo/slow-start:v1",
    "demo/noop:v1",
    "demo/stream:v1",
]
GATE_PIPELINES = [
    "test/gate:v1",
    "test/retry-gate:v1",
    "test/slow:v1",
    "test/hang:v1",
    "test/count:v1",
]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test that used a stack shows its processes' logs (the fixture that started
    the stack does not see the test's exception)."""
    report = yield
    if report.failed and call.when == "call":
        for name, value in getattr(item, "funcargs", {}).items():
            if isinstance(value, Stack):
                report.sections.append((f"logs of the stack {name!r}", value.logs()))
    return report


@pytest.fixture(scope="session")
def anyio_backend() -> tuple[str, dict[str, bool]]:
    return ("asyncio", {"use_uvloop": True})


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    server = NatsServer(store_dir=tmp_path / "nats")
    async with server:
        yield server


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[Client]:
    client = await nats_server.connect("admin", "test")
    # the admin step, as jetrun setup runs it (no permit streams: tests make their own)
    await provision(client, Config(tiers={}, teams={}), LogSettings())
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """nats-server, a scheduler, two gateways, a demo agent (4 slots, the default queue) and an
    agent serving tests/fixtures/gate_pipelines.py (1 slot, no queue: a gate run behind a busy
    slot waits in the scheduler's queue, with a position); test/ghost:v1 is known but has no
    replica."""
    async with Stack(tmp_path_factory.mktemp("stack"), resource_wait_timeout_s=2.0) as stack:
        await stack.start_nats()
        stack.start_scheduler()
        await stack.start_gateway()
        await stack.start_gateway()
        stack.start_agent("agent-demo", "runtime.node.demo", slots=4)
        gates = str(FIXTURES / "gate_pipelines.py")
        stack.start_agent("agent-gates", gates, slots=1, queue_depth=0)
        # an agent's pipelines become ready one by one: wait for every one a test may run
        for pointer in DEMO_PIPELINES + GATE_PIPELINES:
            await wait_replicas(stack.url, "tok_big", pointer)
        nc = await stack.connect()
        await Catalog(nc.jetstream()).register(PipelineInfo(pointer="test/ghost:v1"))
        await nc.close()
        yield stack
