"""Every way into the system, against real processes: the idempotency race on two gateways,
service submissions over NATS, and a log holding an event kind this release does not know."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import httpx
import msgspec
import pytest

from contracts.errors import ErrorType
from contracts.events import RunSubmitted
from contracts.run import RunRecord
from contracts.states import RunState
from contracts.values import from_python
from runtime.clients.client import RunEvents
from runtime.clients.sdk import ConcurrencyLimitReached, JetrunError
from runtime.infra.eventlog import EVENTS_STREAM, event_subject
from tests import harness
from tests.harness import Stack, open_gate, wait_state

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
    nc = await stack.connect()
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


# --- services: submissions over NATS go through admission; raw submitted events never run ---


def gate_body(path: Path) -> dict[str, object]:
    return {
        "pipeline": "test/gate:v1",
        "async_run": True,
        "inputs": [{"type": "string", "value": str(path)}],
    }


async def test_a_service_submits_through_admission_and_hears_typed_refusals(
    stack: Stack, tmp_path: Path
) -> None:
    gates = [tmp_path / f"gate{i}" for i in range(4)]
    async with RunEvents.connect(stack.nats_url, stack.credentials("service")) as events:
        runs = [
            await events.submit("test/gate:v1", str(g), token="tok_rival", idempotency_key=g.name)
            for g in gates[:3]
        ]
        assert [r.state for r in runs] != [] and all(r.attempt == 1 for r in runs)
        again = await events.submit(
            "test/gate:v1", str(gates[0]), token="tok_rival", idempotency_key=gates[0].name
        )
        assert again.id == runs[0].id  # the same key finds the same run
        with pytest.raises(ConcurrencyLimitReached) as full:
            await events.submit("test/gate:v1", str(gates[3]), token="tok_rival")
        assert (full.value.tier, full.value.limit, full.value.active) == ("basic", 3, 3)
        with pytest.raises(JetrunError) as unknown:
            await events.submit("test/gate:v1", "x", token="tok_nobody")
        assert unknown.value.status == 401
        with pytest.raises(JetrunError) as missing:
            await events.submit("test/nope:v1", "x", token="tok_rival")
        assert missing.value.status == 404
        with pytest.raises(JetrunError) as bad:
            await events.submit("not a pointer", "x", token="tok_rival")
        assert bad.value.status == 422 and bad.value.detail["field"] == "pipeline"
    async with client(stack, "tok_rival") as c:
        for gate, run in zip(gates, runs, strict=False):
            open_gate(gate, "open")
            assert (await wait_state(c, run.id, {"completed"}))["outputs"][0]["value"] == "open"


async def test_submitted_events_published_past_admission_never_run(
    stack: Stack, tmp_path: Path
) -> None:
    gates = [tmp_path / f"gate{i}" for i in range(3)]
    raw_marker = tmp_path / "raw.runs"
    async with client(stack, "tok_acme") as c:
        held = [(await c.post("/v4/runs", json=gate_body(g))).json()["id"] for g in gates]
        assert len(held) == 3  # acme (basic) is at its limit
        # a service may not publish raw events at all (tests/test_nats_auth.py); what gets
        # past the permissions (admin, a gateway) is still never run unadmitted
        admin = stack.credentials("admin")
        async with RunEvents.connect(stack.nats_url, admin) as events:
            raw = {
                "run_raw_at_limit": "acme",  # a team at its limit
                "run_raw_no_team": "nobody",  # a team not in the config
                "run_raw_unlimited": "big",  # an unlimited tier: still not admitted
            }
            for run_id, team in raw.items():
                inputs = [from_python(str(raw_marker)), from_python(0.0)]
                submitted = RunSubmitted(
                    run_id=run_id, at=time.time(), team=team, pipeline="test/count:v1",
                    inputs=inputs, async_run=True, wait_for_resources=True,
                )  # fmt: skip
                await events.publish(submitted)
            deadline = time.monotonic() + 30
            ended: dict[str, RunRecord] = {}
            while len(ended) < len(raw) and time.monotonic() < deadline:
                for run_id in raw:
                    run = await events.log.load(run_id)
                    if run.is_terminal:
                        ended[run_id] = run
                await anyio.sleep(0.2)
        assert set(ended) == set(raw), ended
        for run in ended.values():
            assert run.state is RunState.failed and run.error is not None
            assert run.error.type is ErrorType.unknown
            assert run.error.message.startswith("not_admitted: ")
        assert "'nobody' is not in the config" in ended["run_raw_no_team"].error.message
        assert not raw_marker.exists()  # none of them ran
        for gate, run_id in zip(gates, held, strict=True):
            open_gate(gate, "open")
            await wait_state(c, run_id, {"completed"})
