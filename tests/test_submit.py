"""Admission is one append, and a submission whose append has an unknown outcome keeps its
permit and says so. A gateway in this process against a real nats-server; the event log's
append is made to fail the way an outage does (stored, then no answer until the deadline)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import msgspec
import pytest
from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import BadRequestError

from contracts.agents import PipelineInfo
from contracts.events import Event, RunCancelled, RunSubmitted
from contracts.states import RunState
from contracts.values import IOType, RunIO
from runtime.control.gateway import Gateway
from runtime.control.submit import run_id_for
from runtime.infra.config import parse
from runtime.infra.eventlog import Appended, LogSettings
from runtime.provision import provision

pytestmark = pytest.mark.anyio

CONFIG = parse(
    {
        "teams": {"acme": {"tier": "basic", "tokens": ["tok_acme"]}},
        "settings": {"request_deadline_s": 2, "settle_s": 0.1, "sync_wait_s": 2},
    }
)
BODY = {"pipeline": "t/p:v1", "inputs": [{"type": "string", "value": "x"}], "async_run": True}
Append = Callable[..., Awaitable[Appended]]


@dataclass
class Harness:
    gateway: Gateway
    http: httpx.AsyncClient
    real_append: Append
    real_record: Append

    def fail_submissions(self, how: Callable[[Event], Awaitable[Appended]]) -> None:
        async def append(event: Event, **kw: Any) -> Appended:
            if isinstance(event, RunSubmitted):
                return await how(event)
            return await self.real_append(event, **kw)

        async def record(event: Event) -> Appended:
            return await append(event)

        # a submission is recorded with ``record`` (confirmed by the gateway's tail, else acked)
        self.gateway.log.append = append  # type: ignore[method-assign]
        self.gateway.log.record = record  # type: ignore[method-assign]

    def heal(self) -> None:
        self.gateway.log.append = self.real_append  # type: ignore[method-assign]
        self.gateway.log.record = self.real_record  # type: ignore[method-assign]

    async def permits(self) -> list[str]:
        return [p.run_id for _, p in await self.gateway.admission.holders(3, "acme")]

    async def kinds(self, run_id: str) -> list[str]:
        return [s.event.kind for s in await self.gateway.log.read(run_id)]


@pytest.fixture
async def h(nc: Client) -> AsyncIterator[Harness]:
    await provision(nc, CONFIG, LogSettings())  # the admin step; the gateway only checks
    gateway = Gateway(nc, CONFIG)
    async with anyio.create_task_group() as tg:
        await tg.start(gateway.run)
        await gateway.catalog.register(PipelineInfo(pointer="t/p:v1"))
        transport = httpx.ASGITransport(app=gateway.app())
        headers = {"Authorization": "Bearer tok_acme"}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://gw", headers=headers
        ) as http:
            yield Harness(gateway, http, gateway.log.append, gateway.log.record)
        tg.cancel_scope.cancel()


async def test_a_run_is_admitted_and_recorded_by_one_append(h: Harness) -> None:
    response = await h.http.post("/v4/runs", json=BODY)
    assert response.status_code == 202, response.text
    run_id = response.json()["id"]
    assert response.json()["state"] == "routing"  # admitted: no scheduler here to place it
    assert await h.kinds(run_id) == ["submitted"]
    assert await h.permits() == [run_id]
    record = h.gateway.index.get(run_id)
    assert record is not None and record.state is RunState.routing and record.slot is not None


async def test_an_append_stored_but_unconfirmed_keeps_its_permit_and_says_so(h: Harness) -> None:
    async def stored_then_silent(event: Event) -> Appended:
        await h.real_append(event)
        raise NatsTimeoutError

    h.fail_submissions(stored_then_silent)
    headers = {"Idempotency-Key": "k-unknown"}
    response = await h.http.post("/v4/runs", json=BODY, headers=headers)
    assert response.status_code == 503, response.text
    detail = response.json()["detail"]
    run_id = run_id_for("acme", "k-unknown")
    assert detail["code"] == "outcome_unknown"
    assert run_id in detail["message"] and "Idempotency-Key is safe" in detail["message"]
    # the run was stored: its permit was not given back, so it cannot run over the limit
    assert await h.kinds(run_id) == ["submitted"]
    assert await h.permits() == [run_id]
    # the retry the answer suggests finds the run, and takes no second permit
    h.heal()
    retried = await h.http.post("/v4/runs", json=BODY, headers=headers)
    assert retried.status_code == 202 and retried.json()["id"] == run_id
    assert await h.permits() == [run_id]


async def test_an_append_the_log_refused_gives_the_permit_back(h: Harness) -> None:
    async def refused(event: Event) -> Appended:
        raise BadRequestError(code=400, err_code=10071, description="wrong last sequence")

    h.fail_submissions(refused)
    response = await h.http.post("/v4/runs", json=BODY, headers={"Idempotency-Key": "k-no"})
    assert response.status_code == 503
    assert response.json()["detail"]["code"] == "event_log_unavailable"
    assert "nothing was recorded" in response.json()["detail"]["message"]
    assert await h.kinds(run_id_for("acme", "k-no")) == []
    assert await h.permits() == []


def test_run_ids_are_fresh_128_bits_or_the_keys() -> None:
    fresh = {run_id_for("acme", None) for _ in range(1000)}
    assert len(fresh) == 1000
    assert all(re.fullmatch(r"run_[0-9a-f]{32}", run_id) for run_id in fresh)
    keyed = run_id_for("acme", "k1")
    assert keyed == run_id_for("acme", "k1") != run_id_for("other", "k1")
    assert re.fullmatch(r"run_[0-9a-f]{32}", keyed)


SYNC = {**BODY, "async_run": False}


async def test_a_sync_request_whose_key_another_body_won_meanwhile_is_refused_at_once(
    h: Harness,
) -> None:
    async def the_other_body_first(event: Event) -> Appended:
        assert isinstance(event, RunSubmitted)
        other = [RunIO(type=IOType.string, value="the other body")]
        await h.real_append(msgspec.structs.replace(event, inputs=other))
        return await h.real_append(event)  # the same run id: a duplicate, not stored

    h.fail_submissions(the_other_body_first)
    with anyio.fail_after(1.5):  # no scheduler here: the run never ends (sync_wait_s is 2)
        response = await h.http.post("/v4/runs", json=SYNC, headers={"Idempotency-Key": "k2"})
    assert response.status_code == 422, response.text
    assert response.json()["detail"]["code"] == "idempotency_key_reused"


async def test_a_sync_request_waits_out_its_wait_once_when_the_index_lags(h: Harness) -> None:
    lag_s = 2.5  # longer than sync_wait_s (2): the first wait ends before the run is seen

    async def stored_later(event: Event) -> Appended:
        seq = h.gateway.index.last_seq + 1  # the next one: nothing else is appended here

        async def later() -> None:
            await anyio.sleep(lag_s)
            await h.real_append(event)
            # the run ends 0.5 s after it shows up: a request that began a second sync_wait_s
            # then would answer with this end, one whose wait was over answers at once
            await anyio.sleep(0.5)
            await h.real_append(RunCancelled(run_id=event.run_id, at=event.at + 3))

        tg.start_soon(later)
        return Appended(seq=seq, duplicate=False)

    h.fail_submissions(stored_later)
    async with anyio.create_task_group() as tg:
        with anyio.fail_after(10):
            response = await h.http.post("/v4/runs", json=SYNC)
    # the run as it was once seen (still routing: nothing runs it here)
    assert response.status_code == 202, response.text
    assert response.json()["state"] == "routing"
