"""The agent's CPU per attempt in its own code, without NATS: ``Runner.run`` (what an agent runs
for each dispatch: slot, worker, ``started`` timer, log capture, report) on uvloop, ``--slots``
attempts at once, handed to long-lived tasks as the agent hands them.

    python benchmarks/bench_attempts.py [--slots 4] [--runs 20000] [--worker real|none]

The event log is a stand-in whose append and first try store at once (one loop step), so what
is counted is the agent's own code. ``--worker real``: the demo no-op pipeline in real worker
processes (the hop to the worker and back is counted: pipes, request, answer, its wake-ups);
``--worker none``: a stand-in worker that answers at once (one loop step), leaving the attempt
path alone. Prints this process's CPU (``time.process_time``) per attempt, three rounds, sorted:
a figure that a loaded machine moves far less than ``bench_agent.py``'s.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from contracts.agents import PipelineStatus
from contracts.events import Event, RunDispatched
from contracts.values import from_python
from runtime.infra.clock import SYSTEM_CLOCK
from runtime.infra.runlogs import LogFlusher
from runtime.node.attempts import Attempt, Pool, Reporter, Runner, Starts
from runtime.node.pipelines import load_module
from runtime.node.runners import Runners
from runtime.node.worker import PipelineWorker, WorkerResult

POINTER = "demo/noop:v1"


class StoredAtOnce:
    """What ``Reporter`` uses of ``EventLog``: every append stored in one loop step."""

    async def append(self, event: Event, **_: Any) -> None:
        await asyncio.sleep(0)

    async def send(self, event: Event, **_: Any) -> StoredAtOnce:
        return self

    async def ack(self) -> None:
        await asyncio.sleep(0)


class AnswersAtOnce:
    """A worker whose attempt ends in one loop step with one ``None`` output."""

    alive = True

    async def run(self, inputs: Any, on_output: Any = None, output: Any = None) -> WorkerResult:
        await asyncio.sleep(0)
        if output is not None:
            output.finish()
        return WorkerResult(outputs=[from_python(None)])


async def main(args: argparse.Namespace) -> None:
    spec = next(s for s in load_module("runtime.node.demo") if s.pointer == POINTER)
    pool = Pool(spec=spec, module="runtime.node.demo", status=PipelineStatus.ready)
    real: list[PipelineWorker] = []
    for _ in range(args.slots):
        if args.worker == "real":
            worker = PipelineWorker("runtime.node.demo", POINTER)
            await worker.start()
            real.append(worker)
            pool.idle.append(worker)
        else:
            pool.idle.append(AnswersAtOnce())  # type: ignore[arg-type]
    log = StoredAtOnce()
    reporter = Reporter(log)  # type: ignore[arg-type]
    runner = Runner(
        agent_id="agent-bench",
        pools={POINTER: pool},
        log=log,  # type: ignore[arg-type]
        logs=None,  # type: ignore[arg-type]  # the no-op pipeline prints nothing
        reporter=reporter,
        clock=SYSTEM_CLOCK,
        spawn=None,  # type: ignore[arg-type]  # every worker is started above
        max_event_bytes=lambda: 1 << 20,
        log_max_bytes=1 << 20,
        starts=Starts(reporter),
        flusher=LogFlusher(),
        cpu=anyio.Semaphore(args.slots, fast_acquire=True),
    )
    ended = anyio.Semaphore(0)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(runner.starts.run)
            tg.start_soon(runner.flusher.run)

            async def job(item: tuple[RunDispatched, Attempt]) -> None:
                await runner.run(*item, tg)
                ended.release()

            runners = Runners(tg, job)

            def dispatch(i: int) -> None:
                event = RunDispatched(
                    run_id=f"run_{i}",
                    at=time.time(),
                    attempt=1,
                    agent_id="agent-bench",
                    team="bench",
                    pipeline=POINTER,
                    inputs=[],
                )
                runners.start((event, Attempt(event.run_id, 1, anyio.CancelScope())))

            async def attempts(n: int) -> None:
                for i in range(n):
                    if i >= args.slots:
                        await ended.acquire()
                    dispatch(i)
                for _ in range(min(n, args.slots)):
                    await ended.acquire()

            await attempts(1000)  # warm up
            figures = []
            for _ in range(3):
                cpu, wall = time.process_time(), time.perf_counter()
                await attempts(args.runs)
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                figures.append((cpu / args.runs * 1e6, args.runs / wall))
            figures.sort()
            print(
                f"{args.worker} worker, {args.slots} slots: agent CPU "
                + " / ".join(f"{c:.1f}" for c, _ in figures)
                + f" us per attempt ({figures[1][1]:.0f} attempts/s)"
            )
            tg.cancel_scope.cancel()
    finally:
        for worker in real:
            await worker.kill()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--runs", type=int, default=20_000)
    parser.add_argument("--worker", choices=("real", "none"), default="real")
    args = parser.parse_args()
    anyio.run(main, args, backend="asyncio", backend_options={"use_uvloop": True})
