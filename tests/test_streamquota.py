"""The per-team stream slots on a real nats-server: exact over several holders (gateways), given
back on release, kept by renewal past their time to live, and freed when a holder dies."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest
from nats.aio.client import Client

from runtime.control.http_input import HTTPError
from runtime.control.streamquota import StreamQuota
from runtime.infra.natsserver import NatsServer

pytestmark = pytest.mark.anyio

TTL_S = 1.0


@pytest.fixture
async def connections(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[list[Client]]:
    async with NatsServer(store_dir=tmp_path_factory.mktemp("slots") / "nats") as server:
        admin = await server.connect("admin")
        await StreamQuota(admin.jetstream(), 2, ttl_s=TTL_S).ensure()
        gateways = [await server.connect("gateway") for _ in range(2)]
        try:
            yield gateways
        finally:
            for nc in (admin, *gateways):
                await nc.close()


def quotas(connections: list[Client]) -> list[StreamQuota]:
    return [StreamQuota(nc.jetstream(), 2, ttl_s=TTL_S) for nc in connections]


async def refused(quota: StreamQuota, team: str = "acme") -> int:
    try:
        release = await quota.acquire(team)
    except HTTPError as err:
        return err.status
    await release()
    return 200


async def test_slots_are_exact_over_gateways_and_come_back(connections: list[Client]) -> None:
    a, b = quotas(connections)
    held = [await a.acquire("acme"), await b.acquire("acme")]
    assert await refused(a) == 429 and await refused(b) == 429
    assert await refused(a, "rival") == 200  # every team has its own slots
    await held[0]()
    again = await b.acquire("acme")  # the slot a gave back, taken through b
    assert await refused(a) == 429
    await again()
    await held[1]()
    assert len(a.held) == len(b.held) == 0


async def test_held_slots_outlive_their_ttl_by_renewal_and_a_dead_holders_expire(
    connections: list[Client],
) -> None:
    a, b = quotas(connections)
    async with anyio.create_task_group() as tg:
        tg.start_soon(a.renew_loop)
        await a.acquire("acme")
        await a.acquire("acme")
        await anyio.sleep(TTL_S * 2.5)  # renewed about 7 times meanwhile
        assert await refused(b) == 429
        tg.cancel_scope.cancel()  # a gives its slots back as it stops
    assert await refused(b) == 200
    dead = quotas(connections)[0]  # takes both slots and never renews: a gateway SIGKILLed
    await dead.acquire("acme")
    await dead.acquire("acme")
    assert await refused(b) == 429
    with anyio.fail_after(TTL_S * 10):
        while await refused(b) == 429:
            await anyio.sleep(0.1)
