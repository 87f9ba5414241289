"""Autoscaling on ``jetrun up`` with the local node provider, from zero replicas.

    python benchmarks/bench_scaling.py [--burst 200] [--max-replicas 4] [--cooldown 5]

The first agent of ``jetrun up`` has one CPU slot, held by ``bench/filler:v1``, so every replica
of ``bench/scaled:v1`` needs a node the local provider starts (after the boot delay); its
``startup()`` takes 0.5 s (benchmarks/scaling_pipelines.py). Figures:
- first request to a ready replica (and to the run's end), boot delay 0 s and 5 s: an async run
  with waiting against a pipeline scaled to zero;
- idle to scaled down: from the run's end to zero replicas (the cooldown), and to the added node
  stopped (the node cooldown after that);
- a burst of ``--burst`` async runs of 0.2 s: the most replicas seen against max_replicas, and
  how long the burst took.
Everything listens on 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
PIPELINES = Path(__file__).resolve().parent / "scaling_pipelines.py"
POINTER = "bench/scaled:v1"
TOKEN = "jr_demo_token"
CONFIG = """
[teams.demo]
tier = "startup"
tokens = ["jr_demo_token"]

[settings]
heartbeat_interval_s = 0.5
scale_tick_s = 0.2
node_cooldown_s = {node_cooldown}
max_nodes = {max_nodes}
resource_wait_timeout_s = 120
rate_limit_per_s = 0
"""


def free_port() -> int:
    sys.path.insert(0, str(ROOT))
    from runtime.infra.natsserver import free_port as pick

    return pick()


@contextmanager
def jetrun_up(
    tmp: Path, boot_delay: float, args: argparse.Namespace
) -> Iterator[tuple[httpx.Client, Path]]:
    config = tmp / "jetrun.toml"
    config.write_text(CONFIG.format(node_cooldown=args.node_cooldown, max_nodes=args.max_replicas))
    port = free_port()
    argv = [sys.executable, "-m", "runtime.cli", "up", "--port", str(port)]
    argv += ["--data-dir", str(tmp / f"data-{boot_delay:g}"), "--config", str(config)]
    argv += ["--pipelines", str(PIPELINES), "--slots", "1", "--node-slots", "1"]
    argv += ["--boot-delay", str(boot_delay)]
    env = dict(
        os.environ,
        JETRUN_BENCH_MAX_REPLICAS=str(args.max_replicas),
        JETRUN_BENCH_COOLDOWN_S=str(args.cooldown),
        PYTHONPATH=str(ROOT),
    )
    log_path = tmp / f"up-{boot_delay:g}.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120
        ) as client:
            wait(lambda: _scaling(client).get("autoscaled", False), 60, "pipeline deployed")
            filler = "/v4/pipelines/bench/filler:v1/scaling"
            wait(lambda: client.get(filler).json().get("current_replicas") == 1, 60, "filler")
            yield client, log_path
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _scaling(client: httpx.Client) -> dict[str, Any]:
    try:
        body = client.get(f"/v4/pipelines/{POINTER}/scaling").json()
    except httpx.TransportError:
        return {}
    return body if isinstance(body, dict) else {}


def wait(done: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> float:
    """Poll ``done`` until true; returns the seconds it took. Raises after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if done():
            return time.monotonic() - start
        time.sleep(every)
    raise TimeoutError(f"{what}: not within {timeout} s")


def submit(client: httpx.Client, seconds: float) -> str:
    body = {"pipeline": POINTER, "inputs": [{"type": "fp", "value": seconds}], "async_run": True}
    response = client.post("/v4/runs", json=body)
    response.raise_for_status()
    return str(response.json()["id"])


def ended(client: httpx.Client, run_id: str) -> bool:
    state = client.get(f"/v4/runs/{run_id}").json()["state"]
    if state in ("failed", "no_resources_available", "node_preempted", "cancelled"):
        raise RuntimeError(f"run {run_id} ended {state}")
    return state == "completed"


