"""The pipeline ``bench_scaling.py`` deploys: autoscaled from zero, a short cold start."""

from __future__ import annotations

import os
import time

from contracts.scaling import ScalingSettings
from runtime.pipelines import pipeline

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
