"""Sync-run latency and async throughput of a no-op pipeline through the HTTP API, on
``jetrun up``.

    python benchmarks/bench_runs.py [--sync 300] [--async-runs 1000] [--concurrency 64]

Starts ``jetrun up`` (embedded nats-server, gateway, scheduler, one local agent) in a temp dir,
then prints: sync latency p50/p90/p99 (sequential runs), async throughput (runs/s from the first
submit to the last terminal state, seen on the event stream), and the peak RSS of the processes.
Loopback only; every loop is bounded.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_stages  # noqa: E402
import nats_traffic  # noqa: E402
from run_ends import EndCounts, Span  # noqa: E402

from runtime.clients.client import RunEvents  # noqa: E402
from runtime.infra.nats_auth import Credentials  # noqa: E402
from runtime.infra.natsserver import free_port  # noqa: E402

CONFIG = """
[teams.bench]
tier = "startup"
tokens = ["bench"]

[settings]
rate_limit_per_s = 0  # the load generator is one token: measure jetrun, not its rate limit
"""
NOOP = {"pipeline": "demo/noop:v1", "inputs": []}


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children, from /proc (Linux)."""
    total = 0
    pids = [pid]
    try:
        children = subprocess.run(
            ["pgrep", "-g", str(os.getpgid(pid))], capture_output=True, text=True, check=False
        ).stdout.split()
        pids = [int(p) for p in children] or pids
    except (OSError, ValueError):
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


async def wait_ready(url: str, pipelines: tuple[str, ...] = ("demo/noop:v1",)) -> None:
    """Until each of ``pipelines`` has a ready replica (the local agent warms them in
    parallel: one being ready says nothing of another)."""
    waiting = list(pipelines)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": "Bearer bench"}) as c:
        for _ in range(600):
            try:
                r = await c.get(f"/v4/pipelines/{waiting[0]}/scaling")
                if r.status_code == 200 and r.json()["current_replicas"] >= 1:
                    waiting.pop(0)
                    if not waiting:
                        return
                    continue
            except httpx.TransportError:
                pass
            await anyio.sleep(0.1)
    raise TimeoutError("jetrun up did not become ready")


async def sync_latency(url: str, n: int, by_run: dict[str, float] | None = None) -> list[float]:
    """Seconds per sequential sync run (after 20 untimed ones); each also into ``by_run``
    under its run's id when given."""
    latencies = []
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": "Bearer bench"}) as c:
        for _ in range(20):  # warm-up
            await c.post("/v4/runs", json=NOOP)
        for _ in range(n):
            start = time.perf_counter()
            response = await c.post("/v4/runs", json=NOOP)
            latencies.append(time.perf_counter() - start)
            run = response.json()
            assert run["state"] == "completed", response.text
            if by_run is not None:
                by_run[run["id"]] = latencies[-1]
    return latencies


async def async_throughput(
    url: str, nats_url: str, n: int, concurrency: int, creds: Credentials
) -> tuple[float, float]:
    ids: set[str] = set()
    done = anyio.Event()
    ended: set[str] = set()

    async def watch(events: RunEvents, task_status: anyio.abc.TaskStatus[None]) -> None:
        start_seq = await events.log.last_seq() + 1
        task_status.started()
        async for change in events.watch(team="bench", from_seq=start_seq):
            if change.run.state.is_terminal:
                ended.add(change.run.id)
                if len(ended & ids) >= n:
                    done.set()
                    return

    limiter = anyio.Semaphore(concurrency)
    body = {**NOOP, "async_run": True}
    async with (
        RunEvents.connect(nats_url, creds) as events,
        httpx.AsyncClient(
            base_url=url,
            headers={"Authorization": "Bearer bench"},
            limits=httpx.Limits(max_connections=concurrency),
            timeout=60,
        ) as c,
    ):

        async def submit() -> None:
            async with limiter:
                response = await c.post("/v4/runs", json=body)
                ids.add(response.json()["id"])

        async with anyio.create_task_group() as tg:
            await tg.start(watch, events)
            start = time.perf_counter()
            async with anyio.create_task_group() as submitters:
                for _ in range(n):
                    submitters.start_soon(submit)
            accepted = time.perf_counter() - start
            with anyio.fail_after(600):
                await done.wait()
            elapsed = time.perf_counter() - start
            tg.cancel_scope.cancel()
    assert len(ids) == n
    return n / accepted, n / elapsed


