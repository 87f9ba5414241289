"""One worker process serving no-op attempts one after another, without NATS or an agent:
wall time, the worker's CPU and the caller's CPU per attempt (the worker's side of an attempt:
its fresh stdout and stderr pipes, the request and reply frames, the routing of its output).

    python benchmarks/bench_worker.py --runs 3000 --rounds 3

The worker's CPU is read from /proc in clock ticks (10 ms): over 3,000 attempts, a 3.3 us step.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

from runtime.infra.capture import LogCapture
from runtime.node.worker import PipelineWorker


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    async with PipelineWorker("runtime.node.demo", "demo/noop:v1") as worker:
        for _ in range(200):  # warm up
            await worker.run([], output=LogCapture(time.time))
        pid = worker.pid
        assert pid is not None
        for round_ in range(args.rounds):
            worker_before, ours_before = cpu_s(pid), time.process_time()
            started = time.perf_counter()
            for _ in range(args.runs):
                result = await worker.run([], output=LogCapture(time.time))
                assert result.ok, result
            wall = (time.perf_counter() - started) / args.runs * 1e6
            worker_us = (cpu_s(pid) - worker_before) / args.runs * 1e6
            ours_us = (time.process_time() - ours_before) / args.runs * 1e6
            print(
                f"round {round_}: {wall:.1f} us per attempt, worker CPU {worker_us:.1f} us, "
                f"caller CPU {ours_us:.1f} us"
            )


if __name__ == "__main__":
    asyncio.run(main())
