"""Every way into the system, against real processes: the idempotency race on two gateways,
service submissions over NATS, and a log holding an event kind this release does not know."""

from __future__ import annotations

import anyio
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


# --- one Idempotency-Key, two bodies, at once, on two gateways ---------------------------


async def test_concurrent_requests_with_one_key_and_two_bodies_one_body_wins(
    stack: Stack,
) -> None:
    bodies = [
        {
            **ECHO,
            "async_run": True,
            "inputs": [*ECHO["inputs"][:1], {"type": "integer", "value": n}],
        }
        for n in (1, 2)
    ]
    answers: list[tuple[int, httpx.Response]] = []
    headers = {"Idempotency-Key": "race-1"}
    async with client(stack) as c0, client(stack, gateway=1) as c1:

        async def post(i: int) -> None:
            c = (c0, c1)[i % 2]
            which = (i // 2) % 2
            answers.append((which, await c.post("/v4/runs", json=bodies[which], headers=headers)))

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(post, i)
    accepted = [(w, r) for w, r in answers if r.status_code == 202]
    winners = {w for w, _ in accepted}
    assert len(winners) == 1, [(w, r.status_code, r.text) for w, r in answers]
    (winner,) = winners
    for which, response in answers:
        if which == winner:
            assert response.status_code == 202, response.text
            sent = [(i["type"], i["value"]) for i in bodies[winner]["inputs"]]
            assert [(i["type"], i["value"]) for i in response.json()["inputs"]] == sent
        else:
            assert response.status_code == 422, response.text
            assert response.json()["detail"]["code"] == "idempotency_key_reused"
    assert len({r.json()["id"] for _, r in accepted}) == 1
