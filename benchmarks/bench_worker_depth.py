"""What workers and their caller spend per no-op attempt when each worker's next request is
already waiting (sent ``--depth`` deep) against one request at a time (``--depth 1``, what the
agent does), with ``--workers`` workers at once, as an agent's slots run them.

    python benchmarks/bench_worker_depth.py --workers 4 --runs 5000 --rounds 2

Speaks the worker protocol as ``PipelineWorker.run`` does (a fresh pair of output pipes with each
request, the answer read, the pipes read and closed), on uvloop as the agent runs, but sends a
worker its next request before the current one is answered: a worker that finds its next request
waiting does not block between attempts, nor is its caller woken once per answer. The agent does
not do this (an attempt waiting for a slot must be withdrawable until it starts); this measures
what it would save. CPU from /proc (workers: clock ticks, 10 ms) and ``time.process_time``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections import deque
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime.infra.capture import LogCapture
from runtime.node.worker import PipelineWorker
from runtime.node.worker_output import AttemptOutput
from runtime.node.worker_process import RunRequest, frame_bytes

REQUEST = frame_bytes(RunRequest(inputs=[]))


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drive(worker: PipelineWorker, runs: int, depth: int) -> None:
    """``runs`` attempts on ``worker``, up to ``depth`` requests sent and not yet answered."""
    channel = worker._channel
    assert channel is not None
    waiting: deque[AttemptOutput] = deque()
    for _ in range(runs):
        output = AttemptOutput(LogCapture(time.time), channel.loop)
        worker._send(REQUEST, output)
        waiting.append(output)
        if len(waiting) >= depth:
            await channel.receive()
            waiting.popleft().finish()
    while waiting:
        await channel.receive()
        waiting.popleft().finish()


async def main(args: argparse.Namespace) -> None:
    workers = [PipelineWorker("runtime.node.demo", "demo/noop:v1") for _ in range(args.workers)]
    for worker in workers:
        await worker.start()
    pids = [worker.pid for worker in workers if worker.pid is not None]
    try:
        for round_ in range(args.rounds):
            for depth in (1, args.depth):
                await asyncio.gather(*(drive(w, 200, depth) for w in workers))  # warm up
                before, ours = sum(map(cpu_s, pids)), time.process_time()
                started = time.perf_counter()
                await asyncio.gather(*(drive(w, args.runs, depth) for w in workers))
                n = args.runs * len(workers)
                print(
                    f"round {round_} depth {depth}: worker CPU "
                    f"{(sum(map(cpu_s, pids)) - before) / n * 1e6:.1f} us, caller CPU "
                    f"{(time.process_time() - ours) / n * 1e6:.1f} us per attempt, "
                    f"{n / (time.perf_counter() - started):.0f} attempts/s"
                )
    finally:
        for worker in workers:
            await worker.kill()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=2)
    uvloop.run(main(parser.parse_args()))
