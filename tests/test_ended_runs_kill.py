"""An agent SIGKILLed with ends ready that it had not stored (the batch it would have
appended): its runs are requeued as for any lost node, complete elsewhere, and each has one
end in the log (real processes: nats-server, scheduler, gateway, agents)."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest

from contracts.events import RunsEnded
from runtime.infra.eventlog import EventLog
from tests import harness
from tests.harness import FIXTURES, Stack, open_gate, wait_replicas, wait_state

pytestmark = pytest.mark.anyio

RETRY = str(FIXTURES / "queue_retry_pipelines.py")
POINTER = "test/queue-retry:v1"
NODE_LOSS_S = 2.0


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with Stack(tmp_path_factory.mktemp("ebatch"), node_loss_timeout_s=NODE_LOSS_S) as stack:
        await stack.start_nats()
        stack.start_scheduler()
        await stack.start_gateway()
        yield stack


def executions(gate: Path) -> int:
    runs = gate.with_name(gate.name + ".runs")
    return len(runs.read_text().splitlines()) if runs.exists() else 0


async def submit(c: httpx.AsyncClient, gate: Path) -> str:
    body = {
        "pipeline": POINTER,
        "async_run": True,
        "wait_for_resources": True,
        "inputs": [{"type": "string", "value": str(gate)}],
    }
    response = await c.post("/v4/runs", json=body)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


async def test_an_agent_killed_before_its_batch_of_ends_is_stored_loses_no_run(
    stack: Stack, tmp_path: Path
) -> None:
    """Three runs run on one agent; it is stopped (SIGSTOP), their gates open (its workers
    finish: three ends ready, none appended), and it is SIGKILLed. Each run is requeued
    (attempt 2), completes on another agent, and has exactly one end in the whole log (plain
    or in a batch), of attempt 2."""
    first = stack.start_agent("agent-eb0", RETRY, slots=1)  # registers the pipeline
    await wait_replicas(stack.url, "tok_big", POINTER)
    assert first.stop() is not None
    gates = [tmp_path / f"g{i}" for i in range(3)]
    async with harness.client(stack, "tok_big") as c:
        ids = [await submit(c, gate) for gate in gates]
        for run_id in ids:
            await wait_state(c, run_id, {"queued"}, timeout=15)
        victim = stack.start_agent("agent-eb1", RETRY, slots=3, queue_depth=0)
        with anyio.fail_after(30):
            while not all(executions(g) for g in gates):
                await anyio.sleep(0.05)
        rescuer = stack.start_agent("agent-eb2", RETRY, slots=3)
        try:
            await wait_replicas(stack.url, "tok_big", POINTER, n=2)
            victim.signal(signal.SIGSTOP)  # the agent only: its workers run on
            for i, gate in enumerate(gates):
                open_gate(gate, str(i))
            await anyio.sleep(0.5)  # the workers' results wait in their pipes
            victim.kill()  # SIGKILL: the agent and its workers
            done = [await wait_state(c, r, {"completed", "node_preempted"}, 30) for r in ids]
        finally:
            rescuer.stop()
    assert [(d["state"], d["attempt"]) for d in done] == [("completed", 2)] * 3
    assert [executions(g) for g in gates] == [2, 2, 2]
    nc = await stack.connect()
    try:
        ends: list[tuple[str, int]] = []
        for stored in await EventLog(nc).read_subject("jetrun.ev.>"):
            event = stored.event
            for one in event.ends if isinstance(event, RunsEnded) else [event]:
                if one.kind in ("completed", "failed", "timed_out"):
                    ends.append((one.run_id, one.attempt))  # type: ignore[union-attr]
    finally:
        await nc.close()
    assert sorted(ends) == sorted((r, 2) for r in ids)
