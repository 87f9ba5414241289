"""Startup and memory against history: N completed runs in the log, then a gateway and a
scheduler are started as processes and timed to ready, with their RSS, nats-server's RSS and
the store's size on disk; then Q runs wait in one queue and the scheduler's idle CPU is taken.

    python benchmarks/bench_history.py --runs 100000 --runs 1000000 --queued 100000 --queued 500000

The log is filled quickly and directly: each completed run is its 5 real events (submitted with
its admission, queued, dispatched, started, completed) and its stored view, published pipelined
to the streams (core publishes, counted back from the stream), plus the checkpoint the
scheduler would have written (the next sequence: nothing live). ``from 1`` rows start the same
processes with the checkpoint at sequence 1 (what every start did before checkpoints). Each
start prints the wall time to ready and the CPU the process used until then: on a loaded machine
the first grows with the load, the second does not.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import anyio
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from contracts.agents import PipelineInfo
from contracts.events import (
    AdmissionGrant,
    RunCompleted,
    RunDispatched,
    RunQueued,
    RunStarted,
    RunSubmitted,
    encode_event,
)
from contracts.machine import fold
from contracts.states import WaitingFor
from contracts.values import RunIO
from runtime.control.views import Checkpoint, RunViews, _encoder
from runtime.infra.catalog import Catalog
from runtime.infra.config import load
from runtime.infra.eventlog import EventLog, LogSettings, subject_of
from runtime.infra.natsserver import NatsServer, free_port
from runtime.infra.streams import EVENTS_STREAM, VIEWS_BUCKET, VIEWS_STREAM
from runtime.provision import provision

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = "bench/p:v1"
CONFIG = """
[teams.bench]
tier = "startup"
tokens = ["tok_bench"]
[settings]
resource_wait_timeout_s = 1000000
replay_deadline_s = 3600
"""
BATCH = 5_000


def history(i: int, at: float) -> list:
    run_id = f"r{i:08d}"
    return [
        RunSubmitted(
            run_id=run_id,
            at=at,
            team="bench",
            pipeline=PIPELINE,
            inputs=[RunIO(type="string", value="hello")],
            admission=AdmissionGrant(tier="startup"),
        ),
        RunQueued(run_id=run_id, at=at, attempt=1),
        RunDispatched(run_id=run_id, at=at + 0.1, attempt=1, agent_id="agent-1"),
        RunStarted(run_id=run_id, at=at + 0.1, attempt=1, agent_id="agent-1"),
        RunCompleted(
            run_id=run_id, at=at + 1, attempt=1, outputs=[RunIO(type="string", value="world")]
        ),
    ]


async def fill(nc, first: int, n: int, *, queued: bool = False) -> None:
    """Publish ``n`` runs' histories (and views), pipelined; waits until all are stored."""
    js = nc.jetstream(timeout=30)
    before_events = (await js.stream_info(EVENTS_STREAM)).state.messages
    before_views = (await js.stream_info(VIEWS_STREAM)).state.messages
    at = time.time() - 86_400
    expected_events = expected_views = 0
    for i in range(first, first + n):
        events = history(i, at)
        if queued:
            events = [
                events[0],
                RunQueued(
                    run_id=events[0].run_id, at=at, attempt=1, waiting_for=WaitingFor.resources
                ),
            ]
        for event in events:
            await nc.publish(subject_of(event), encode_event(event))
        expected_events += len(events)
        if not queued:
            view = fold(events, run_id=events[0].run_id)
            await nc.publish(f"$KV.{VIEWS_BUCKET}.run.{view.id}", _encoder.encode(view))
            expected_views += 1
        if (i - first) % BATCH == BATCH - 1:
            await nc.flush(timeout=60)
            await _wait_count(js, EVENTS_STREAM, before_events + expected_events, lag=50_000)
    await nc.flush(timeout=60)
    await _wait_count(js, EVENTS_STREAM, before_events + expected_events)
    await _wait_count(js, VIEWS_STREAM, before_views + expected_views)


async def _wait_count(js, stream: str, want: int, lag: int = 0) -> None:
    deadline = time.monotonic() + 300
    while (have := (await js.stream_info(stream)).state.messages) < want - lag:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{stream}: {have} of {want} messages stored (publishes dropped)")
        await anyio.sleep(0.05)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def cpu_share(pid: int, seconds: float) -> float:
    """The share of one core ``pid`` used over the next ``seconds``."""
    before, t = cpu_s(pid), time.monotonic()
    await anyio.sleep(seconds)
    return (cpu_s(pid) - before) / (time.monotonic() - t)


async def settle(pid: int, below: float = 0.05, limit_s: float = 600.0) -> float:
    """Seconds until ``pid`` uses less than ``below`` of a core over 5 s: a scheduler that
    has just taken the lead first writes what the directly filled log lacks (the runs' history
    entries, one per queued run); idle is measured after that."""
    t0 = time.monotonic()
    while await cpu_share(pid, 5.0) >= below and time.monotonic() - t0 < limit_s:
        pass
    return time.monotonic() - t0


def du_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


