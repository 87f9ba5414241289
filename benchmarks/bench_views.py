"""Client CPU per run view stored, in one process against a real nats-server.

    python benchmarks/bench_views.py --views 4000 --batch 24 --rounds 3

Two ways, each ``--views`` ended runs' views in rounds of ``--batch`` (about what the
scheduler's keeper stores at once: the runs that end within ``VIEW_BATCH_S``): ``tasks`` puts
each with ``RunViews.put`` in a task of its own (at most 64 in flight), ``together`` stores a
round with ``RunViews.put_all`` (one task sends them all, then reads their acks). Prints this
process's CPU (user + system) per view in microseconds; nats-server's is not counted. For a
figure load does not move, run it under ``valgrind --tool=callgrind`` for two values of
``--views`` (see bench_append.py).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from contracts.run import RunRecord
from contracts.states import RunState
from contracts.values import RunIO
from runtime.control.views import RunViews
from runtime.infra.config import Config
from runtime.infra.eventlog import LogSettings
from runtime.infra.natsserver import NatsServer
from runtime.provision import provision

Way = Callable[[RunViews, list[RunRecord]], Awaitable[None]]


def view(i: int, tag: str) -> RunRecord:
    return RunRecord(
        id=f"{tag}{i:08d}",
        state=RunState.completed,
        team="bench",
        pipeline="demo/noop:v1",
        inputs=[RunIO(type="string", value="x")],
        created_at=1.0,
        updated_at=2.0,
        attempt=1,
    )


async def tasks(views: RunViews, runs: list[RunRecord]) -> None:
    limiter = anyio.CapacityLimiter(64)

    async def store(run: RunRecord) -> None:
        async with limiter:
            await views.put(run)

    async with anyio.create_task_group() as tg:
        for run in runs:
            tg.start_soon(store, run)


async def together(views: RunViews, runs: list[RunRecord]) -> None:
    failed = [r for r in await views.put_all(runs) if r is not None]
    assert not failed, failed


WAYS: dict[str, Way] = {"tasks": tasks, "together": together}


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with NatsServer(store_dir=Path(tmp)) as server:
            nc = await server.connect("admin", "bench")
            await provision(nc, Config(tiers={}, teams={}), LogSettings())
            views = RunViews(nc.jetstream())
            await views.ensure()
            for r in range(args.rounds):
                for name in args.ways.split(","):
                    runs = [view(i, f"{name[0]}{r}x") for i in range(args.views)]
                    gc.collect()
                    cpu = time.process_time()
                    for start in range(0, len(runs), args.batch):
                        await WAYS[name](views, runs[start : start + args.batch])
                    cpu = time.process_time() - cpu
                    print(f"{name:9} {cpu / args.views * 1e6:7.1f} us CPU per view", flush=True)
            await nc.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--views", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ways", default="tasks,together")
    anyio.run(main, parser.parse_args())
