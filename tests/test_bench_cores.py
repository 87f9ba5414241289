"""bench_cores.py reads core lists and bench_peers' medians line as printed."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_cores


def test_cpu_lists_take_ranges_and_single_cpus() -> None:
    assert bench_cores.cpu_list("0,1") == [0, 1]
    assert bench_cores.cpu_list("2-5,8") == [2, 3, 4, 5, 8]
    assert bench_cores.cpu_list("") == []


def test_the_medians_line_of_bench_peers_is_found() -> None:
    out = (
        "  jetrun CPU s per 1k runs by process: up 0.54, nats-server 0.26\n"
        "medians over the rounds:\n"
        "  system    sync p50  sync p99   runs/s  CPU s/1k\n"
        "  jetrun      1.71ms    2.23ms     1435      1.14\n"
    )
    found = bench_cores.MEDIANS.search(out)
    assert found is not None
    assert found.groups() == ("1.71", "2.23", "1435", "1.14")
    assert bench_cores.BY_PROCESS.findall(out) == ["up 0.54, nats-server 0.26"]
