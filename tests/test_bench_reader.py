"""benchmarks/bench_reader.py runs against a real nats-server and prints both ways' figures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_reader.py"


def test_the_benchmark_prints_both_ways() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--blocks", "2", "--per-block", "5", "--busy", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["eager", "loop"]
    assert all("round trip p50" in line and "us per publish" in line for line in lines)
