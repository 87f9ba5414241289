"""``GET /v4/runs`` reaches every run of the team (real processes): runs that ended long before
``keep_ended_s`` (1 s here), across a gateway restart, merged with live runs page after page,
and never another team's."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests.harness import FIXTURES, Stack, client, open_gate, wait_replicas, wait_state

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
async def histstack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with Stack(tmp_path_factory.mktemp("hist"), keep_ended_s=1.0) as stack:
        await stack.start_nats()
        stack.start_scheduler()
        await stack.start_gateway()
        stack.start_agent("agent-demo", "runtime.node.demo", str(FIXTURES / "gate_pipelines.py"))
        await wait_replicas(stack.url, "tok_acme", "demo/echo:v1")
        await wait_replicas(stack.url, "tok_acme", "test/gate:v1")
        yield stack


def echo(text: str) -> dict[str, Any]:
    return {
        "pipeline": "demo/echo:v1",
        "inputs": [{"type": "string", "value": text}, {"type": "integer", "value": 1}],
    }


async def every_page(c: httpx.AsyncClient, **params: Any) -> list[list[dict[str, Any]]]:
    pages: list[list[dict[str, Any]]] = []
    cursor = None
    while len(pages) < 50:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        response = await c.get("/v4/runs", params=query)
        assert response.status_code == 200, response.text
        body = response.json()
        pages.append(body["runs"])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages
    raise AssertionError("pages never ended")


def ids(pages: list[list[dict[str, Any]]]) -> list[str]:
    return [run["id"] for page in pages for run in page]


async def restart_gateway(stack: Stack) -> None:
    url = stack.gateway_urls[0]
    proc = next(p for p in stack.procs if p.name.startswith("gateway-"))
    assert proc.stop() is not None
    stack.procs.remove(proc)
    await stack.start_gateway(int(url.rsplit(":", 1)[1]))


async def test_runs_ended_long_ago_are_listed_also_after_a_gateway_restart(
    histstack: Stack, tmp_path: Path
) -> None:
    async with client(histstack, "tok_acme") as acme, client(histstack, "tok_rival") as rival:
        mine = []
        for i in range(7):
            run = (await acme.post("/v4/runs", json=echo(f"a{i}"))).json()
            assert run["state"] == "completed", run
            mine.append(run["id"])
        failed = (await acme.post("/v4/runs", json={"pipeline": "demo/fail:v1"})).json()
        assert failed["state"] == "failed"
        mine.append(failed["id"])
        theirs = [(await rival.post("/v4/runs", json=echo("r"))).json()["id"] for _ in range(3)]
        await anyio.sleep(3.0)  # every run ended more than keep_ended_s (1 s) ago
        gate = tmp_path / "gate"
        body = {
            "pipeline": "test/gate:v1",
            "async_run": True,
            "inputs": [{"type": "string", "value": str(gate)}],
        }
        live = (await acme.post("/v4/runs", json=body)).json()["id"]
        await wait_state(acme, live, {"running"})
        newest_first = [live, *mine[::-1]]

        pages = await every_page(acme, limit=3)
        assert ids(pages) == newest_first  # no duplicate, no gap, the live run first
        assert [r["state"] for r in pages[0]] == ["running", "failed", "completed"]
        assert pages[1][0]["outputs"][0]["value"] == "a5"  # the stored view, outputs and all
        assert ids(await every_page(rival, limit=2)) == theirs[::-1]
        only_failed = await every_page(acme, state="failed")
        assert ids(only_failed) == [failed["id"]]
        first = pages[-1][-1]["created_at"]
        assert ids(await every_page(acme, created_before=first + 1e-3)) == [mine[0]]

        await restart_gateway(histstack)
        assert ids(await every_page(acme, limit=2)) == newest_first
        assert ids(await every_page(rival)) == theirs[::-1]
        assert ids(await every_page(acme, state="running")) == [live]
        open_gate(gate, "go")
        await wait_state(acme, live, {"completed"})
