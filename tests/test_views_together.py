"""Run views stored together (``RunViews.put_all``: one task sends them and reads their acks),
against a real nats-server: each is stored, one too large for a message is refused alone, and
puts sent while the server restarts are stored once it is back."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from nats.aio.client import Client
from nats.errors import MaxPayloadError

from contracts import RunState
from contracts.run import RunRecord
from contracts.values import RunIO
from runtime.control.views import RunViews
from runtime.infra.config import Config
from runtime.infra.eventlog import LogSettings
from runtime.provision import provision
from tests.harness import own_server, stop_until_disconnected

pytestmark = pytest.mark.anyio


def ended(run_id: str, value: str = "x") -> RunRecord:
    return RunRecord(
        id=run_id,
        state=RunState.completed,
        team="acme",
        pipeline="t/p:v1",
        inputs=[RunIO(type="string", value=value)],
        created_at=1.0,
        updated_at=2.0,
        attempt=1,
    )


async def test_views_put_together_are_each_stored_and_one_too_large_is_refused_alone(
    nc: Client,
) -> None:
    views = RunViews(nc.jetstream())
    await views.ensure()
    big = ended("run_big", "x" * (nc.max_payload + 1))
    runs = [ended("run_a"), big, ended("run_b")]
    with anyio.fail_after(20):
        results = await views.put_all(runs)
        assert results[0] is None and results[2] is None
        assert isinstance(results[1], MaxPayloadError)
        assert await views.get("run_a") == runs[0]
        assert await views.get("run_b") == runs[2]
        assert await views.get("run_big") is None
        assert await views.put_all([]) == []


async def test_views_put_while_the_server_restarts_are_stored_once_it_is_back(
    tmp_path: Path,
) -> None:
    async with own_server(tmp_path) as (server, nc):
        await provision(nc, Config(tiers={}, teams={}), LogSettings())
        views = RunViews(nc.jetstream(), deadline_s=20.0)
        await views.ensure()
        await stop_until_disconnected(server, nc)
        runs = [ended(f"run_{i}") for i in range(5)]
        results: list[Exception | None] = []

        async def put() -> None:
            results.extend(await views.put_all(runs))

        with anyio.fail_after(40):
            async with anyio.create_task_group() as tg:
                tg.start_soon(put)
                await anyio.sleep(0.3)
                assert not results
                await server.start()
            assert results == [None] * 5
            assert [await views.get(run.id) for run in runs] == runs
