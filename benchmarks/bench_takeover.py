"""Standby takeover time: SIGKILL the leading scheduler, time until the standby decides.

    python benchmarks/bench_takeover.py [--rounds 5] [--burn 0]

A stack of real processes (nats-server, two schedulers, a gateway, an agent) on loopback. Each
round kills the scheduler that leads, submits one run at once, and prints the seconds from the
SIGKILL until the standby began fencing the log (its first ``elected`` marker is stored) and
until the run was dispatched (its first decision); the killed one is started again as the next
standby. The lease TTL is 3 s and a standby tries every 0.5 s, so the floor is about 3.5 s
after the leader's last renewal. ``--burn N`` runs N busy processes meanwhile (a loaded
machine). Every wait is bounded.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from contracts.events import (  # noqa: E402
    AnyEvent,
    RunDispatched,
    RunsDispatched,
    SchedulerElected,
)
from runtime.infra.eventlog import EventLog  # noqa: E402
from tests.harness import FIXTURES, Proc, Stack, wait_replicas  # noqa: E402

GATES = str(FIXTURES / "gate_pipelines.py")


class Watch:
    """When (monotonic) each fence marker and each dispatch reached this process."""

    def __init__(self) -> None:
        self.elected: list[tuple[float, str]] = []
        self.dispatched: dict[str, float] = {}

    async def on_event(self, seq: int, event: AnyEvent) -> None:
        if isinstance(event, SchedulerElected):
            self.elected.append((time.monotonic(), event.holder))
        elif isinstance(event, RunDispatched):
            self.dispatched.setdefault(event.run_id, time.monotonic())
        elif isinstance(event, RunsDispatched):  # a pass's dispatches to one agent
            for one in event.runs:
                self.dispatched.setdefault(one.run_id, time.monotonic())


async def leader(stack: Stack, timeout: float = 60.0) -> Proc:
    """The scheduler whose log says it leads, and has not said it stood by since."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in stack.procs:
            alive = proc.popen is not None and proc.popen.poll() is None
            if proc.name.startswith("scheduler-") and alive:
                out = proc.output()
                if out.rfind("holds the lease") > out.rfind("standing by"):
                    return proc
        await anyio.sleep(0.05)
    raise TimeoutError("no scheduler leads")


async def submit(stack: Stack) -> str:
    body = {
        "pipeline": "test/count:v1",
        "async_run": True,
        "inputs": [
            {"type": "string", "value": str(stack.tmp / "marker")},
            {"type": "fp", "value": 0.0},
        ],
    }
    async with httpx.AsyncClient(timeout=30.0) as client:
        response = await client.post(
            f"{stack.url}/v4/runs", json=body, headers={"Authorization": "Bearer tok_big"}
        )
        response.raise_for_status()
        return str(response.json()["id"])


async def first_marker_after(watch: Watch, seen: int, timeout: float = 60.0) -> float:
    """When the first fence marker after the ``seen`` first ones arrived (NaN: never)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(watch.elected) > seen:
            return watch.elected[seen][0]
        await anyio.sleep(0.01)
    return float("nan")


async def dispatched(watch: Watch, run_id: str, timeout: float = 60.0) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if run_id in watch.dispatched:
            return watch.dispatched[run_id]
        await anyio.sleep(0.01)
    return float("nan")


async def main(rounds: int, burn: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="jetrun-takeover-"))
    burners: list[subprocess.Popen[bytes]] = []
    async with Stack(tmp / "stack") as stack:
        stack.tmp.mkdir()
        await stack.start_nats()
        stack.start_scheduler("scheduler-0")
        stack.start_scheduler("scheduler-1")
        await stack.start_gateway()
        stack.start_agent("agent-1", GATES, slots=2)
        await wait_replicas(stack.url, "tok_big", "test/count:v1", n=1)
        nc = await stack.connect("admin", "bench")
        watch = Watch()
        sub = await EventLog(nc).tail(watch.on_event)
        for _ in range(burn):
            burners.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
        print(f"{rounds} rounds, {burn} busy processes, load average {os.getloadavg()[0]:.1f}")
        print("round | fence begun s | first decision s")
        leads, decides = [], []
        try:
            for n in range(rounds):
                victim = await leader(stack)
                await anyio.sleep(1.0)  # a renewal or two after it took the lease
                seen = len(watch.elected)
                victim.kill()
                killed = time.monotonic()
                run_id = await submit(stack)
                fenced = await first_marker_after(watch, seen)
                decided = await dispatched(watch, run_id)
                leads.append(fenced - killed)
                decides.append(decided - killed)
                print(f"{n + 1:5} | {leads[-1]:16.2f} | {decides[-1]:16.2f}")
                stack.start_scheduler(f"scheduler-{n + 2}")  # the next standby
                await anyio.sleep(2.0)  # caught up before it may be needed
            print(
                f"standby takeover (SIGKILL to first decision): median"
                f" {statistics.median(decides):.2f} s, max {max(decides):.2f} s;"
                f" to its first fence marker: median {statistics.median(leads):.2f} s"
            )
        finally:
            for proc in burners:
                proc.kill()
            await sub.unsubscribe()
            await nc.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--burn", type=int, default=0)
    args = parser.parse_args()
    anyio.run(main, args.rounds, args.burn)
