"""The same no-op workload on jetrun, Ray tasks and Celery + Redis, in one run, side by side.

    pip install -e '.[bench]'          # ray, celery[redis], psutil
    apt-get install wrk redis-server   # the load generator and Celery's broker
    python benchmarks/bench_peers.py [--runs 5000] [--sync 300] [--rounds 3] [--slots 4]
        [--queue-depth N]

The task returns its input (a short string). Each round measures every system in turn
(interleaved, so a noisy neighbour hits all of them alike); the table shows medians over the rounds
and jetrun's ratio to each peer. Figures:
- sync p50 / p99: sequential runs, one waiting for the other (jetrun: HTTP with keep-alive,
  the standard library's client; the same through httpx and through the SDK's module-level
  ``run_pipeline`` are printed beside it);
- throughput: runs/s from the first submit to the last result (jetrun: async runs submitted by wrk
  for a fixed time, then until every one is terminal in the event log; while they drain the
  benchmark only polls counts nats-server keeps, and it reads the runs' events, first submit and
  last end included, once the phase's CPU and messages are counted: ``run_ends.py``);
- CPU: seconds of CPU per 1,000 runs of each system's own processes during the throughput phase
  (jetrun: until its webhook outbox has also read every event; per process with psutil).
  ``--followers N`` also starts N ``jetrun gateway`` processes that no client reaches and prints
  their CPU per run apart (not in jetrun's): what following the log costs each gateway
  process, paid for every run whichever gateway served it.

Durability, as measured: jetrun with nats-server's default file-store sync (every 2 minutes),
or ``--nats-sync always``; Celery with Redis ``appendonly yes``, ``appendfsync everysec``; Ray
keeps task results in memory only. Everything listens on 127.0.0.1 and every loop is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import bench_runs  # noqa: E402
import bench_stages  # noqa: E402
import nats_traffic  # noqa: E402

from runtime.infra.natsserver import free_port  # noqa: E402

PAYLOAD = "x" * 16
ECHO = {"pipeline": "demo/echo:v1", "inputs": [{"type": "string", "value": PAYLOAD}]}
SYNC_BODY = json.dumps(ECHO)
SYNC_HEADERS = {"Authorization": "Bearer bench", "Content-Type": "application/json"}


@dataclass
class Figures:
    p50_ms: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    runs_per_s: list[float] = field(default_factory=list)
    cpu_s_per_1k: list[float] = field(default_factory=list)

    def add(self, latencies: list[float], rate: float, cpu_s_per_1k: float) -> None:
        ms = [x * 1000 for x in latencies]
        self.p50_ms.append(bench_runs.percentile(ms, 50))
        self.p99_ms.append(bench_runs.percentile(ms, 99))
        self.runs_per_s.append(rate)
        self.cpu_s_per_1k.append(cpu_s_per_1k)


def cpu_seconds(pids: Callable[[], list[int]]) -> float:
    """CPU seconds of ``pids`` (NaN without psutil: ``--peers ''`` needs only jetrun's deps)."""
    try:
        import psutil
    except ImportError:
        return float("nan")

    total = 0.0
    for pid in pids():
        try:
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def _cpu_times(pids: Callable[[], list[int]]) -> Iterator[tuple[int, str, float]]:
    """``(pid, label, CPU seconds)`` of each process of ``pids`` still there; none without
    psutil."""
    try:
        import psutil
    except ImportError:
        return
    for pid in pids():
        try:
            process = psutil.Process(pid)
            times, argv = process.cpu_times(), process.cmdline()
        except psutil.Error:
            continue
        yield pid, _label(argv), times.user + times.system


def cpu_by_process(pids: Callable[[], list[int]]) -> dict[str, float]:
    """CPU seconds of ``pids`` by what each runs (``jetrun up``'s children: nats-server,
    gateway, scheduler, agent, webhooks, worker); empty without psutil."""
    found: dict[str, float] = {}
    for _, label, seconds in _cpu_times(pids):
        found[label] = found.get(label, 0.0) + seconds
    return found


def cpu_of_each(pids: Callable[[], list[int]], label: str) -> dict[int, float]:
    """CPU seconds of each process of ``pids`` labelled ``label`` (each local agent)."""
    return {pid: seconds for pid, named, seconds in _cpu_times(pids) if named == label}


def calls_by_process(pids: Callable[[], list[int]]) -> dict[str, tuple[int, int]]:
    """Read and write system calls of ``pids`` by what each runs (as ``cpu_by_process``).
    Sampling profilers count a thread preempted inside write() as busy there: this says how
    many writes there really were."""
    try:
        import psutil
    except ImportError:
        return {}

    found: dict[str, tuple[int, int]] = {}
    for pid in pids():
        try:
            process = psutil.Process(pid)
            io, argv = process.io_counters(), process.cmdline()
        except (psutil.Error, AttributeError):
            continue
        label = _label(argv)
        reads, writes = found.get(label, (0, 0))
        found[label] = reads + io.read_count, writes + io.write_count
    return found


def _label(argv: list[str]) -> str:
    text = " ".join(argv)
    if "nats-server" in text:
        return "nats-server"
    if "worker_process" in text:
        return "worker"
    for name in ("gateway", "scheduler", "recorder", "agent", "webhooks", "up"):
        if f" {name}" in text:
            return name
    return "other"


def tree(pid: int) -> Callable[[], list[int]]:
    import psutil

    def pids() -> list[int]:
        try:
            root = psutil.Process(pid)
            return [pid, *(p.pid for p in root.children(recursive=True))]
        except psutil.Error:
            return []

    return pids


# ---- jetrun ---------------------------------------------------------------------------------


class Jetrun:
    name = "jetrun"

    def __init__(
        self,
        tmp: Path,
        slots: int,
        nats_sync: str | None,
        wrk_seconds: int,
        gateways: int | None = None,
        queue_depth: int | None = None,
        dedicated_gateways: bool = False,
        agents: int | None = None,
        followers: int = 0,
    ) -> None:
        self.tmp, self.wrk_seconds = tmp, wrk_seconds
        self.followers: list[subprocess.Popen[bytes]] = []
        (tmp / "jetrun.toml").write_text(bench_runs.CONFIG)
        port, self.nats_port, monitor_port = free_port(), free_port(), free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.monitor_url = f"http://127.0.0.1:{monitor_port}"
        argv = [str(Path(sys.executable).parent / "jetrun"), "up", "--port", str(port)]
        argv += ["--nats-port", str(self.nats_port), "--data-dir", str(tmp / "data")]
        argv += ["--nats-monitor-port", str(monitor_port)]
        argv += ["--config", str(tmp / "jetrun.toml"), "--slots", str(slots)]
        if nats_sync:
            argv += ["--nats-sync", nats_sync]
        if gateways:
            argv += ["--gateways", str(gateways)]
        if dedicated_gateways:
            argv += ["--dedicated-gateways"]
        if queue_depth is not None:
            argv += ["--queue-depth", str(queue_depth)]
        if agents is not None:
            argv += ["--agents", str(agents)]
        with open(tmp / "up.log", "wb") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        # the sync runs are echo runs, the throughput runs no-ops: both must be ready
        anyio.run(bench_runs.wait_ready, self.url, ("demo/noop:v1", "demo/echo:v1"))
        self.client = httpx.Client(
            base_url=self.url, headers={"Authorization": "Bearer bench"}, timeout=30
        )
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.sync_ids: list[str] = []  # the runs of sync_run, in order (bench_stages)
        self.sync_at: list[tuple[float, float]] = []  # their wall clock: sent, answer read
        self.phase: bench_runs.WrkPhase | None = None  # the last throughput phase
        for _ in range(followers):
            self.followers.append(self._follower())

    def _follower(self) -> subprocess.Popen[bytes]:
        """A ``jetrun gateway`` on a port no client uses: what following the log costs one
        gateway process (its CPU is shown apart, not in jetrun's)."""
        from runtime.up_children import agent_env

        port = free_port()
        argv = [str(Path(sys.executable).parent / "jetrun"), "gateway", "--host", "127.0.0.1"]
        argv += ["--port", str(port), "--config", str(self.tmp / "jetrun.toml")]
        nats_url, _ = self.nats()
        gateway = bench_runs.Credentials.from_dir(self.tmp / "data" / "credentials", "gateway")
        with open(self.tmp / f"follower-{port}.log", "wb") as log:
            proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=agent_env(nats_url, gateway)
            )
        for _ in range(600):  # until it has caught up with the log
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                    return proc
            time.sleep(0.1)
        proc.kill()
        proc.wait(30)
        raise TimeoutError("a follower gateway did not become ready")

    def follower_pids(self) -> list[int]:
        return [proc.pid for proc in self.followers]

    def sync_run(self) -> None:
        """One sync run over a kept-alive connection of the standard library's HTTP client
        (about 0.1 ms of client CPU per request here; httpx takes about 0.4: see httpx_p50_ms)."""
        sent = time.time()
        try:
            self.conn.request("POST", "/v4/runs", body=SYNC_BODY, headers=SYNC_HEADERS)
            response = self.conn.getresponse()
        except (ConnectionError, http.client.RemoteDisconnected):
            # the gateway closed the kept-alive connection while it sat idle between phases
            self.conn.close()
            sent = time.time()
            self.conn.request("POST", "/v4/runs", body=SYNC_BODY, headers=SYNC_HEADERS)
            response = self.conn.getresponse()
        body = response.read()
        read = time.time()
        run = json.loads(body)
        assert run["outputs"][0]["value"] == PAYLOAD, body
        self.sync_ids.append(run["id"])
        self.sync_at.append((sent, read))

    def httpx_p50_ms(self, n: int) -> float:
        """Sequential sync runs through an ``httpx.Client`` kept open (what the SDK uses)."""
        latencies = []
        for _ in range(n):
            start = time.perf_counter()
            response = self.client.post("/v4/runs", json=ECHO)
            latencies.append((time.perf_counter() - start) * 1000)
            assert response.json()["outputs"][0]["value"] == PAYLOAD, response.text
        return statistics.median(latencies)

    def sdk_p50_ms(self, n: int) -> float:
        """Sequential runs through the SDK's module-level ``run_pipeline`` (as the seed does)."""
        from runtime.clients import sdk

        latencies = []
        for _ in range(n):
            start = time.perf_counter()
            run = sdk.run_pipeline("demo/echo:v1", PAYLOAD, base_url=self.url, token="bench")
            latencies.append((time.perf_counter() - start) * 1000)
            assert run.outputs_formatted() == [PAYLOAD]
        return statistics.median(latencies)

    def throughput(self, runs: int) -> tuple[float, int]:
        del runs  # wrk runs for a fixed time; the count is what it submitted
        body = json.dumps({**ECHO, "async_run": True})
        bench_runs.POST_LUA = re.sub(
            r"wrk\.body = '.*'", lambda _: f"wrk.body = '{body}'", bench_runs.POST_LUA
        )
        nats_url = f"nats://127.0.0.1:{self.nats_port}"
        creds = bench_runs.Credentials.from_dir(self.tmp / "data" / "credentials", "service")
        self.phase = anyio.run(
            bench_runs.wrk_throughput, self.url, nats_url, self.wrk_seconds, 256, self.tmp, creds
        )
        # the outbox's CPU (and messages) for these runs are counted too
        anyio.run(nats_traffic.outbox_caught_up, nats_url, creds)
        return float("nan"), self.phase.runs  # the rate: end_to_end, once the CPU is counted

    def end_to_end(self) -> float:
        """The last throughput phase's runs/s from the first submit to the last run's end, as
        recorded in the events: read after the phase's CPU and messages are counted (the
        benchmark's reading is not jetrun's load)."""
        assert self.phase is not None
        return anyio.run(bench_runs.end_to_end, *self.nats(), self.phase)

    def pids(self) -> list[int]:
        return tree(self.proc.pid)()

    def nats(self) -> tuple[str, bench_runs.Credentials]:
        creds = bench_runs.Credentials.from_dir(self.tmp / "data" / "credentials", "service")
        return f"nats://127.0.0.1:{self.nats_port}", creds

    def next_seq(self) -> int:
        """The log's next sequence: where a phase begins."""
        return anyio.run(bench_stages.next_seq, *self.nats())

    def stage_lines(self, starts: list[int], latencies: list[float]) -> list[str]:
        """The stages of the sync phase's runs (the last ``len(latencies)`` of ``sync_run``)
        and of the throughput phase's, each read from its range of the log: ``starts`` is
        where the sync phase began, where the throughput phase began and where it ended."""
        sync, throughput, stop = starts
        timed = self.sync_ids[-len(latencies) :]
        client_s = dict(zip(timed, latencies, strict=True))
        client_at = dict(zip(timed, self.sync_at[-len(latencies) :], strict=True))

        async def read() -> list[str]:
            nats_url, creds = self.nats()
            return [
                *await bench_stages.phase_lines(
                    nats_url, creds, "jetrun sync", sync, throughput, client_s, client_at
                ),
                *await bench_stages.phase_lines(
                    nats_url, creds, "jetrun throughput", throughput, stop
                ),
            ]

        return anyio.run(read)

    def close(self) -> None:
        self.conn.close()
        self.client.close()
        for proc in self.followers:
            proc.terminate()
            proc.wait(30)
        self.proc.send_signal(2)
        self.proc.wait(60)


