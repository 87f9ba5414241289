"""Fault report: drive N runs through each fault and count what happened to them.

    python benchmarks/fault_report.py [--runs 40]

For every fault, a fresh stack of real processes (nats-server or a 3-node cluster, scheduler,
two gateways, two agents) takes N async runs of ``test/count:v1`` (each run appends a line to its
own marker file, so a run executed twice is seen), the fault is injected once N/3 runs were
submitted, and the report prints: submitted, terminal, lost (admitted, never terminal), run twice
(executed more than once), the final states, and the time to detect or recover:
- agent faults: from the fault until no run is left running on that agent;
- process faults: from the fault until the next run reaches a terminal state.
Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from contracts.run import RunRecord  # noqa: E402
from contracts.states import RunState  # noqa: E402
from runtime.infra.eventlog import EventLog  # noqa: E402
from tests.harness import (  # noqa: E402
    FIXTURES,
    Audit,
    Load,
    Proc,
    Stack,
    audit,
    wait_replicas,
)

GATES = str(FIXTURES / "gate_pipelines.py")
NODE_LOSS_S = 3.0


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 120.0) -> float:
    """Seconds until ``check()`` holds (bounded; NaN if it never did)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if await check():
                return time.monotonic() - start
        except Exception:  # the service being faulted may not answer for a while
            pass
        await anyio.sleep(0.05)
    return float("nan")


async def records(stack: Stack, load: Load) -> list[RunRecord]:
    """Every run of the load, folded from the event log."""
    nc = await stack.connect("admin", "fault-report")
    try:
        log = EventLog(nc)
        return [await log.load(run_id) for run_id in list(load.run_ids.values())]
    finally:
        await nc.close()


async def run_fault(name: str, runs: int, tmp: Path) -> tuple[Audit, float]:
    stack = Stack(tmp / name.replace(" ", "-"), node_loss_timeout_s=NODE_LOSS_S)
    stack.tmp.mkdir(parents=True)
    if "cluster" in name:
        await stack.start_cluster(3)
    else:
        await stack.start_nats()
    try:
        stack.start_scheduler()
        await stack.start_gateway(timeout=90)
        await stack.start_gateway(timeout=90)
        victim = stack.start_agent("agent-1", GATES, slots=4)
        stack.start_agent("agent-2", GATES, slots=4)
        await wait_replicas(stack.url, "tok_big", "test/count:v1", n=2, timeout=90)
        agent_fault = name.startswith("agent")
        load = Load(stack, stack.tmp, seconds=2.0 if agent_fault else 0.05)

        async def victim_busy() -> bool:
            return any(
                r.state is RunState.running and r.agent_id == "agent-1"
                for r in await records(stack, load)
            )

        async def victim_idle() -> bool:
            return not await victim_busy()

        async def next_terminal() -> bool:
            return any(
                r.is_terminal and r.updated_at > injected_at for r in await records(stack, load)
            )

        async with anyio.create_task_group() as tg:
            tg.start_soon(load.submit_many, runs, name.replace(" ", "-"))
            await until(lambda: _at_least(load, runs // 3))
            if agent_fault:
                await until(victim_busy)
            injected_at = time.time()
            await inject(stack, name, victim)
            detect = await until(victim_idle if agent_fault else next_terminal)
        return await audit(load, timeout=180), detect
    finally:
        await stack.stop()


async def _at_least(load: Load, n: int) -> bool:
    return len(load.run_ids) >= n


async def inject(stack: Stack, name: str, victim: Proc) -> None:
    if name == "agent SIGKILL":
        victim.kill()
    elif name == "agent SIGTERM (spot recall)":
        victim.signal(signal.SIGTERM)
    elif name == "agent SIGSTOP":
        victim.signal(signal.SIGSTOP)
    else:
        await stack.inject(PROCESS_FAULTS[name])


PROCESS_FAULTS = {
    "scheduler SIGKILL + restart": "scheduler",
    "gateway SIGKILL + restart": "gateway",
    "nats-server SIGKILL + restart": "nats",
    "nats cluster node SIGKILL": "cluster-node",
}


FAULTS = [
    "agent SIGKILL",
    "agent SIGTERM (spot recall)",
    "agent SIGSTOP",
    "scheduler SIGKILL + restart",
    "gateway SIGKILL + restart",
    "nats-server SIGKILL + restart",
    "nats cluster node SIGKILL",
]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--only", default=None, help="run only faults containing this text")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="jetrun-faults-"))
    print(f"{os.cpu_count()} cores; {args.runs} runs per fault; node loss timeout {NODE_LOSS_S} s")
    print(
        f"{'fault':32} {'submitted':>9} {'terminal':>8} {'lost':>4} {'twice':>5}  "
        f"{'detect/recover':>14}  states"
    )
    for name in FAULTS:
        if args.only and args.only not in name:
            continue
        result, detect = await run_fault(name, args.runs, tmp)
        states = ", ".join(f"{k} {v}" for k, v in sorted(result.states.items()))
        print(
            f"{name:32} {result.submitted:>9} {result.terminal:>8} {result.lost:>4} "
            f"{result.ran_twice:>5}  {detect:>12.2f} s  {states}",
            flush=True,
        )


if __name__ == "__main__":
    anyio.run(main, backend_options={"use_uvloop": True})
