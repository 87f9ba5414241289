"""Cost of reading a queue position as the queue grows (the projection behind
``GET /v4/runs/{id}``): it must not grow linearly with the depth.

    python benchmarks/bench_queue.py

Fills one pipeline's queue in a ``RunIndex`` with up to 200,000 runs and times
``queue_position`` for runs at the head, middle and tail, and applying an event.
"""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from contracts.events import RunAdmitted, RunDispatched, RunQueued, RunSubmitted
from runtime.infra.projection import RunIndex


def fill(index: RunIndex, n: int) -> list[str]:
    ids = []
    for i in range(n):
        run_id = f"r{i}"
        for event in (
            RunSubmitted(run_id=run_id, at=1.0, team="t", pipeline="a/b:v1", inputs=[]),
            RunAdmitted(run_id=run_id, at=1.0, tier="pro"),
            RunQueued(run_id=run_id, at=1.0, attempt=1),
        ):
            index.apply(index.last_seq + 1, event)
        ids.append(run_id)
    return ids


def per_call_us(fn: object, args: list[str], repeat: int = 20_000) -> float:
    start = time.perf_counter()
    for i in range(repeat):
        fn(args[i % len(args)])  # type: ignore[operator]
    return (time.perf_counter() - start) / repeat * 1e6


def main() -> None:
    print(f"{platform.machine()}, Python {platform.python_version()}")
    print(f"{'queued runs':>12} {'position read':>14} {'apply (dispatch head)':>22}")
    for depth in (1_000, 10_000, 100_000, 200_000):
        index = RunIndex()
        ids = fill(index, depth)
        sample = [ids[0], ids[depth // 2], ids[-1]]
        read = per_call_us(index.queue_position, sample)
        assert index.queue_position(ids[-1]) == depth - 1
        start = time.perf_counter()
        for i in range(1000):
            index.apply(
                index.last_seq + 1,
                RunDispatched(run_id=ids[i], at=2.0, attempt=1, agent_id="a"),
            )
        apply_us = (time.perf_counter() - start) / 1000 * 1e6
        print(f"{depth:>12,} {read:>11.2f} µs {apply_us:>19.2f} µs")


if __name__ == "__main__":
    main()
