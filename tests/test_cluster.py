"""A 3-node JetStream cluster on loopback, streams at R3: SIGKILL one node under load and
nothing admitted is lost, nothing runs twice, and service continues."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from tests.harness import FIXTURES, Load, Stack, audit, wait_replicas

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

GATES = str(FIXTURES / "gate_pipelines.py")


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with Stack(tmp_path / "stack", node_loss_timeout_s=10.0) as stack:
        stack.tmp.mkdir()
        await stack.start_cluster(3)
        stack.start_scheduler()
        await stack.start_gateway(timeout=90)
        await stack.start_gateway(timeout=90)
        stack.start_agent("agent-1", GATES, slots=2)
        stack.start_agent("agent-2", GATES, slots=2)
        await wait_replicas(stack.url, "tok_big", "test/count:v1", n=2, timeout=60)
        yield stack


async def test_losing_one_node_of_three_loses_nothing(stack: Stack, tmp_path: Path) -> None:
    load = Load(stack, tmp_path, seconds=0.05)
    async with anyio.create_task_group() as tg:
        tg.start_soon(load.submit_many, 60, "cluster")
        deadline = time.monotonic() + 60
        while len(load.run_ids) < 20 and time.monotonic() < deadline:
            await anyio.sleep(0.05)
        stack.cluster[0].kill()  # the node every client connected to first
    result = await audit(load, timeout=180)
    assert result.submitted == 60 and result.lost == 0, result
    assert result.ran_twice == 0, result
    assert result.states == {"completed": 60}, result
