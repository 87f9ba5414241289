"""The node agent alone: runs/s and CPU per run of one ``jetrun agent`` fed no-op dispatches.

    python benchmarks/bench_agent.py [--runs 3000] [--slots 4] [--rounds 3] [--stream N]

Starts a nats-server (streams provisioned, NATS authentication on) and one agent process with
the demo pipelines, then plays the scheduler: it appends ``dispatched`` events addressed to the
agent (inputs carried, as the scheduler does; no-op runs, or ``demo/stream:v1`` streaming
``--stream`` outputs each), keeping ``--slots`` attempts in flight, and
counts the ends the agent appends. Prints, per round and as medians: runs/s, the agent's CPU
ms per run (its own process, and its workers apart), dispatch-to-end latency p50/p99, and the
events and log chunks the agent appended per run. No gateway or scheduler: this isolates the
agent's per-run cost. Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import anyio
from nats.aio.msg import Msg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from contracts.events import RunDispatched, encode_event  # noqa: E402
from contracts.values import from_python  # noqa: E402
from runtime.infra.eventlog import dispatch_subject  # noqa: E402
from tests.harness import Stack  # noqa: E402

ENDS = ("completed", "failed", "timed_out")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_s(pid: int) -> float:
    """CPU seconds of the live children of ``pid`` (the agent's workers)."""
    total = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            with contextlib.suppress(OSError):  # exited meanwhile
                total += cpu_s(int(child))
    return total


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def one_round(
    stack: Stack, agent: str, pid: int, runs: int, slots: int, stream: int
) -> dict[str, float]:
    nc = await stack.connect("admin", "bench-agent")
    js = nc.jetstream(timeout=10.0)
    free = anyio.Semaphore(slots)
    sent: dict[str, float] = {}
    latencies: list[float] = []
    kinds: Counter[str] = Counter()
    all_done = anyio.Event()
    prefix = f"run_{uuid.uuid4().hex[:8]}_"

    async def on_event(msg: Msg) -> None:
        run_id, kind = msg.subject.split(".")[2:4]
        if not run_id.startswith(prefix):
            return
        kinds[kind] += 1
        if kind in ENDS and run_id in sent:
            latencies.append(time.perf_counter() - sent[run_id])
            free.release()
            if len(latencies) >= runs:
                all_done.set()

    async def on_log(msg: Msg) -> None:
        if msg.subject.split(".")[2].startswith(prefix):
            kinds["log chunk"] += 1

    subs = [
        await nc.subscribe("jetrun.ev.*.*", cb=on_event),
        await nc.subscribe("jetrun.logs.>", cb=on_log),
    ]
    await nc.flush()
    cpu_before, workers_before, start = cpu_s(pid), children_cpu_s(pid), time.perf_counter()
    with anyio.fail_after(600):
        for i in range(runs):
            await free.acquire()
            run_id = f"{prefix}{i}"
            event = RunDispatched(
                run_id=run_id,
                at=time.time(),
                attempt=1,
                agent_id=agent,
                team="bench",
                pipeline="demo/stream:v1" if stream else "demo/noop:v1",
                inputs=[from_python(stream)] if stream else [],
            )
            sent[run_id] = time.perf_counter()
            await js.publish(
                dispatch_subject(run_id, agent),
                encode_event(event),
                headers={"Nats-Msg-Id": event.message_id()},
            )
        await all_done.wait()
    elapsed, cpu = time.perf_counter() - start, cpu_s(pid) - cpu_before
    workers = children_cpu_s(pid) - workers_before
    for sub in subs:
        await sub.unsubscribe()
    await nc.close()
    ms = [x * 1000 for x in latencies]
    figures = {
        "runs/s": runs / elapsed,
        "agent CPU ms/run": cpu / runs * 1000,
        "workers CPU ms/run": workers / runs * 1000,
        "p50 ms": percentile(ms, 50),
        "p99 ms": percentile(ms, 99),
    }
    for kind in ("started", "output", *ENDS, "log chunk"):
        figures[f"{kind}/run"] = kinds[kind] / runs
    return figures


async def wait_serving(stack: Stack, agent: str) -> None:
    """Until the agent heartbeats with its no-op pipeline ready."""
    nc = await stack.connect("admin", "bench-wait")
    ready = anyio.Event()

    async def on_beat(msg: Msg) -> None:
        if b'"demo/noop:v1","status":"ready"' in msg.data:
            ready.set()

    await nc.subscribe(f"jetrun.agents.heartbeat.{agent}", cb=on_beat)
    with anyio.fail_after(60):
        await ready.wait()
    await nc.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3000)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stream", type=int, default=0, help="demo/stream:v1 with N outputs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="jetrun-bench-agent-") as tmp:
        async with Stack(Path(tmp)) as stack:
            await stack.start_nats()
            agent = "agent-bench"
            proc = stack.start_agent(agent, slots=args.slots)
            await wait_serving(stack, agent)
            rounds = []
            for n in range(args.rounds):
                figures = await one_round(
                    stack, agent, proc.pid, args.runs, args.slots, args.stream
                )
                rounds.append(figures)
                print(f"round {n + 1}: " + "  ".join(f"{k} {v:.2f}" for k, v in figures.items()))
    load = os.getloadavg()
    print(
        f"machine: {platform.machine()}, {len(os.sched_getaffinity(0))} of {os.cpu_count()} "
        f"cores, Python {platform.python_version()}, load average {load[0]:.1f}"
    )
    print(f"medians of {args.rounds} rounds of {args.runs} runs, {args.slots} slots:")
    for key in rounds[0]:
        print(f"  {key:18} {statistics.median(r[key] for r in rounds):8.2f}")


if __name__ == "__main__":
    anyio.run(main)
