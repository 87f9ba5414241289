"""One NATS hop, read where its bytes arrive or one loop iteration later: sequential JetStream
publishes, each awaiting its ack, on one connection against a real nats-server.

    python benchmarks/bench_reader.py --blocks 40 --per-block 100 [--busy 10]

The connection is made as every jetrun process makes it (``nats_conn.connect``: its acks are
parsed in ``data_received``, ``runtime.infra.natsread``). Blocks of ``--per-block`` publishes
alternate between that way (``eager``) and nats-py's (``loop``: the ack parsed by the read-loop
task once the loop comes round to it), so both see the same load. ``--busy N`` keeps N other
tasks ready in the loop (each a little work per iteration), as a busy service's loop has:
nats-py's way waits behind them. Prints each way's median and mean round trip and this
process's CPU (user + system) per publish; nats-server's CPU is not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nats.js import api

from runtime.infra import jspub
from runtime.infra.natsparse import FastParser
from runtime.infra.natsserver import NatsServer


async def spin() -> None:
    while True:
        await asyncio.sleep(0)
        sum(range(200))  # a few microseconds of other work per loop iteration


async def main(blocks: int, per_block: int, busy: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-reader-") as tmp:
        async with NatsServer(store_dir=Path(tmp) / "nats", auth=False) as server:
            nc = await server.connect()
            await nc.jetstream().add_stream(api.StreamConfig(name="READER", subjects=["r.>"]))
            publisher = jspub.Publisher(nc)
            for _ in range(500):  # warm up
                await publisher.publish("r.x", b"x", None, 5)
            spinners = [asyncio.create_task(spin()) for _ in range(busy)]
            parser = nc._ps
            assert isinstance(parser, FastParser)
            takes = parser.takes
            took: dict[str, list[float]] = {"eager": [], "loop": []}
            cpu = dict.fromkeys(took, 0.0)
            for block in range(blocks):
                for way in ("eager", "loop") if block % 2 == 0 else ("loop", "eager"):
                    parser.takes = takes if way == "eager" else None  # None: never parsed here
                    started = time.process_time()
                    for _ in range(per_block):
                        at = time.perf_counter()
                        await publisher.publish("r.x", b"x", None, 5)
                        took[way].append((time.perf_counter() - at) * 1e6)
                    cpu[way] += time.process_time() - started
            for task in spinners:
                task.cancel()
            for way, times in took.items():
                print(
                    f"{way:5}  round trip p50 {statistics.median(times):7.1f} us  "
                    f"mean {statistics.fmean(times):7.1f} us  "
                    f"CPU {cpu[way] / len(times) * 1e6:6.1f} us per publish"
                )
            await nc.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=40)
    parser.add_argument("--per-block", type=int, default=100)
    parser.add_argument("--busy", type=int, default=0, help="other ready tasks in the loop")
    args = parser.parse_args()
    uvloop.run(main(args.blocks, args.per_block, args.busy))
