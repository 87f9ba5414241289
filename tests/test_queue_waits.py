"""What queued runs wait for comes from one event per queue: real nats-server, gateway,
scheduler and agent processes."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest

from contracts.states import WaitingFor
from runtime.clients.client import RunChange, RunEvents
from runtime.infra.eventlog import EventLog, kind_subjects
from tests import harness
from tests.harness import Stack, client, wait_state

pytestmark = pytest.mark.anyio


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with Stack(tmp_path / "stack", node_loss_timeout_s=2.0) as stack:
        stack.tmp.mkdir()
        await stack.start_nats()
        stack.start_scheduler()
        await stack.start_gateway()
        yield stack


async def test_queued_runs_show_what_their_queue_waits_for_from_one_event(stack: Stack) -> None:
    """A loading replica's node dies under three queued runs: the scheduler records one
    ``queue_waiting`` event for the queue (no ``waiting`` per run), and GET, the listing and
    the NATS-level client all show the runs waiting for resources."""
    agent = stack.start_agent("agent-cold", str(harness.FIXTURES / "startup_pipelines.py"))
    body = {"pipeline": "test/slow-start:v1", "inputs": [], "async_run": True}
    body["wait_for_resources"] = True
    nc = await stack.connect("service", "watch")
    try:
        async with client(stack, "tok_big") as c:
            await wait_states(c, "test/slow-start:v1", "loading")
            ids = [(await c.post("/v4/runs", json=body)).json()["id"] for _ in range(3)]
            for run_id in ids:
                assert (await wait_state(c, run_id, {"queued"}))["waiting_for"] == "cold_start"
            agent.kill()  # lost after node_loss_timeout_s: no replica at all any more
            with anyio.fail_after(30):
                while (await c.get(f"/v4/runs/{ids[0]}")).json()["waiting_for"] != "resources":
                    await anyio.sleep(0.1)
            for run_id in ids:
                assert (await c.get(f"/v4/runs/{run_id}")).json()["waiting_for"] == "resources"
            with anyio.fail_after(30):  # the client, from the start of the log
                async with contextlib.aclosing(RunEvents(nc).watch(run_id=ids[2])) as changes:
                    seen = [change.run.waiting_for async for change in _until_resources(changes)]
            assert seen[-2:] == [WaitingFor.cold_start, WaitingFor.resources]
            listed = (await c.get("/v4/runs", params={"state": "queued"})).json()
            shown = {r["id"]: r["waiting_for"] for r in listed["runs"] if r["id"] in ids}
            assert shown == dict.fromkeys(ids, "resources"), listed
            log = EventLog(nc)
            assert {s.event.kind for r in ids for s in await log.read(r)} == {
                "submitted",
                "queued",
            }
            changes_of_queue = await log.read_subject(kind_subjects("queue_waiting"))
            assert [s.event.waiting_for for s in changes_of_queue][-1:] == [WaitingFor.resources]
            for run_id in ids:
                await c.post(f"/v4/runs/{run_id}/cancel")
    finally:
        await nc.close()
        agent.stop()


async def _until_resources(changes: AsyncIterator[RunChange]) -> AsyncIterator[RunChange]:
    async for change in changes:
        yield change
        if change.run.waiting_for is WaitingFor.resources:
            return


async def wait_states(c: httpx.AsyncClient, pointer: str, state: str) -> None:
    with anyio.fail_after(30):
        while True:
            response = await c.get(f"/v4/pipelines/{pointer}/scaling")
            if response.status_code == 200 and response.json()["current_pipeline_states"].get(
                state
            ):
                return
            await anyio.sleep(0.1)