POST_LUA = """
wrk.method = "POST"
wrk.body = '{"pipeline": "demo/noop:v1", "inputs": [], "async_run": true}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer bench"
"""


@dataclass
class WrkPhase:
    """A throughput phase under wrk: the rate the API accepted, how many runs it submitted (as
    counted in the log) and their ``submitted`` and end events, read by ``end_to_end``."""

    accepted: float
    runs: int
    span: Span


async def wrk_throughput(
    url: str, nats_url: str, seconds: int, concurrency: int, tmp: Path, creds: Credentials
) -> WrkPhase:
    """Async runs submitted by wrk (a C load generator: the Python client tops out first) for
    ``seconds``; returns once every run is terminal, learned from the counts nats-server keeps
    (``run_ends.EndCounts``: none of the runs' events is read while they drain; the runs of
    earlier phases all ended before this one began)."""
    script = tmp / "post.lua"
    script.write_text(POST_LUA)
    argv = ["wrk", "-t2", f"-c{concurrency}", f"-d{seconds}s", "-s", str(script), f"{url}/v4/runs"]
    if os.environ.get("JETRUN_BENCH_LOADGEN_CPUS"):  # keep the load generator off jetrun's cores
        argv = ["taskset", "-c", os.environ["JETRUN_BENCH_LOADGEN_CPUS"], *argv]
    async with RunEvents.connect(nats_url, creds) as events:
        span = Span(since=time.time(), next_seq=await events.log.last_seq() + 1)
        async with EndCounts(events.log.js, span.next_seq) as counts:
            out = await anyio.run_process(argv)
            accepted = float(out.stdout.decode().split("Requests/sec:")[1].split()[0])
            runs = await counts.until_all_ended(600.0)  # bounded: 10 minutes
    return WrkPhase(accepted, runs, span)


async def end_to_end(nats_url: str, creds: Credentials, phase: WrkPhase) -> float:
    """The phase's runs/s from the first submit to the last run's end, as recorded in the
    events, read once the phase is over; raises ``TimeoutError`` if some run's end is not in
    the log."""
    async with RunEvents.connect(nats_url, creds) as events:
        await phase.span.read_all(events.log.js, phase.runs)
    return phase.span.runs_per_s()


