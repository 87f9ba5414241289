"""Faults with real processes: agents killed, stopped and recalled; attempts timed out; control
plane processes and the nats-server killed under load. No admitted run is lost or run twice."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest

from contracts.events import RunRequeued
from contracts.states import RunState
from runtime.control.submit import run_id_for
from runtime.infra.eventlog import EventLog
from runtime.infra.fleet import ATTEMPT_LOST, NODE_RECALLED
from tests import harness
from tests.harness import (
    FIXTURES,
    Load,
    Stack,
    audit,
    gate_run,
    open_gate,
    wait_ready,
    wait_replicas,
    wait_state,
)

pytestmark = pytest.mark.anyio

GATES = str(FIXTURES / "gate_pipelines.py")
JETRUN = str(Path(sys.executable).parent / "jetrun")
NODE_LOSS_S = 2.0


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with Stack(tmp_path / "stack", node_loss_timeout_s=NODE_LOSS_S) as stack:
        stack.tmp.mkdir()
        await stack.start_nats()
        stack.start_scheduler()
        await stack.start_gateway()
        yield stack


def client(stack: Stack, token: str = "tok_big") -> httpx.AsyncClient:
    return harness.client(stack, token)


async def test_a_killed_agents_run_ends_node_preempted_in_bounded_time(
    stack: Stack, tmp_path: Path
) -> None:
    victim = stack.start_agent("victim", GATES, slots=1)
    await wait_replicas(stack.url, "tok_big", "test/gate:v1")
    async with client(stack) as c:
        run_id = await gate_run(c, tmp_path / "never")
        await wait_state(c, run_id, {"running"})
        killed_at = time.monotonic()
        victim.kill()
        run = await wait_state(c, run_id, {"node_preempted"}, timeout=15)
        detected_s = time.monotonic() - killed_at
    assert run["attempt"] == 1
    assert run["error"]["type"] == "unknown" and run["error"]["message"].startswith("node_lost")
    assert detected_s < NODE_LOSS_S + 2.0


async def test_a_killed_agents_run_is_requeued_when_the_pipeline_retries(
    stack: Stack, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    victim = stack.start_agent("victim", GATES, slots=1)
    await wait_replicas(stack.url, "tok_big", "test/retry-gate:v1")
    async with client(stack) as c:
        run_id = await gate_run(c, gate, "test/retry-gate:v1")
        await wait_state(c, run_id, {"running"})
        stack.start_agent("survivor", GATES, slots=1)
        await wait_replicas(stack.url, "tok_big", "test/retry-gate:v1", n=2)
        victim.kill()
        run = await wait_state(c, run_id, {"running"}, timeout=15)
        deadline = time.monotonic() + 15
        while run["attempt"] != 2 and time.monotonic() < deadline:
            await anyio.sleep(0.1)  # attempt 1 reads running until the loss: poll, not spin
            run = await wait_state(c, run_id, {"running"}, timeout=15)
        assert run["attempt"] == 2
        open_gate(gate, "open")
        run = await wait_state(c, run_id, {"completed"})
    pids = Path(f"{gate}.attempts").read_text().split()
    assert len(pids) == 2  # attempt 1 on the victim, attempt 2 on the survivor
    assert run["outputs"][0]["value"] == f"open by {pids[1]}"


async def test_sigterm_is_a_preemption_notice(stack: Stack, tmp_path: Path) -> None:
    victim = stack.start_agent("victim", GATES, slots=1)
    await wait_replicas(stack.url, "tok_big", "test/gate:v1")
    async with client(stack) as c:
        run_id = await gate_run(c, tmp_path / "never")
        await wait_state(c, run_id, {"running"})
        noticed_at = time.monotonic()
        victim.signal(signal.SIGTERM)
        await wait_state(c, run_id, {"node_preempted"}, timeout=10)
        assert time.monotonic() - noticed_at < NODE_LOSS_S  # at once, not by timeout
    assert victim.popen is not None and victim.popen.wait(15) == 0


async def test_an_explicit_recall_preempts_at_once(stack: Stack, tmp_path: Path) -> None:
    victim = stack.start_agent("victim", GATES, slots=1)
    await wait_replicas(stack.url, "tok_big", "test/gate:v1")
    async with client(stack) as c:
        run_id = await gate_run(c, tmp_path / "never")
        await wait_state(c, run_id, {"running"})
        argv = [JETRUN, "recall", "victim", *stack.nats_args("admin")]
        answer = await anyio.run_process(argv)
        assert answer.stdout.decode().strip() == "victim draining"
        run = await wait_state(c, run_id, {"node_preempted"}, timeout=10)
        # preempted by the recall itself, not by a node-loss timeout later (no clock read: a
        # loaded machine makes any bound on seconds a guess)
        assert run["error"]["message"] == f"{NODE_RECALLED}: the node was recalled", run
    assert victim.popen is not None and victim.popen.wait(15) == 0
    unknown = await anyio.run_process(
        [JETRUN, "recall", "nobody", *stack.nats_args("admin"), "--timeout", "0.5"],
        check=False,
    )
    assert unknown.returncode == 1 and b"no agent nobody answered" in unknown.stderr


async def test_the_execution_timeout_kills_the_attempt(stack: Stack, tmp_path: Path) -> None:
    stack.start_agent("agent", GATES, slots=1)
    await wait_replicas(stack.url, "tok_big", "test/hang:v1")
    pid_file = tmp_path / "pid"
    async with client(stack) as c:
        body = {"pipeline": "test/hang:v1", "inputs": [{"type": "string", "value": str(pid_file)}]}
        run = (await c.post("/v4/runs", json=body)).json()
        assert run["state"] == "failed"
        assert run["error"]["type"] == "timeout"
        assert "1 s" in run["error"]["message"]
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid_file.read_text()), 0)
        # the pipeline still serves the next run (a fresh worker)
        gate = tmp_path / "open"
        open_gate(gate, "ok")
        body = {"pipeline": "test/gate:v1", "inputs": [{"type": "string", "value": str(gate)}]}
        assert (await c.post("/v4/runs", json=body)).json()["state"] == "completed"


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


async def attempt_pids(gate: Path, n: int, timeout: float = 15.0) -> list[int]:
    """The worker pids of a retry-gate run's first ``n`` attempts, once they have started."""
    deadline = time.monotonic() + timeout
    marker = Path(f"{gate}.attempts")
    while time.monotonic() < deadline:
        pids = marker.read_text().split() if marker.exists() else []
        if len(pids) >= n:
            return [int(p) for p in pids]
        await anyio.sleep(0.05)
    raise TimeoutError(f"{n} attempts of {gate} did not start within {timeout} s")


