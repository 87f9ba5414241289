"""A GPU node, end to end through ``jetrun up``: detection, scale from zero, a cold start that
loads the GPU, warm latency, and scale back to zero with the GPU memory freed.

    python benchmarks/gpu_check.py        # on a machine with an NVIDIA GPU and PyTorch (CUDA)

Starts ``jetrun up`` with ``benchmarks/gpu_pipelines.py`` (``gpu/matmul:v1``: min_replicas 0,
cooldown 5 s, holds 16 GiB while loaded) in a temp dir on loopback, then prints what it saw.
Every wait is bounded; exits non-zero if a step does not hold.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from runtime.infra.natsserver import free_port  # noqa: E402

POINTER = "gpu/matmul:v1"
CONFIG = '[teams.bench]\ntier = "startup"\ntokens = ["bench"]\n'


def gpu_memory_used_mb() -> int:
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
        capture_output=True, text=True, check=True, timeout=10,
    )  # fmt: skip
    return sum(int(line) for line in out.stdout.split())


def wait_for(what: str, check: object, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():  # type: ignore[operator]
            return time.monotonic() - start
        time.sleep(0.1)
    raise SystemExit(f"FAILED: {what} within {timeout} s")


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="jetrun-gpu-"))
    (tmp / "jetrun.toml").write_text(CONFIG)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "runtime.cli", "up", "--port", str(port)]
    argv += ["--data-dir", str(tmp / "data"), "--config", str(tmp / "jetrun.toml")]
    argv += ["--pipelines", str(HERE / "gpu_pipelines.py")]
    baseline = gpu_memory_used_mb()
    print(f"GPU memory used before: {baseline} MiB")
    log = open(tmp / "up.log", "wb")  # noqa: SIM115
    path = os.environ.get("PYTHONPATH")
    env = dict(os.environ, PYTHONPATH=str(HERE.parent) + (os.pathsep + path if path else ""))
    up = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=HERE.parent)
    http = httpx.Client(base_url=url, headers={"Authorization": "Bearer bench"}, timeout=120)
    try:
        scaling = f"/v4/pipelines/{POINTER}/scaling"

        def answers() -> bool:
            try:
                return http.get(scaling).status_code == 200
            except httpx.TransportError:
                return False

        print(f"jetrun up answering after {wait_for('jetrun up', answers, 120):.1f} s")
        print("scaling at rest:", http.get(scaling).json())
        run = {"pipeline": POINTER, "inputs": [{"type": "integer", "value": 64}]}
        first = http.post("/v4/runs", json=run)
        print(f"no replica, wait_for_resources=false: HTTP {first.status_code}")
        start = time.monotonic()
        cold = http.post("/v4/runs", json={**run, "wait_for_resources": True})
        cold_s = time.monotonic() - start
        body = cold.json()
        print(f"cold run (waits for the replica): HTTP {cold.status_code} in {cold_s:.2f} s:")
        print("   ", body.get("state"), body.get("outputs"), body.get("error"))
        loaded = gpu_memory_used_mb()
        print(f"GPU memory used with the replica loaded: {loaded} MiB (+{loaded - baseline})")
        warm = []
        for _ in range(50):
            t = time.perf_counter()
            response = http.post("/v4/runs", json=run)
            warm.append((time.perf_counter() - t) * 1000)
            assert response.json()["state"] == "completed", response.text
        print(f"warm sync runs: p50 {statistics.median(warm):.2f} ms, max {max(warm):.2f} ms")
        print("scaling while loaded:", http.get(scaling).json())

        def scaled_to_zero() -> bool:
            return http.get(scaling).json()["current_replicas"] == 0

        idle_s = wait_for("scale to zero", scaled_to_zero, 120)
        freed = wait_for("GPU memory freed", lambda: gpu_memory_used_mb() < baseline + 1024, 60)
        print(f"scaled to zero {idle_s:.1f} s after the last run (cooldown 5 s); GPU memory back")
        print(f"  to {gpu_memory_used_mb()} MiB {freed:.1f} s later")
        ok = first.status_code == 503 and body.get("state") == "completed"
        ok = ok and "H" in str(body.get("outputs")) and loaded > baseline + 8000
        print("RESULT:", "ok" if ok else "FAILED")
        if not ok:
            sys.exit(1)
    finally:
        http.close()
        up.send_signal(signal.SIGINT)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
        print("--- jetrun up log (tail) ---")
        print("\n".join((tmp / "up.log").read_text(errors="replace").splitlines()[-25:]))


if __name__ == "__main__":
    main()
