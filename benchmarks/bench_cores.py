"""How jetrun's runs/s grows with the cores it has: ``bench_peers.py --peers ''`` (jetrun alone)
once per core count, with jetrun (``jetrun up`` and everything it starts) pinned to that many
cores by ``taskset`` and wrk, the load generator, pinned to cores of its own.

    python benchmarks/bench_cores.py [--cores 2,4,8,14] [--loadgen-cpus 0,1] [--rounds 1]
        [--out DIR] [-- extra bench_peers.py arguments]

``jetrun up`` sizes itself from the cores it may run on (its CPU affinity), so each count runs
its defaults for that many cores; its local agents are ``jetrun up``'s default for the count
(``runtime.up_agents.default_agents``) unless ``--agents`` is given, and they share the cores'
worth of CPU slots: ``max(4, ceil(cores / agents))`` each (``--slots``, per agent, overrides), so
on 14 cores one agent of 14 and two of 7 compare at the same slots in all. At least 4 each:
an agent with fewer sends and receives smaller batches (2 agents x 2 slots 1.6-1.7 agent NATS
messages per run against 1.0-1.15 for 1 x 4 and 2 x 4 on 2 cores).
Needs Linux (``taskset``), wrk, and more cores than the load generator takes. Prints one line
per count: agents, slots per agent, runs/s, its ratio to the first count, sync p50/p99, CPU
seconds per 1,000 runs in all and by process; ``--out`` keeps each count's full output.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
from pathlib import Path

from runtime.up_agents import default_agents

HERE = Path(__file__).resolve().parent
MEDIANS = re.compile(r"^\s+jetrun\s+([\d.]+)ms\s+([\d.]+)ms\s+(\d+)\s+([\d.]+)\s*$", re.M)
BY_PROCESS = re.compile(r"jetrun CPU s per 1k runs by process: (.*)$", re.M)


def cpu_list(text: str) -> list[int]:
    """``"0,1"`` or ``"0-3,8"`` as a list of CPU numbers."""
    cpus: list[int] = []
    for part in filter(None, text.split(",")):
        first, _, last = part.partition("-")
        cpus += range(int(first), int(last or first) + 1)
    return cpus


def measure(
    cpus: list[int], slots: int, agents: int, args: argparse.Namespace, extra: list[str]
) -> str:
    """One bench_peers run of jetrun pinned to ``cpus``; returns its output."""
    argv = [
        "taskset", "-c", ",".join(map(str, cpus)),
        sys.executable, str(HERE / "bench_peers.py"), "--peers", "",
        "--rounds", str(args.rounds), "--runs", "3000", "--sync", str(args.sync),
        "--slots", str(slots), "--agents", str(agents), *extra,
    ]  # fmt: skip
    env = {**os.environ, "JETRUN_BENCH_LOADGEN_CPUS": args.loadgen_cpus}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    return done.stdout + done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cores", default="", help="core counts, e.g. 2,4,8 (default: 2 and all)")
    parser.add_argument("--loadgen-cpus", default="0,1", help="wrk's cores (taskset list)")
    parser.add_argument(
        "--slots", type=int, default=None, help="per agent (default: max(4, ceil(cores / agents)))"
    )
    parser.add_argument("--agents", type=int, default=None, help="default: jetrun up's")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--sync", type=int, default=100)
    parser.add_argument("--out", type=Path, default=None, help="keep each run's output here")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    given = argparse.ArgumentParser(add_help=False)
    given.add_argument("--agents", type=int, default=None)  # also taken after ``--``
    later, extra = given.parse_known_args(extra)
    args.agents = args.agents or later.agents
    loadgen = set(cpu_list(args.loadgen_cpus))
    free = [c for c in sorted(os.sched_getaffinity(0)) if c not in loadgen]
    counts = [int(c) for c in args.cores.split(",") if c] or sorted({min(2, len(free)), len(free)})
    if not free or max(counts) > len(free):
        sys.exit(f"{len(free)} cores left beside the load generator's; asked for {max(counts)}")
    print(f"load generator (wrk) on cores {args.loadgen_cpus}; {len(free)} cores for jetrun")
    print(f"{'cores':>5} {'agents':>6} {'slots':>5} {'runs/s':>7} {'ratio':>6} {'p50 ms':>7}"
          f" {'p99 ms':>7} {'CPU s/1k':>8}  by process")  # fmt: skip
    first = 0.0
    for count in counts:
        agents = args.agents or default_agents(count)
        slots = args.slots or max(4, math.ceil(count / agents))
        out = measure(free[:count], slots, agents, args, extra)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"cores-{count}.txt").write_text(out)
        found, by_process = MEDIANS.search(out), BY_PROCESS.findall(out)
        if not found:
            print(f"{count:>5} {agents:>6} {slots:>5}  failed:\n{out[-3000:]}")
            continue
        p50, p99, rate, cpu = (float(g) for g in found.groups())
        first = first or rate
        print(f"{count:>5} {agents:>6} {slots:>5} {rate:>7.0f} {rate / first:>5.2f}x {p50:>7.2f}"
              f" {p99:>7.2f} {cpu:>8.2f}  {by_process[-1] if by_process else ''}",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
