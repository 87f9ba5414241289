"""What a team's run history costs nats-server as it grows: the chain check of each block the
scheduler writes, and the reads of a team's newest and oldest entry.

    python benchmarks/bench_listing.py [--blocks 1000 --blocks 10000 --blocks 100000] [--calls 500]

``JETRUN_LISTING`` (its real config) gets one team's history, ``--blocks`` messages of 16
entries each on ``jetrun.listing.<team>.<n>`` (published pipelined, as the writer would have
over time). Then, each ``--calls`` times: a publish of the next block with no check;
``RunHistory.add_block`` (the writer's call: its publish expects the stream's last message,
``Nats-Expected-Last-Sequence``); the same block with an earlier release's check (the team's
newest message over ``jetrun.listing.<team>.>``); ``RunHistory.newest`` (a listing page's
first read, and the writer's ``top`` once per team and leadership: the last message on that
wildcard); ``RunHistory.oldest`` (the first one). Printed: wall time and nats-server CPU per
call (from /proc, in clock ticks: use enough calls). nats-server answers a wildcard's last (or
first) message by visiting every subject under it, so the earlier check and the two reads grow
with the number of blocks the team has. Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import anyio
import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runtime.control.history import BLOCK, Listed, RunHistory, Top, entry_subject  # noqa: E402
from runtime.infra.natsserver import NatsServer  # noqa: E402

TEAM = "bench"


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def block(first: int) -> list[Listed]:
    return [
        Listed(run_id=f"run_{n:012d}", pipeline="demo/noop:v1", created_at=1.0, seq=n)
        for n in range(first, first + BLOCK)
    ]


async def fill(history: RunHistory, upto: int, have: int) -> int:
    """Blocks ``have + 1 .. upto`` of the team, published pipelined; returns ``upto``."""
    payload = (
        b"["
        + b",".join([b'{"run_id":"run_x","pipeline":"p","created_at":1,"seq":1}'] * BLOCK)
        + b"]"
    )
    pending = []
    for k in range(have + 1, upto + 1):
        pending.append(await history.js.publish_async(entry_subject(TEAM, k * BLOCK), payload))
        if len(pending) >= 2000:
            for future in pending:
                with anyio.fail_after(60):
                    await future
            pending = []
    for future in pending:
        with anyio.fail_after(60):
            await future
    return upto


async def measure(server: NatsServer, history: RunHistory, calls: int) -> list[str]:
    """Each call ``calls`` times: wall and nats-server CPU per call. The writes go on from the
    team's top as the writer keeps it (read once, as the scheduler does)."""
    assert server.pid is not None
    top = await history.top(TEAM)

    async def unchecked() -> None:  # the same block and subject, without the chain check
        nonlocal top
        subject = entry_subject(TEAM, top.number + BLOCK)
        ack = await history.js.publish(subject, msgspec.json.encode(block(top.number + 1)))
        top = Top(top.number + BLOCK, top.seq, ack.seq)

    async def checked() -> None:
        nonlocal top
        stream_seq = await history.add_block(TEAM, top, block(top.number + 1), top.stream_seq)
        assert stream_seq is not None
        top = Top(top.number + BLOCK, top.seq, stream_seq)

    async def team_wide() -> None:  # an earlier release's check
        nonlocal top
        headers = {
            "Nats-Expected-Last-Subject-Sequence": str(top.stream_seq),
            "Nats-Expected-Last-Subject-Sequence-Subject": f"{entry_subject(TEAM, 0)[:-2]}.>",
        }
        subject = entry_subject(TEAM, top.number + BLOCK)
        payload = msgspec.json.encode(block(top.number + 1))
        ack = await history.js.publish(subject, payload, headers=headers)
        top = Top(top.number + BLOCK, top.seq, ack.seq)

    async def newest() -> None:
        assert await history.newest(TEAM) is not None

    async def oldest() -> None:
        assert await history.oldest(TEAM) is not None

    lines = []
    for what, call in (
        ("publish, no check", unchecked),
        ("add_block (chain check)", checked),
        ("team-wide check (before)", team_wide),
        ("newest (a page's first read)", newest),
        ("oldest", oldest),
    ):
        start, cpu = time.perf_counter(), cpu_s(server.pid)
        for _ in range(calls):
            await call()
        wall = (time.perf_counter() - start) / calls * 1e6
        used = (cpu_s(server.pid) - cpu) / calls * 1e6
        lines.append(f"  {what:30} {wall:8.0f} us wall, nats-server {used:6.0f} us CPU per call")
    return lines


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, action="append", default=None)
    parser.add_argument("--calls", type=int, default=500)
    args = parser.parse_args()
    sizes = sorted(args.blocks or [1_000, 10_000, 100_000])
    with tempfile.TemporaryDirectory(prefix="jetrun-listing-") as tmp:
        async with NatsServer(store_dir=Path(tmp) / "nats", auth=False) as server:
            nc = await server.connect("admin", "bench-listing")
            try:
                history = RunHistory(nc.jetstream(timeout=30))
                await history.ensure()
                have = 0
                for size in sizes:
                    have = await fill(history, size, have)
                    blocks = (await history.top(TEAM)).number // BLOCK
                    print(f"one team, {blocks} blocks of {BLOCK} runs:", flush=True)
                    print("\n".join(await measure(server, history, args.calls)), flush=True)
                    have = blocks
            finally:
                await nc.close()


if __name__ == "__main__":
    anyio.run(main)