class Service:
    def __init__(self, kind: str, server: NatsServer, config: Path, logs: Path) -> None:
        url, seed = server.url, server.credentials(kind).seed_file
        self.port = free_port()
        args = (
            ["--port", str(self.port)] if kind == "gateway" else ["--health-port", str(self.port)]
        )
        self.log = open(logs / f"{kind}-{self.port}.log", "wb")  # noqa: SIM115
        self.started = time.monotonic()
        self.cpu_to_ready = float("nan")  # CPU seconds it used until ready (load does not add)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "runtime.cli",
                kind,
                "--nats",
                url,
                *(["--nats-seed", str(seed)] if seed is not None else []),
                "--config",
                str(config),
                *args,
            ],
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )

    async def ready_s(self, timeout: float = 900) -> float:
        """Seconds from spawn until its /readyz says the log is replayed."""
        async with httpx.AsyncClient() as http:
            while time.monotonic() - self.started < timeout:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"exited {self.proc.returncode}; see {self.log.name}")
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    body = (await http.get(f"http://127.0.0.1:{self.port}/readyz")).json()
                    if body.get("checks", {}).get("event_log_replayed"):
                        self.cpu_to_ready = cpu_s(self.proc.pid)
                        return time.monotonic() - self.started
                await anyio.sleep(0.05)
        raise TimeoutError(f"not ready in {timeout} s; see {self.log.name}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class Started(NamedTuple):
    ready_s: float  # from spawn to /readyz saying the log is replayed
    cpu_s: float  # CPU seconds it used until then (what the machine's load does not change)
    rss_mib: float


async def start_pair(server: NatsServer, config: Path, logs: Path) -> tuple[Started, Started]:
    """A gateway and a scheduler started at once, each timed on its own."""
    scheduler = Service("scheduler", server, config, logs)
    gateway = Service("gateway", server, config, logs)
    started: dict[str, Started] = {}

    async def time_ready(name: str, service: Service) -> None:
        ready = await service.ready_s()
        started[name] = Started(ready, service.cpu_to_ready, rss_mib(service.proc.pid))

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(time_ready, "scheduler", scheduler)
            tg.start_soon(time_ready, "gateway", gateway)
        return started["gateway"], started["scheduler"]
    finally:
        gateway.stop()
        scheduler.stop()


async def main(sizes: list[int], queued: list[int]) -> None:
    print(f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    with tempfile.TemporaryDirectory(prefix="bench-history-") as tmp:
        root = Path(tmp)
        config = root / "jetrun.toml"
        config.write_text(CONFIG)
        async with NatsServer(store_dir=root / "nats") as server:
            nc = await server.connect("admin")  # the admin step: every stream the services use
            await provision(nc, load(config), LogSettings())
            log = EventLog(nc)
            views = RunViews(log.js)
            await views.ensure()
            catalog = Catalog(log.js)
            await catalog.register(PipelineInfo(pointer=PIPELINE))
            print(
                f"{'runs':>9} {'start':>7} {'gateway ready (CPU)':>20} {'gw RSS':>8} "
                f"{'sched ready (CPU)':>20} {'sched RSS':>9} {'nats RSS':>9} {'disk':>8} "
                f"{'fill':>7} {'load':>5}"
            )
            done = 0
            for size in sorted(sizes):
                t0 = time.monotonic()
                await fill(nc, done, size - done)
                filled = time.monotonic() - t0
                done = size
                last = await log.last_seq()
                for label, replay_from in (("ckpt", last + 1), ("from 1", 1)):
                    if label == "from 1" and size > 100_000:
                        continue  # minutes per start: the table has these
                    await views.put_checkpoint(Checkpoint(replay_from=replay_from, seq=last, at=0))
                    g, s = await start_pair(server, config, root)
                    print(
                        f"{size:>9,} {label:>7} {g.ready_s:>9.2f} s ({g.cpu_s:>5.2f} s) "
                        f"{g.rss_mib:>4.0f} MiB {s.ready_s:>9.2f} s ({s.cpu_s:>5.2f} s) "
                        f"{s.rss_mib:>5.0f} MiB {rss_mib(server.pid or 0):>5.0f} MiB "
                        f"{du_mb(root / 'nats'):>5.0f} MB {filled:>5.0f} s "
                        f"{os.getloadavg()[0]:>5.1f}",
                        flush=True,
                    )
                await views.put_checkpoint(Checkpoint(replay_from=last + 1, seq=last, at=0))
            waiting = 0
            for depth in sorted(queued):  # queued runs of one pipeline, no replica
                await fill(nc, 10_000_000 + waiting, depth - waiting, queued=True)
                waiting = depth
                scheduler = Service("scheduler", server, config, root)
                try:
                    ready = await scheduler.ready_s()
                    settled = await settle(scheduler.proc.pid)
                    busy = await cpu_share(scheduler.proc.pid, 10.0)
                    print(
                        f"{depth:,} queued (no replica): scheduler ready in {ready:.2f} s "
                        f"(CPU {scheduler.cpu_to_ready:.2f} s), settled {settled:.0f} s later, "
                        f"RSS {rss_mib(scheduler.proc.pid):.0f} MiB, idle CPU {busy:.1%}, "
                        f"load {os.getloadavg()[0]:.1f}",
                        flush=True,
                    )
                finally:
                    scheduler.stop()
            await nc.close()


if __name__ == "__main__":
    import faulthandler

    faulthandler.dump_traceback_later(float(os.environ.get("BENCH_DEADLINE_S", "3600")), exit=True)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, action="append", default=[])
    parser.add_argument("--queued", type=int, action="append", default=[])
    args = parser.parse_args()
    anyio.run(main, args.runs or ([] if args.queued else [100_000]), args.queued)
