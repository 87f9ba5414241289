"""Attacks by one tenant on the others, against real processes (nats-server, scheduler,
gateway, agent): each must fail only the attacker's own request, with a clear error."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import msgspec
import pytest

from contracts.submission import SUBMIT_SUBJECT, SubmitReply
from runtime.clients.client import RunEvents
from tests.harness import FIXTURES, Stack, client, wait_replicas

pytestmark = pytest.mark.anyio

LOGS = str(FIXTURES / "log_pipelines.py")
MAX_CONNECTIONS = 24
STREAMS_PER_TEAM = 4


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with Stack(tmp_path_factory.mktemp("attacks")) as stack:
        await stack.start_nats()
        with stack.config_path.open("a") as config:  # [settings] is the config's last table
            config.write(f"http_max_connections = {MAX_CONNECTIONS}\n")
            config.write(f"max_streams_per_team = {STREAMS_PER_TEAM}\n")
        stack.start_scheduler()
        await stack.start_gateway()
        stack.start_agent("agent-attacks", LOGS, slots=2)
        await wait_replicas(stack.url, "tok_acme", "test/chatty-gate:v1")
        yield stack


async def test_open_streams_of_one_team_cannot_starve_the_gateway(
    stack: Stack, tmp_path: Path
) -> None:
    """A team that opens a follow stream per connection the gateway has (on a run that waits)
    gets 429 too_many_streams past its share; another team's requests still get answers."""
    gate = tmp_path / "gate"
    body = {
        "pipeline": "test/chatty-gate:v1",
        "async_run": True,
        "inputs": [{"type": "string", "value": str(gate)}],
    }
    statuses: list[int] = []
    async with contextlib.AsyncExitStack() as streams:
        async with client(stack, "tok_acme") as acme:
            run_id = (await acme.post("/v4/runs", json=body)).json()["id"]
        limits = httpx.Limits(max_connections=MAX_CONNECTIONS + 8)
        attacker = await streams.enter_async_context(
            httpx.AsyncClient(
                base_url=stack.url,
                headers={"Authorization": "Bearer tok_acme"},
                limits=limits,
                timeout=httpx.Timeout(10.0),
            )
        )

        async def follow() -> None:
            try:
                response = await streams.enter_async_context(
                    attacker.stream("GET", f"/v4/runs/{run_id}/logs?follow=1")
                )
            except httpx.TransportError:
                statuses.append(0)  # the gateway closed the connection (over its cap)
                return
            statuses.append(response.status_code)
            if response.status_code != 200:
                await response.aread()

        with anyio.fail_after(60):
            for _ in range(MAX_CONNECTIONS + 4):
                await follow()
            async with client(stack, "tok_rival") as rival:
                listing = await rival.get("/v4/runs")
        assert listing.status_code == 200, listing.text
        assert statuses.count(200) == STREAMS_PER_TEAM, statuses
        assert statuses.count(429) == MAX_CONNECTIONS + 4 - STREAMS_PER_TEAM, statuses
        async with client(stack, "tok_acme") as acme:  # a streamed run shares the quota
            before = (await acme.get("/v4/runs")).json()["runs"]
            streamed = await acme.post("/v4/runs/stream", json=body)
            after = (await acme.get("/v4/runs")).json()["runs"]
        assert streamed.status_code == 429, streamed.text
        assert streamed.json()["detail"]["code"] == "too_many_streams"
        assert streamed.headers["retry-after"]
        assert after == before  # refused before anything was recorded
    # the attacker hung up while its run still waits: its slots come back
    async with contextlib.AsyncExitStack() as again:
        acme = await again.enter_async_context(client(stack, "tok_acme"))
        with anyio.fail_after(30):
            for _ in range(STREAMS_PER_TEAM):
                while True:
                    url = f"/v4/runs/{run_id}/logs?follow=1"
                    reopened = await again.enter_async_context(acme.stream("GET", url))
                    if reopened.status_code == 200:
                        break
                    assert reopened.status_code == 429
                    await reopened.aclose()
                    await anyio.sleep(0.1)  # the gateway has yet to see a hang-up
        gate.write_text("go")  # the run ends, and with it the streams