@dataclass
class Phases:
    """Where each phase began in the log, for its per-stage breakdown (``bench_stages``),
    and the sync runs' latencies by run id."""

    nats_url: str
    creds: Credentials
    starts: list[tuple[str, int]] = field(default_factory=list)
    client_s: dict[str, float] = field(default_factory=dict)

    async def begin(self, phase: str) -> None:
        self.starts.append((phase, await bench_stages.next_seq(self.nats_url, self.creds)))

    async def lines(self) -> list[str]:
        """Each phase's stage lines, read from its range of the log (to where the next began)."""
        stop = await bench_stages.next_seq(self.nats_url, self.creds)
        ends = [start for _, start in self.starts[1:]] + [stop]
        lines: list[str] = []
        for (phase, start), end in zip(self.starts, ends, strict=True):
            client_s = self.client_s if phase == "sync" else None
            lines += await bench_stages.phase_lines(
                self.nats_url, self.creds, phase, start, end, client_s
            )
        return lines


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sync", type=int, default=300)
    parser.add_argument("--async-runs", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--wrk-seconds", type=int, default=5)
    parser.add_argument("--gateways", type=int, default=None, help="default: jetrun up's")
    parser.add_argument("--nats-sync", default=None, help="nats-server sync_interval, or always")
    parser.add_argument("--peers", default="", help="jetrun only here (bench_peers.py: peers)")
    args = parser.parse_args()
    if args.peers:
        parser.error("bench_runs measures jetrun alone; use bench_peers.py --peers for peers")

    tmp = Path(tempfile.mkdtemp(prefix="jetrun-bench-"))
    (tmp / "jetrun.toml").write_text(CONFIG)
    port, nats_port, monitor_port = free_port(), free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    monitor_url = f"http://127.0.0.1:{monitor_port}"
    jetrun = str(Path(sys.executable).parent / "jetrun")
    argv = [
        jetrun,
        "up",
        "--port",
        str(port),
        "--nats-port",
        str(nats_port),
        "--nats-monitor-port",
        str(monitor_port),
        "--data-dir",
        str(tmp / "data"),
        "--config",
        str(tmp / "jetrun.toml"),
        "--slots",
        str(args.slots),
    ]
    if args.gateways:
        argv += ["--gateways", str(args.gateways)]
    if args.nats_sync:
        argv += ["--nats-sync", args.nats_sync]
    with open(tmp / "up.log", "wb") as log:
        up = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        await wait_ready(url)
        nats_url = f"nats://127.0.0.1:{nats_port}"
        creds = Credentials.from_dir(tmp / "data" / "credentials", "service")
        phases = Phases(nats_url, creds)
        await phases.begin("sync")
        latencies = await sync_latency(url, args.sync, phases.client_s)
        await phases.begin("async (Python client)")
        before = nats_traffic.snapshot(monitor_url)
        accepted, throughput = await async_throughput(
            url, nats_url, args.async_runs, args.concurrency, creds
        )
        await nats_traffic.outbox_caught_up(nats_url, creds)  # its messages are counted too
        traffic = nats_traffic.per_run(before, nats_traffic.snapshot(monitor_url), args.async_runs)
        loaded = None
        if shutil.which("wrk"):
            await phases.begin("wrk")
            phase = await wrk_throughput(
                url, nats_url, args.wrk_seconds, args.concurrency, tmp, creds
            )
            loaded = phase.accepted, await end_to_end(nats_url, creds, phase), phase.runs
        memory = rss_mb(up.pid)
        stages = await phases.lines()  # every measurement is over: reading costs none of them
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(60)

    ms = [x * 1000 for x in latencies]
    print(
        f"machine: {platform.machine()}, {len(os.sched_getaffinity(0))} of {os.cpu_count()} "
        f"cores, Python {platform.python_version()}"
    )
    print(f"sync no-op runs over HTTP (n={len(ms)}, sequential):")
    print(
        f"  p50 {percentile(ms, 50):.2f} ms  p90 {percentile(ms, 90):.2f} ms  "
        f"p99 {percentile(ms, 99):.2f} ms  mean {statistics.mean(ms):.2f} ms"
    )
    print(
        f"async no-op runs (n={args.async_runs}, {args.concurrency} in flight): "
        f"{throughput:.0f} runs/s submit-to-terminal ({accepted:.0f} runs/s accepted by the API)"
    )
    print("\n".join(f"  {line}" for line in traffic.lines()))
    if loaded is None:
        print("wrk not installed (apt-get install wrk): no figures under a C load generator")
    else:
        wrk_accepted, wrk_throughput_, wrk_runs = loaded
        print(
            f"async no-op runs from wrk ({args.concurrency} connections, {wrk_runs} runs): "
            f"{wrk_accepted:.0f} runs/s accepted by the API, {wrk_throughput_:.0f} runs/s "
            f"submit-to-terminal"
        )
    print(f"memory: {memory:.0f} MiB RSS (jetrun up: nats-server, control plane, agent, workers)")
    print("\n".join(stages))


if __name__ == "__main__":
    anyio.run(main, backend_options={"use_uvloop": True})
