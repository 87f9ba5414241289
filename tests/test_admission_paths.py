"""Every way into the system, against real processes: the idempotency race on two gateways,
service submissions over NATS, and a log holding an event kind this release does not know."""

from __future__ import annotations

import httpx
import msgspec
import pytest

from runtime.eventlog import EVENTS_STREAM, event_subject
from runtime.nats_conn import connect
from tests import harness
from tests.harness import Stack

pytestmark = pytest.mark.anyio

ECHO = {
    "pipeline": "demo/echo:v1",
    "inputs": [{"type": "string", "value": "hi"}, {"type": "integer", "value": 2}],
}


def client(stack: Stack, token: str = "jr_demo_token", gateway: int = 0) -> httpx.AsyncClient:
    return harness.client(stack, token, gateway)


# --- a log with an event kind from a newer release ----------------------------------------


async def test_a_gateway_starts_and_serves_past_an_event_kind_it_does_not_know(
    stack: Stack,
) -> None:
    newer = {"event": "frobnicated", "run_id": "run_from_the_future", "at": 1.0, "level": 11}
    nc = await connect(stack.nats_url, "test")
    try:
        ack = await nc.jetstream().publish(
            event_subject("run_from_the_future", "frobnicated"),
            msgspec.json.encode(newer),
            stream=EVENTS_STREAM,
        )
    finally:
        await nc.close()
    # the unknown event is the last one in the log: a fresh gateway replays up to it
    url = await stack.start_gateway(timeout=30)
    index = stack.gateway_urls.index(url)
    async with client(stack, gateway=index) as c:
        response = await c.post("/v4/runs", json=ECHO)
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "completed"
    assert ack.seq > 0
