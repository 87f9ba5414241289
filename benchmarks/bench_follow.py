"""What following the event log costs a gateway process that serves no request.

    python benchmarks/bench_follow.py [--gateways 2] [--runs 4000] [--rate 1000]

Every gateway process follows the whole log into its own index, so each one ``jetrun up`` adds
on a machine with more cores costs that much CPU per run whether or not connections reach it.
This starts a nats-server and ``--gateways`` real ``jetrun gateway`` processes (on ports no
client uses), appends ``--runs`` runs' events (submitted, queued, dispatched, completed: a
queued run's history) at about ``--rate`` runs per second from this process, waits until every
gateway answers the last run as completed, and prints each gateway's CPU seconds per 1,000
runs and microseconds per event, its idle CPU over the same time taken off, and its resident
memory then (it holds every run that ended within ``--keep-ended-s``). Every wait is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio
import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from contracts.events import (  # noqa: E402
    AdmissionGrant,
    Event,
    RunCompleted,
    RunDispatched,
    RunQueued,
    RunSubmitted,
)
from contracts.values import RunIO  # noqa: E402
from runtime.infra.eventlog import EventLog  # noqa: E402
from runtime.infra.natsserver import free_port  # noqa: E402
from tests.harness import Stack  # noqa: E402

EVENTS_PER_RUN = 4
TOKEN = "tok_acme"


def history(run_id: str, at: float) -> list[Event]:
    """A queued no-op run's events, as a gateway reads them under load."""
    io = [RunIO(type="string", value="hello")]
    return [
        RunSubmitted(
            run_id=run_id,
            at=at,
            team="acme",
            pipeline="acme/echo:v1",
            inputs=io,
            admission=AdmissionGrant(tier="unlimited"),
        ),
        RunQueued(run_id=run_id, at=at, attempt=1),
        RunDispatched(
            run_id=run_id,
            at=at,
            attempt=1,
            agent_id="agent-1",
            team="acme",
            pipeline="acme/echo:v1",
            inputs=io,
        ),
        RunCompleted(run_id=run_id, at=at, attempt=1, outputs=io),
    ]


async def append_runs(log: EventLog, runs: int, rate: float, step_s: float) -> str:
    """Append ``runs`` histories at about ``rate`` runs/s, each run's events in order and the
    runs of one ``step_s`` step concurrently; returns the last run's id."""
    per_step = max(1, int(rate * step_s))
    started = time.monotonic()
    last = ""
    for first in range(0, runs, per_step):
        ids = [f"run_follow_{i:07d}" for i in range(first, min(runs, first + per_step))]

        async def one(run_id: str) -> None:
            for event in history(run_id, time.time()):
                await log.append(event)

        async with anyio.create_task_group() as tg:
            for run_id in ids:
                tg.start_soon(one, run_id)
        last = ids[-1]
        ahead = started + (first + per_step) / rate - time.monotonic()
        if ahead > 0:
            await anyio.sleep(ahead)
    return last


async def wait_completed(url: str, run_id: str, timeout: float) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with anyio.fail_after(timeout):
        async with httpx.AsyncClient(base_url=url, headers=headers) as c:
            while True:
                r = await c.get(f"/v4/runs/{run_id}")
                if r.status_code == 200 and r.json().get("state") == "completed":
                    return
                await anyio.sleep(0.05)


async def start_gateway(stack: Stack) -> None:
    """A ``jetrun gateway`` process; returns once it answers runs (its /readyz also wants a
    scheduler, which would append events of its own)."""
    port = free_port()
    config = str(stack.config_path)
    args = ["gateway", *stack.nats_args("gateway"), "--config", config, "--port", str(port)]
    stack._cli(f"gateway-{port}", *args)
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with anyio.fail_after(60.0):
        async with httpx.AsyncClient(base_url=url, headers=headers) as c:
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if (await c.get("/v4/runs/run_none")).status_code == 404:
                        break
                await anyio.sleep(0.1)
    stack.gateway_urls.append(url)


def cpu_s(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def sys_s(pid: int) -> float:
    return float(psutil.Process(pid).cpu_times().system)


async def measure(args: argparse.Namespace) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        async with Stack(Path(tmp), keep_ended_s=args.keep_ended_s) as stack:
            await stack.start_nats()
            for _ in range(args.gateways):
                await start_gateway(stack)
            pids = [proc.pid for proc in stack.procs if proc.name.startswith("gateway")]
            idle_start = [cpu_s(pid) for pid in pids]
            await anyio.sleep(args.idle_s)
            idle = [(cpu_s(pid) - c) / args.idle_s for pid, c in zip(pids, idle_start, strict=True)]
            nc = await stack.connect()
            try:
                log = EventLog(nc)
                before = [cpu_s(pid) for pid in pids]
                sys_before = [sys_s(pid) for pid in pids]
                t0 = time.monotonic()
                last = await append_runs(log, args.runs, args.rate, args.step_s)
                for url in stack.gateway_urls:
                    await wait_completed(url, last, timeout=120.0)
                elapsed = time.monotonic() - t0
                used = [cpu_s(pid) - c for pid, c in zip(pids, before, strict=True)]
                rss = [psutil.Process(pid).memory_info().rss for pid in pids]
                kernel = [sys_s(pid) - c for pid, c in zip(pids, sys_before, strict=True)]
            finally:
                await nc.close()
    print(f"{args.runs} runs in {elapsed:.1f} s ({args.runs / elapsed:.0f} runs/s appended)")
    per_1k = []
    for pid, cpu, in_kernel, idle_rate, held in zip(pids, used, kernel, idle, rss, strict=True):
        net = max(0.0, cpu - idle_rate * elapsed)
        per_1k.append(net / args.runs * 1000)
        print(
            f"  gateway {pid}: {cpu:.2f} CPU s ({in_kernel:.2f} in the kernel; "
            f"{idle_rate * 100:.1f}% of a core idle): "
            f"{per_1k[-1]:.3f} CPU s per 1k runs, "
            f"{net / (args.runs * EVENTS_PER_RUN) * 1e6:.1f} us per event, "
            f"{held / 2**20:.0f} MiB resident"
        )
    return per_1k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gateways", type=int, default=2)
    parser.add_argument("--runs", type=int, default=4000)
    parser.add_argument("--rate", type=float, default=1000.0, help="runs appended per second")
    parser.add_argument(
        "--step-s", type=float, default=0.01, help="the runs of one step are appended at once"
    )
    parser.add_argument(
        "--keep-ended-s", type=float, default=300.0, help="settings.keep_ended_s (the default)"
    )
    parser.add_argument("--idle-s", type=float, default=2.0, help="idle CPU measured this long")
    args = parser.parse_args()
    print(f"load average {psutil.getloadavg()[0]:.2f}, {psutil.cpu_count()} cores")
    per_1k = anyio.run(measure, args)
    print(f"median: {statistics.median(per_1k):.3f} CPU s per 1k runs per gateway")
    print(f"load average after {psutil.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
