"""Runs waiting at an agent, with real processes: an agent with one CPU slot and a queue of
one takes a second short run while the first runs and runs it right after (its execution
timeout counted from when its worker starts); a run cancelled while it waits there never
runs; an agent SIGKILLed with a run waiting there has that run requeued and run once
elsewhere; a pipeline whose attempts are long never gets queue room, and its waiting runs keep
exact queue positions."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest

from tests import harness
from tests.harness import FIXTURES, Stack, gate_run, open_gate, wait_replicas, wait_state
from tests.test_metrics import scrape, value

pytestmark = pytest.mark.anyio

QUEUE = str(FIXTURES / "queue_pipelines.py")
RETRY = str(FIXTURES / "queue_retry_pipelines.py")
SHORT_S = 0.5  # typical attempts under this may wait at an agent (robust on a loaded box)
NODE_LOSS_S = 2.0


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """nats-server, a scheduler, a gateway and agent-q: one CPU slot, a queue of one."""
    tmp = tmp_path_factory.mktemp("queue")
    # its runs hold their slot for seconds, and the warm-up ends come a request apart: the
    # expected wait there is long, so the bound on it is lifted to see what a waiting run does
    async with Stack(
        tmp, node_loss_timeout_s=NODE_LOSS_S, short_attempt_s=SHORT_S, agent_queue_wait_s=600
    ) as stack:
        await stack.start_nats()
        stack.start_scheduler()
        await stack.start_gateway()
        stack.start_agent("agent-q", QUEUE, slots=1, queue_depth=1)
        for pointer in ("test/queue-run:v1", "test/queue-cancel:v1", "test/queue-long:v1"):
            await wait_replicas(stack.url, "tok_big", pointer)
        yield stack


def client(stack: Stack) -> httpx.AsyncClient:
    return harness.client(stack, "tok_big")


async def warm(c: httpx.AsyncClient, pointer: str, tmp: Path, n: int = 3) -> None:
    """``n`` runs that end at once: the scheduler has seen short attempts of ``pointer``."""
    for i in range(n):
        gate = tmp / f"warm-{pointer.split('/')[1].split(':')[0]}-{i}"
        open_gate(gate, "warm")
        run_id = await gate_run(c, gate, pointer)
        await wait_state(c, run_id, {"completed"}, timeout=30)


async def executing(gate: Path, timeout: float = 30.0) -> None:
    """Wait until a run of ``gate`` is executing in a worker."""
    with anyio.fail_after(timeout):
        while not executions(gate):
            await anyio.sleep(0.02)


def executions(gate: Path) -> int:
    runs = gate.with_name(gate.name + ".runs")
    return len(runs.read_text().splitlines()) if runs.exists() else 0


async def test_a_second_short_run_waits_at_the_agent_and_runs_right_after(
    stack: Stack, tmp_path: Path
) -> None:
    pointer = "test/queue-run:v1"
    async with client(stack) as c:
        await warm(c, pointer, tmp_path)
        first, second = tmp_path / "first", tmp_path / "second"
        first_id = await gate_run(c, first, pointer)
        await executing(first)
        second_id = await gate_run(c, second, pointer)
        # dispatched to agent-q although its only slot is busy: it waits there for a worker
        waiting = await wait_state(c, second_id, {"running"}, timeout=15)
        dispatched = time.monotonic()  # a little after the dispatch
        assert waiting["waiting_for"] == "worker" and waiting["queue_position"] is None
        agent = await scrape(stack.health_urls["agent-q"])
        assert value(agent, "jetrun_agent_attempts") == 1
        assert value(agent, "jetrun_agent_attempts_waiting") == 1
        gateway = await scrape(stack.url, "tok_admin")
        assert value(gateway, "jetrun_slots", kind="cpu", state="used") == 1
        assert value(gateway, "jetrun_slots", kind="cpu", state="waiting") == 1
        await anyio.sleep(dispatched + 2.0 - time.monotonic())
        assert executions(second) == 0  # it waits: the one slot runs first
        opened = time.monotonic()
        open_gate(first, "1")  # first ran about 2 s of its 4 s timeout
        await executing(second, timeout=10)
        started_after_s = time.monotonic() - opened
        # second has been dispatched for over its 4 s timeout, and has run for about 2.3 s
        await anyio.sleep(dispatched + 4.3 - time.monotonic())
        open_gate(second, "2")
        done = await wait_state(c, second_id, {"completed", "failed"}, timeout=15)
        assert (await c.get(f"/v4/runs/{first_id}")).json()["state"] == "completed"
    assert done["state"] == "completed", done["error"]  # not timed out: its timeout began late
    assert [o["value"] for o in done["outputs"]] == ["2"]
    assert executions(first) == executions(second) == 1
    assert started_after_s < 5.0  # right after the slot freed, not after another pass


async def test_a_run_cancelled_while_it_waits_at_the_agent_never_runs(
    stack: Stack, tmp_path: Path
) -> None:
    pointer = "test/queue-cancel:v1"
    async with client(stack) as c:
        await warm(c, pointer, tmp_path)
        first, second, third = tmp_path / "first", tmp_path / "second", tmp_path / "third"
        first_id = await gate_run(c, first, pointer)
        await executing(first)
        open_gate(second, "would end at once")
        second_id = await gate_run(c, second, pointer)
        waiting = await wait_state(c, second_id, {"running"}, timeout=15)
        assert waiting["waiting_for"] == "worker"
        response = await c.post(f"/v4/runs/{second_id}/cancel")
        assert response.status_code in (200, 202), response.text
        cancelled = await wait_state(c, second_id, {"cancelled"}, timeout=15)
        open_gate(first, "1")
        await wait_state(c, first_id, {"completed"}, timeout=15)
        open_gate(third, "3")  # the slot's next run: second's turn has passed
        third_id = await gate_run(c, third, pointer)
        await wait_state(c, third_id, {"completed"}, timeout=15)
    assert cancelled["outputs"] == [] and cancelled["waiting_for"] is None
    assert executions(second) == 0
    assert executions(third) == 1


async def test_a_long_pipeline_gets_no_queue_room_and_its_queue_stays_exact(
    stack: Stack, tmp_path: Path
) -> None:
    pointer = "test/queue-long:v1"
    async with client(stack) as c:
        long_warm = tmp_path / "long-warm"
        warm_id = await gate_run(c, long_warm, pointer)
        await executing(long_warm)
        await anyio.sleep(2 * SHORT_S)  # its typical attempt is now long
        open_gate(long_warm, "done")
        await wait_state(c, warm_id, {"completed"}, timeout=15)
        gates = [tmp_path / f"g{i}" for i in range(3)]
        ids = [await gate_run(c, gates[0], pointer)]
        await executing(gates[0])
        ids += [await gate_run(c, gate, pointer) for gate in gates[1:]]
        views = [(await c.get(f"/v4/runs/{run_id}")).json() for run_id in ids[1:]]
        assert [(v["state"], v["queue_position"], v["waiting_for"]) for v in views] == [
            ("queued", 0, "capacity"),
            ("queued", 1, "capacity"),
        ]
        for gate in gates:
            open_gate(gate, "ok")
        for run_id in ids:
            await wait_state(c, run_id, {"completed"}, timeout=15)
    assert [executions(gate) for gate in gates] == [1, 1, 1]


async def test_a_run_waiting_at_a_killed_agent_is_requeued_and_runs_once_elsewhere(
    stack: Stack, tmp_path: Path
) -> None:
    pointer = "test/queue-retry:v1"
    victim = stack.start_agent("agent-qk1", RETRY, slots=1, queue_depth=1)
    await wait_replicas(stack.url, "tok_big", pointer)
    async with client(stack) as c:
        await warm(c, pointer, tmp_path)
        first, second = tmp_path / "first", tmp_path / "second"
        first_id = await gate_run(c, first, pointer)
        await executing(first)
        open_gate(second, "2")  # it ends as soon as it runs
        second_id = await gate_run(c, second, pointer)
        waiting = await wait_state(c, second_id, {"running"}, timeout=15)
        assert waiting["waiting_for"] == "worker"
        rescuer = stack.start_agent("agent-qk2", RETRY, slots=1, queue_depth=1)
        try:
            await wait_replicas(stack.url, "tok_big", pointer, n=2)
            victim.kill()  # SIGKILL: the agent and its workers
            open_gate(first, "1")
            second_done = await wait_state(c, second_id, {"completed", "node_preempted"}, 30)
            first_done = await wait_state(c, first_id, {"completed", "node_preempted"}, 30)
        finally:
            rescuer.stop()
    assert second_done["state"] == "completed" and second_done["attempt"] == 2
    assert executions(second) == 1  # never ran on the killed agent, once on the other
    assert first_done["state"] == "completed" and first_done["attempt"] == 2
    assert executions(first) == 2  # killed mid-run, then run again