# ---- Ray ------------------------------------------------------------------------------------


class Ray:
    name = "Ray"

    def __init__(self) -> None:
        import ray

        self.ray = ray
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)

        @ray.remote
        def echo(value: str) -> str:
            return value

        self.echo = echo
        ray.get([echo.remote(PAYLOAD) for _ in range(200)])  # start the workers

    def sync_run(self) -> None:
        assert self.ray.get(self.echo.remote(PAYLOAD), timeout=30) == PAYLOAD

    def throughput(self, runs: int) -> tuple[float, int]:
        start = time.perf_counter()
        refs = [self.echo.remote(PAYLOAD) for _ in range(runs)]
        results = self.ray.get(refs, timeout=600)
        assert len(results) == runs
        return runs / (time.perf_counter() - start), runs

    def pids(self) -> list[int]:
        return tree(os.getpid())()  # the driver and the raylet, GCS and workers it started

    def close(self) -> None:
        self.ray.shutdown()


# ---- Celery + Redis -------------------------------------------------------------------------


class Celery:
    name = "Celery"

    def __init__(self, tmp: Path) -> None:
        port = free_port()
        self.redis = subprocess.Popen(
            [
                *("redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp)),
                *("--appendonly", "yes", "--appendfsync", "everysec", "--save", ""),
            ],
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        os.environ["PEERS_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
        import peers_celery

        self.app, self.echo = peers_celery.app, peers_celery.echo
        self.worker = subprocess.Popen(
            [
                *(sys.executable, "-m", "celery", "-A", "peers_celery", "worker", "-l", "WARNING"),
                *(f"--concurrency={os.cpu_count()}", "--without-gossip", "--without-mingle"),
            ],
            cwd=HERE,
            stdout=open(tmp / "celery.log", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                self.sync_run()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def sync_run(self) -> None:
        assert self.echo.delay(PAYLOAD).get(timeout=10) == PAYLOAD

    def throughput(self, runs: int) -> tuple[float, int]:
        start = time.perf_counter()
        pending = [self.echo.delay(PAYLOAD) for _ in range(runs)]
        for result in pending:
            assert result.get(timeout=600) == PAYLOAD
        return runs / (time.perf_counter() - start), runs

    def pids(self) -> list[int]:
        return [*tree(self.worker.pid)(), self.redis.pid]

    def close(self) -> None:
        self.worker.terminate()
        self.worker.wait(30)
        self.redis.terminate()
        self.redis.wait(30)


# ---- the run --------------------------------------------------------------------------------


def measure(system: Jetrun | Ray | Celery, sync: int, runs: int, into: Figures) -> None:
    for _ in range(20):
        system.sync_run()
    starts = [system.next_seq()] if isinstance(system, Jetrun) else []  # of each phase, in the log
    latencies = []
    for _ in range(sync):
        start = time.perf_counter()
        system.sync_run()
        latencies.append(time.perf_counter() - start)
    if isinstance(system, Jetrun):
        starts.append(system.next_seq())
    traffic = nats_traffic.snapshot(system.monitor_url) if isinstance(system, Jetrun) else None
    before, parts = cpu_seconds(system.pids), cpu_by_process(system.pids)
    calls = calls_by_process(system.pids)
    agents = cpu_of_each(system.pids, "agent")
    followed = cpu_seconds(system.follower_pids) if isinstance(system, Jetrun) else 0.0
    own = os.times()  # the benchmark's own process, and wrk (its child) once waited for
    rate, total = system.throughput(runs)
    used = cpu_seconds(system.pids) - before
    own_after = os.times()
    if isinstance(system, Jetrun):
        assert traffic is not None
        after = cpu_by_process(system.pids)
        calls_after = calls_by_process(system.pids)
        agents_after = cpu_of_each(system.pids, "agent")
        followed = cpu_seconds(system.follower_pids) - followed
        counted = nats_traffic.per_run(traffic, nats_traffic.snapshot(system.monitor_url), total)
        rate = system.end_to_end()  # its events are read now: after the counting
        starts.append(system.next_seq())  # where the throughput phase's runs end in the log
    into.add(latencies, rate, used / total * 1000)
    if isinstance(system, Jetrun):
        print("\n".join(f"  {line}" for line in counted.lines()), flush=True)
        shares = {k: (v - parts.get(k, 0.0)) / total * 1000 for k, v in after.items()}
        print(
            "  jetrun CPU s per 1k runs by process: "
            + ", ".join(f"{k} {v:.2f}" for k, v in sorted(shares.items(), key=lambda kv: -kv[1])),
            flush=True,
        )
        each = [(v - agents.get(pid, 0.0)) / total * 1000 for pid, v in agents_after.items()]
        if len(each) > 1:
            shown = ", ".join(f"{v:.3f}" for v in each)
            print(f"  jetrun CPU s per 1k runs of each agent: {shown}", flush=True)
        deltas = {
            k: ((r - calls.get(k, (0, 0))[0]) / total, (w - calls.get(k, (0, 0))[1]) / total)
            for k, (r, w) in calls_after.items()
        }
        print(
            "  system calls per run by process, read/write: "
            + ", ".join(f"{k} {r:.2f}/{w:.2f}" for k, (r, w) in sorted(deltas.items())),
            flush=True,
        )
        if system.followers:
            each = followed / len(system.followers) / total * 1000
            shown = f"{each:.3f}"
            print(f"  a gateway no client reaches (following the log), CPU s per 1k runs: {shown}")
        bench_s = own_after.user + own_after.system - own.user - own.system
        wrk_s = own_after.children_user + own_after.children_system
        wrk_s -= own.children_user + own.children_system
        print(
            f"  not counted, CPU s per 1k runs: the benchmark's process "
            f"{bench_s / total * 1000:.2f}, wrk {wrk_s / total * 1000:.2f}",
            flush=True,
        )
        print(f"  jetrun SDK run_pipeline() p50 {system.sdk_p50_ms(sync // 3):.2f} ms", flush=True)
        print(f"  jetrun httpx.Client p50 {system.httpx_p50_ms(sync // 3):.2f} ms", flush=True)
    print(
        f"  {system.name:7} p50 {into.p50_ms[-1]:6.2f} ms  p99 {into.p99_ms[-1]:6.2f} ms  "
        f"{rate:6.0f} runs/s ({total} runs)  {used / total * 1000:5.2f} CPU s per 1k runs",
        flush=True,
    )
    if isinstance(system, Jetrun):  # every measurement of the round is over: reading is free
        lines = system.stage_lines(starts, latencies)
        print("\n".join(f"  {line}" for line in lines), flush=True)


@contextmanager
def systems(args: argparse.Namespace, tmp: Path) -> Iterator[list[Jetrun | Ray | Celery]]:
    started: list[Jetrun | Ray | Celery] = []
    try:
        started.append(
            Jetrun(
                tmp,
                args.slots,
                args.nats_sync,
                args.wrk_seconds,
                args.gateways,
                args.queue_depth,
                args.dedicated_gateways,
                args.agents,
                args.followers,
            )
        )
        if "ray" in args.peers:
            started.append(Ray())
        if "celery" in args.peers:
            started.append(Celery(tmp))
        yield started
    finally:
        for system in reversed(started):
            system.close()


def report(figures: dict[str, Figures]) -> None:
    med = statistics.median
    print("\nmedians over the rounds:")
    print(f"  {'system':8} {'sync p50':>9} {'sync p99':>9} {'runs/s':>8} {'CPU s/1k':>9}")
    for name, f in figures.items():
        print(
            f"  {name:8} {med(f.p50_ms):7.2f}ms {med(f.p99_ms):7.2f}ms "
            f"{med(f.runs_per_s):8.0f} {med(f.cpu_s_per_1k):9.2f}"
        )
    ours = figures["jetrun"]
    for name, f in figures.items():
        if name != "jetrun":
            print(
                f"  jetrun / {name}: throughput {med(ours.runs_per_s) / med(f.runs_per_s):.2f}x,"
                f" sync p50 {med(ours.p50_ms) / med(f.p50_ms):.2f}x,"
                f" sync p99 {med(ours.p99_ms) / med(f.p99_ms):.2f}x"
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5000, help="runs per throughput round (peers)")
    parser.add_argument("--wrk-seconds", type=int, default=3, help="jetrun's submit window")
    parser.add_argument("--sync", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument(
        "--queue-depth", type=int, default=None, help="agents' queue depth (default: jetrun up's)"
    )
    parser.add_argument("--nats-sync", default=None, help="nats-server sync_interval, or always")
    parser.add_argument("--gateways", type=int, default=None, help="default: jetrun up's")
    parser.add_argument(
        "--dedicated-gateways",
        action="store_true",
        help="jetrun up --dedicated-gateways: its own event loop serves no connection",
    )
    parser.add_argument(
        "--agents", type=int, default=None, help="jetrun up's local agents, --slots each"
    )
    parser.add_argument(
        "--followers",
        type=int,
        default=0,
        help="also run this many gateway processes no client reaches: their CPU per run is "
        "what following the log costs each gateway (shown apart, not in jetrun's)",
    )
    parser.add_argument("--peers", default="ray,celery", help="'' measures jetrun alone")
    args = parser.parse_args()
    for tool in ("wrk", "redis-server") if "celery" in args.peers else ("wrk",):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed (apt-get install wrk redis-server)")
    print(
        f"machine: {platform.machine()}, {len(os.sched_getaffinity(0))} of {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.2f}, Python {platform.python_version()}"
    )
    print(f"jetrun durability: nats-server sync {args.nats_sync or 'default (every 2 min)'}")
    dedicated = ", dedicated (up serves none)" if args.dedicated_gateways else ""
    picked = "jetrun up default (1 below 8 cores, 2 dedicated from 8, 3 from 12)"
    print(f"jetrun gateways: {args.gateways or picked}{dedicated}")
    agents = args.agents or "jetrun up default (1 below 8 cores, else 1 per 7 cores)"
    print(f"jetrun local agents: {agents}, {args.slots} CPU slots each")
    tmp = Path(tempfile.mkdtemp(prefix="jetrun-peers-"))
    with systems(args, tmp) as started:
        figures = {system.name: Figures() for system in started}
        for round_ in range(1, args.rounds + 1):
            print(f"round {round_}:", flush=True)
            for system in started:
                measure(system, args.sync, args.runs, figures[system.name])
    report(figures)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
