"""CPU to fold one fleet change (a ``queue_waiting`` event) with a long queue, in one process.

    python benchmarks/bench_queue_wait.py [--queued 100000] [--changes 5]

Builds a ``RunIndex`` holding ``--queued`` runs queued in one pipeline (as every process that
tails the log holds them: gateways, scheduler, views), then applies ``--changes`` queue events
(what the queue waits for flips between ``cold_start`` and ``resources``, as a replica starts
loading and goes away) and prints the CPU (process time) of each, and of reading every queued
run afterwards (a full listing) and one run (GET). With ``--scheduler`` the scheduler's worklist
listens too. No NATS, no network: this isolates the fold.
"""

from __future__ import annotations

import argparse
import statistics
import time

from contracts import RunAdmitted, RunQueued, RunSubmitted
from contracts.events import QueueWaitChanged, queue_id
from contracts.states import WaitingFor
from runtime.infra.projection import RunIndex

PIPELINE = "acme/llm:v1"


def build(queued: int) -> tuple[RunIndex, int]:
    index = RunIndex()
    seq = 0
    for n in range(queued):
        run_id = f"run{n:07d}"
        for event in (
            RunSubmitted(run_id=run_id, at=1.0, team="acme", pipeline=PIPELINE, inputs=[]),
            RunAdmitted(run_id=run_id, at=1.0, tier="basic"),
            RunQueued(run_id=run_id, at=2.0, attempt=1, waiting_for=WaitingFor.resources),
        ):
            seq += 1
            index.apply(seq, event)
    return index, seq


def timed(fn: object) -> float:
    start = time.process_time()
    fn()  # type: ignore[operator]
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queued", type=int, default=100_000)
    parser.add_argument("--changes", type=int, default=5)
    parser.add_argument("--scheduler", action="store_true", help="feed a scheduler's worklist")
    args = parser.parse_args()
    index, seq = build(args.queued)
    if args.scheduler:
        from runtime.control.passes import Worklist

        work = Worklist()
        index.listen(lambda s, event, before, run: work.observe(s, event, run, 0.0))
        if hasattr(index, "listen_queue"):
            index.listen_queue(lambda s, event, queued: work.observe_queue(event, queued))
    costs = []
    for n in range(args.changes):
        seq += 1
        waiting = WaitingFor.cold_start if n % 2 == 0 else WaitingFor.resources
        event = QueueWaitChanged(
            run_id=queue_id(PIPELINE), at=10.0 + n, pipeline=PIPELINE, waiting_for=waiting
        )
        costs.append(timed(lambda: index.apply(seq, event)))  # noqa: B023
    ids = index.queued(PIPELINE)
    listing = timed(lambda: [index.records[r] for r in ids])
    one = timed(lambda: index.get(ids[-1]))
    assert index.records[ids[-1]].waiting_for is waiting
    print(
        f"{args.queued} queued, {args.changes} fleet changes: CPU per change"
        f" median {statistics.median(costs) * 1e3:.3f} ms, max {max(costs) * 1e3:.3f} ms;"
        f" reading every queued run {listing * 1e3:.0f} ms; one run {one * 1e6:.0f} us"
    )


if __name__ == "__main__":
    main()
