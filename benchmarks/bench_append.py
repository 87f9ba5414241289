"""Client CPU per event-log append, in one process against a real nats-server.

    python benchmarks/bench_append.py --appends 20000 --rounds 3 [--ways pipelined,fenced]

Three ways, each ``--appends`` events of distinct runs (so each is stored, not a duplicate):
``sequential`` awaits each append's ack before the next (``EventLog.append``), ``pipelined``
sends ``--window`` at a time and then awaits their acks (``EventLog.send``, one timer for the
window's acks: ``jspub.Expiry``; as the scheduler's ``append_all`` does), ``fenced`` is
``pipelined`` with the two fencing headers. Prints this
process's CPU (user + system, ``time.process_time``) per append in microseconds and appends per
second of wall time; nats-server's CPU is not counted. The CPU figure survives a loaded machine;
the wall figure does not. For a figure that load does not move at all, count instructions:
``valgrind --tool=callgrind --callgrind-out-file=/dev/null python benchmarks/bench_append.py
--appends N --rounds 1 --ways W`` for two values of N (nats-server is not traced); the difference
of the totals over the difference of N is the instructions per append.
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

from contracts.events import RunDispatched
from runtime.infra.eventlog import PUBLISH_TIMEOUT_S, EventLog, Fencing, LogSettings, event_subject
from runtime.infra.jspub import Expiry
from runtime.infra.natsserver import NatsServer

Way = Callable[[EventLog, int, str], Awaitable[None]]


def event(i: int, tag: str) -> RunDispatched:
    return RunDispatched(run_id=f"{tag}{i:08d}", at=time.time(), attempt=1, agent_id="agent-1")


async def sequential(log: EventLog, n: int, tag: str) -> None:
    for i in range(n):
        await log.append(event(i, tag))


async def pipelined(log: EventLog, n: int, tag: str, fenced: bool = False) -> None:
    window = ARGS.window
    for start in range(0, n, window):
        pending = []
        expiry = Expiry(PUBLISH_TIMEOUT_S)  # one timer per window, as append_all has
        for i in range(start, min(start + window, n)):
            e = event(i, tag)
            fencing = Fencing(event_subject(e.run_id, "x"), 0) if fenced else None
            pending.append(await log.send(e, fencing=fencing, expiry=expiry))
        for p in pending:
            await p.ack()
        expiry.cancel()


async def fenced(log: EventLog, n: int, tag: str) -> None:
    await pipelined(log, n, tag, fenced=True)


WAYS: dict[str, Way] = {"sequential": sequential, "pipelined": pipelined, "fenced": fenced}


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with NatsServer(store_dir=Path(tmp)) as server:
            nc = await server.connect("admin", "bench")
            log = EventLog(nc, LogSettings())
            await log.ensure()
            await sequential(log, 500, "warm")
            for r in range(ARGS.rounds):
                for name in ARGS.ways.split(","):
                    way = WAYS[name]
                    gc.collect()
                    cpu, wall = time.process_time(), time.perf_counter()
                    await way(log, ARGS.appends, f"{name[0]}{r}x")
                    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                    print(
                        f"round {r} {name:10s} {cpu / ARGS.appends * 1e6:6.1f} CPU µs/append"
                        f"  {ARGS.appends / wall:8.0f} appends/s",
                        flush=True,
                    )
            await nc.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--appends", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--ways", default=",".join(WAYS), help="which, comma-separated")
    ARGS = parser.parse_args()
    anyio.run(main, backend_options={"use_uvloop": True})
