"""The pipelines ``bench_scaling.py`` serves: ``bench/scaled:v1``, autoscaled from zero with a
short cold start, and ``bench/filler:v1``, one replica kept loaded that fills the first agent's
only slot, so every replica of ``bench/scaled:v1`` needs a node the provider adds."""

from __future__ import annotations

import os
import time

from contracts.scaling import ScalingSettings
from runtime.node.pipelines import pipeline

STARTUP_S = float(os.environ.get("JETRUN_BENCH_STARTUP_S", "0.5"))
MAX_REPLICAS = int(os.environ.get("JETRUN_BENCH_MAX_REPLICAS", "4"))
COOLDOWN_S = float(os.environ.get("JETRUN_BENCH_COOLDOWN_S", "5"))


@pipeline(
    "bench/scaled:v1",
    scaling=ScalingSettings(min_replicas=0, max_replicas=MAX_REPLICAS, cooldown_s=COOLDOWN_S),
)
class Scaled:
    def startup(self) -> None:
        time.sleep(STARTUP_S)

    def run(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds


@pipeline("bench/filler:v1", scaling=ScalingSettings(min_replicas=1, max_replicas=1))
def filler() -> None:
    """Only holds a slot."""