async def test_the_stream_limit_holds_across_gateways(stack: Stack, tmp_path: Path) -> None:
    """``max_streams_per_team`` counts a team's streams on every gateway together (``jetrun up
    --gateways N`` does not give N times as many): half on each of two gateways, then both
    refuse; a stream closed on one gateway frees a slot on the other."""
    second = await stack.start_gateway()
    first = stack.gateway_urls[0]
    gate = tmp_path / "gate"
    body = {
        "pipeline": "test/chatty-gate:v1",
        "async_run": True,
        "inputs": [{"type": "string", "value": str(gate)}],
    }
    async with client(stack, "tok_acme") as acme:
        run_id = (await acme.post("/v4/runs", json=body)).json()["id"]
    url = f"/v4/runs/{run_id}/logs?follow=1"
    headers = {"Authorization": "Bearer tok_acme"}
    async with contextlib.AsyncExitStack() as held:
        gateways = [
            await held.enter_async_context(httpx.AsyncClient(base_url=base, headers=headers))
            for base in (first, second)
        ]

        async def open_stream(gateway: httpx.AsyncClient) -> httpx.Response:
            return await held.enter_async_context(gateway.stream("GET", url))

        with anyio.fail_after(30):
            for i in range(STREAMS_PER_TEAM):
                while (opened := await open_stream(gateways[i % 2])).status_code == 429:
                    await opened.aclose()  # an earlier test's stream still being given back
                    await anyio.sleep(0.1)
                assert opened.status_code == 200
        refused = [await open_stream(g) for g in gateways]
        for response in refused:
            await response.aread()
        assert [r.status_code for r in refused] == [429, 429]
        assert refused[1].json()["detail"]["code"] == "too_many_streams"
    async with contextlib.AsyncExitStack() as again:  # closed: the slots are back, for either
        other = await again.enter_async_context(httpx.AsyncClient(base_url=second, headers=headers))
        with anyio.fail_after(30):
            for _ in range(STREAMS_PER_TEAM):  # all on one gateway now
                while (
                    opened := await again.enter_async_context(other.stream("GET", url))
                ).status_code == 429:
                    await opened.aclose()  # the other gateway is still giving its slots back
                    await anyio.sleep(0.1)
                assert opened.status_code == 200
    gate.write_text("go")


async def test_a_request_head_past_the_cap_is_431_not_gateway_memory(stack: Stack) -> None:
    """Anyone who can reach the port could stream headers into the gateway's memory until the
    head deadline (tens of MB a second per connection); past http_max_head_bytes it is 431."""
    port = int(stack.url.rsplit(":", 1)[1])

    def send_big_head() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000)
            sock.settimeout(5)  # the head is not finished: only the cap can answer now
            return sock.recv(200)

    answer = await anyio.to_thread.run_sync(send_big_head)
    assert answer.startswith(b"HTTP/1.1 431 "), answer
    async with client(stack, "tok_acme") as acme:  # a big but allowed head still works
        ok = await acme.get("/v4/runs", headers={"X-Pad": "p" * 30_000})
        post = await acme.post("/v4/runs", content=b" " * 900_000 + b"{}")  # body is not head
    assert ok.status_code == 200, ok.text
    assert post.status_code == 422, post.text


async def test_a_nats_submission_nested_too_deep_is_refused_and_the_gateway_lives(
    stack: Stack,
) -> None:
    """One request on jetrun.submit whose body nests 3,000 levels killed every gateway that
    answered it (a RecursionError out of the request decoder ended its task group)."""
    nested = b"[" * 3000 + b"]" * 3000
    async with RunEvents.connect(stack.nats_url, stack.credentials("service")) as events:
        for payload in (b'{"token": "tok_acme", "body": ' + nested + b"}", nested):
            with anyio.fail_after(15):
                msg = await events.log.nc.request(SUBMIT_SUBJECT, payload, timeout=10)
            reply = msgspec.json.decode(msg.data, type=SubmitReply)
            assert reply.status == 400 and reply.detail["code"] == "invalid_request", reply
    gateway = next(p for p in stack.procs if p.name.startswith("gateway"))
    assert gateway.popen is not None and gateway.popen.poll() is None, gateway.output()
    async with client(stack, "tok_acme") as acme:
        assert (await acme.get("/v4/runs")).status_code == 200
