"""What a node can run on: its GPUs (from ``nvidia-smi``) and CPU slots."""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections import Counter

from contracts.agents import Accelerator

log = logging.getLogger("jetrun.accelerators")
QUERY = ["--query-gpu=name,memory.total", "--format=csv,noheader,nounits"]


def detect(cpu_slots: int) -> list[Accelerator]:
    """The GPUs ``nvidia-smi`` reports, one slot each (identical ones grouped), and
    ``cpu_slots`` CPU slots. Without ``nvidia-smi``, or if it fails, only the CPU slots."""
    return [*gpus(), Accelerator(kind="cpu", model="cpu", slots=cpu_slots)]


def gpus() -> list[Accelerator]:
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return []
    try:
        done = subprocess.run(
            [binary, *QUERY], capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError) as err:
        log.warning("nvidia-smi failed, using CPU slots only: %s", err)
        return []
    found: Counter[tuple[str, int | None]] = Counter()
    for line in done.stdout.splitlines():
        if not line.strip():
            continue
        name, _, memory = (part.strip() for part in line.rpartition(","))
        found[(name, int(memory) if memory.isdigit() else None)] += 1
    return [
        Accelerator(kind="gpu", model=name, memory_mb=memory, slots=count)
        for (name, memory), count in sorted(found.items(), key=lambda kv: kv[0][0])
    ]