def cold_start(client: httpx.Client, log: Path) -> dict[str, float]:
    start = time.monotonic()
    run_id = submit(client, 0.0)
    ready = wait(lambda: _scaling(client).get("current_replicas", 0) >= 1, 120, "ready replica")
    wait(lambda: ended(client, run_id), 120, "first run")
    finished = time.monotonic()
    wait(lambda: not _scaling(client).get("replicas", [1]), 120, "scaled to zero")
    to_zero = time.monotonic() - finished
    nats = re.search(r"embedded nats-server at (\S+),", log.read_text(errors="replace"))
    assert nats is not None, "no NATS URL in the jetrun up banner"
    wait(lambda: not _node_agents(nats.group(1)), 120, "added node stopped")
    return {
        "to_ready_s": ready,
        "to_completed_s": finished - start,
        "idle_to_zero_s": to_zero,
        "idle_to_node_stopped_s": time.monotonic() - finished,
    }


def _node_agents(nats_url: str) -> list[str]:
    """Agents the local provider of this ``jetrun up`` (its NATS URL) still runs."""
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=False)
    return [
        line
        for line in out.stdout.splitlines()
        if " agent " in line and "--id node-" in line and nats_url in line
    ]


def burst(client: httpx.Client, n: int) -> dict[str, float]:
    start = time.monotonic()
    run_ids = [submit(client, 0.2) for _ in range(n)]
    most = 0
    deadline = time.monotonic() + 300
    pending = list(run_ids)
    while pending and time.monotonic() < deadline:
        most = max(most, _scaling(client).get("current_replicas", 0))
        pending = [r for r in pending if not ended(client, r)]
        time.sleep(0.1)
    if pending:
        raise TimeoutError(f"{len(pending)} burst runs not done in 300 s")
    took = time.monotonic() - start
    history = client.get(f"/v4/pipelines/{POINTER}/scaling/history").json()["events"]
    loads = sum(1 for e in history if e["event"] == "replica_load")
    return {"most_ready_replicas": most, "replica_loads": loads, "burst_s": took}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--max-replicas", type=int, default=4)
    parser.add_argument("--cooldown", type=float, default=5.0)
    parser.add_argument("--node-cooldown", type=float, default=5.0)
    args = parser.parse_args()
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="jetrun-bench-scaling-") as tmp:
        for boot in (0.0, 5.0):
            with jetrun_up(Path(tmp), boot, args) as (client, log):
                figures = cold_start(client, log)
                rows.append(
                    (
                        f"first request -> ready replica, boot delay {boot:g} s",
                        f"{figures['to_ready_s']:.2f} s",
                    )
                )
                rows.append(
                    (
                        f"first request -> run completed, boot delay {boot:g} s",
                        f"{figures['to_completed_s']:.2f} s",
                    )
                )
                if boot == 0.0:
                    rows.append(
                        (
                            f"run ended -> zero replicas (cooldown {args.cooldown:g} s)",
                            f"{figures['idle_to_zero_s']:.2f} s",
                        )
                    )
                    rows.append(
                        (
                            f"run ended -> added node stopped (node cooldown "
                            f"{args.node_cooldown:g} s)",
                            f"{figures['idle_to_node_stopped_s']:.2f} s",
                        )
                    )
                    b = burst(client, args.burst)
                    rows.append(
                        (
                            f"burst of {args.burst} runs of 0.2 s: most ready replicas "
                            f"(max_replicas {args.max_replicas})",
                            f"{b['most_ready_replicas']:.0f}",
                        )
                    )
                    rows.append(
                        (
                            "  replica loads decided (the cold start's and the burst's)",
                            f"{b['replica_loads']:.0f}",
                        )
                    )
                    rows.append(
                        ("  burst, first submit -> last run completed", f"{b['burst_s']:.2f} s")
                    )
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