async def wait_dead(pid: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid):
        assert time.monotonic() < deadline, f"process {pid} still running after {timeout} s"
        await anyio.sleep(0.05)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
async def test_a_fenced_agent_kills_its_attempts_at_once_and_exits(
    stack: Stack, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"  # stays closed until the zombie is gone: no attempt can finish
    zombie = stack.start_agent("zombie", GATES, slots=1)
    await wait_replicas(stack.url, "tok_big", "test/retry-gate:v1")
    async with client(stack) as c:
        run_id = await gate_run(c, gate, "test/retry-gate:v1")
        await wait_state(c, run_id, {"running"})
        stack.start_agent("healthy", GATES, slots=1)
        await wait_replicas(stack.url, "tok_big", "test/retry-gate:v1", n=2)
        zombie.signal(signal.SIGSTOP)  # the agent freezes; its worker keeps waiting
        stale, fresh = await attempt_pids(gate, 2)  # the run moved on to the healthy agent
        zombie.signal(signal.SIGCONT)
        # the zombie learns it was declared lost: its attempt is killed now, it exits 3
        assert zombie.popen is not None and zombie.popen.wait(20) == 3, zombie.output()
        await wait_dead(stale)
        assert alive(fresh)
        open_gate(gate, "open")
        run = await wait_state(c, run_id, {"completed"})
    assert run["attempt"] == 2 and run["outputs"][0]["value"] == f"open by {fresh}"
    nc = await stack.connect()
    stored = await EventLog(nc).read(run_id)
    await nc.close()
    completions = [s.event for s in stored if s.event.kind == "completed"]
    assert [e.attempt for e in completions] == [2]  # type: ignore[attr-defined]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
async def test_an_attempt_declared_lost_on_a_live_agent_is_killed_there(
    stack: Stack, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    stack.start_agent("live", GATES, slots=1)
    await wait_replicas(stack.url, "tok_big", "test/retry-gate:v1")
    async with client(stack) as c:
        run_id = await gate_run(c, gate, "test/retry-gate:v1")
        await wait_state(c, run_id, {"running"})
        [first] = await attempt_pids(gate, 1)
        # what the scheduler appends when a live agent's heartbeats stop listing a run
        lost = RunRequeued(
            run_id=run_id,
            at=time.time(),
            attempt=1,
            agent_id="live",
            reason=f"{ATTEMPT_LOST}: node live no longer runs it",
        )
        assert stack.nats is not None
        nc = await stack.connect()
        await EventLog(nc).append(lost)
        await nc.close()
        await wait_dead(first)  # killed on the agent, not left running beside attempt 2
        _, second = await attempt_pids(gate, 2)  # the freed slot takes attempt 2
        open_gate(gate, "open")
        run = await wait_state(c, run_id, {"completed"})
    assert run["attempt"] == 2 and run["outputs"][0]["value"] == f"open by {second}"


async def test_an_agent_restarted_with_the_same_id_is_taken_back(
    stack: Stack, tmp_path: Path
) -> None:
    phoenix = stack.start_agent("phoenix", GATES, slots=1)
    await wait_replicas(stack.url, "tok_big", "test/gate:v1")
    async with client(stack) as c:
        held = await gate_run(c, tmp_path / "never")
        await wait_state(c, held, {"running"})
        phoenix.signal(signal.SIGSTOP)
        await wait_state(c, held, {"node_preempted"}, timeout=15)  # declared lost
        phoenix.kill()
        stack.procs.remove(phoenix)
        stack.start_agent("phoenix", GATES, slots=1)  # its supervisor restarts it
        gate = tmp_path / "open"
        open_gate(gate, "served")
        run_id = await gate_run(c, gate)
        run = await wait_state(c, run_id, {"completed"}, timeout=30)
    assert run["outputs"][0]["value"] == "served"


# --- the control plane and NATS under load ------------------------------------------------


async def load_with_fault(stack: Stack, tmp_path: Path, fault: str) -> None:
    stack.start_agent("agent-1", GATES, slots=2)
    stack.start_agent("agent-2", GATES, slots=2)
    await wait_replicas(stack.url, "tok_big", "test/count:v1", n=2)
    load = Load(stack, tmp_path, seconds=0.05)
    async with anyio.create_task_group() as tg:
        tg.start_soon(load.submit_many, 60, fault)
        await wait_until(lambda: len(load.run_ids) >= 20)
        await stack.inject(fault)
    result = await audit(load, timeout=120)
    assert result.submitted == 60
    assert result.lost == 0, result
    assert result.ran_twice == 0, result
    assert result.states == {"completed": 60}, result


async def wait_until(condition: object, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:  # type: ignore[operator]
        await anyio.sleep(0.05)


@pytest.mark.parametrize("fault", ["scheduler", "gateway", "nats"])
async def test_nothing_admitted_is_lost_or_run_twice_when_a_process_dies(
    stack: Stack, tmp_path: Path, fault: str
) -> None:
    await stack.start_gateway()  # a second gateway takes requests while the first is down
    await load_with_fault(stack, tmp_path, fault)


async def test_queue_positions_stay_exact_across_control_plane_restarts(
    stack: Stack, tmp_path: Path
) -> None:
    stack.start_agent("agent", GATES, slots=1)
    await wait_replicas(stack.url, "tok_big", "test/gate:v1")
    gates = [tmp_path / f"g{i}" for i in range(6)]
    async with client(stack) as c:
        ids = [await gate_run(c, g) for g in gates]
        await wait_state(c, ids[0], {"running"})
        for proc in [p for p in stack.procs if p.name == "scheduler" or p.name.startswith("gate")]:
            proc.kill()
            stack.procs.remove(proc)
    stack.start_scheduler()
    stack.gateway_urls.clear()
    await stack.start_gateway()
    async with client(stack) as c:
        positions = [(await c.get(f"/v4/runs/{i}")).json()["queue_position"] for i in ids[1:]]
        assert positions == [0, 1, 2, 3, 4]
        open_gate(gates[0], "go")
        await wait_state(c, ids[1], {"running"})
        positions = [(await c.get(f"/v4/runs/{i}")).json()["queue_position"] for i in ids[2:]]
        assert positions == [0, 1, 2, 3]
        for gate in gates[1:]:
            open_gate(gate, "go")
        for run_id in ids:
            assert (await wait_state(c, run_id, {"completed"}))["state"] == RunState.completed


async def test_requests_get_503_while_nats_is_down_and_nothing_is_half_recorded(
    stack: Stack, tmp_path: Path
) -> None:
    stack.start_agent("agent", GATES, slots=1)
    await wait_replicas(stack.url, "tok_big", "test/gate:v1")
    gate = tmp_path / "gate"
    open_gate(gate, "ok")
    body = {"pipeline": "test/gate:v1", "inputs": [{"type": "string", "value": str(gate)}]}
    assert stack.nats is not None
    async with client(stack, "tok_acme") as c:
        stack.nats.kill()
        down = await c.post("/v4/runs", json=body, headers={"Idempotency-Key": "k-down"})
        assert down.status_code == 503
        assert down.json()["detail"]["code"] == "event_log_unavailable"
        await stack.start_nats()
        await wait_ready(stack.url)
        # no run was created for the failed request
        missing = await c.get(f"/v4/runs/{run_id_for('acme', 'k-down')}")
        assert missing.status_code == 404
        # a permit the failed request may still have taken (its publish was buffered while
        # disconnected) is given back by the sweep: the team gets its three runs
        accepted = 0
        deadline = time.monotonic() + 30
        while accepted < 3 and time.monotonic() < deadline:
            response = await c.post("/v4/runs", json={**body, "async_run": True})
            assert response.status_code in (202, 429), response.text
            accepted += response.status_code == 202
            if response.status_code == 429:
                await anyio.sleep(0.5)
        assert accepted == 3
