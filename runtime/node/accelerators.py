"""What a node can run on: its GPUs (from ``nvidia-smi``) and its CPU slots."""

from __future__ import annotations

import logging
import shutil
import subprocess

import anyio.to_thread

from contracts.agents import Accelerator

log = logging.getLogger("jetrun.accelerators")
NVIDIA_SMI_ARGS = ["--query-gpu=name,memory.total", "--format=csv,noheader,nounits"]
NVIDIA_SMI_TIMEOUT_S = 5.0


def detect(cpu_slots: int, cpu_queue: int = 0) -> list[Accelerator]:
    """The node's GPUs, one slot each (identical ones grouped), then ``cpu_slots`` CPU slots
    with a queue of ``cpu_queue`` dispatches waiting for one.

    Blocks for up to 5 s while ``nvidia-smi`` runs. Never raises for a missing or failing
    ``nvidia-smi``: the node then reports CPU slots only (and logs a warning if it failed).
    """
    cpu = Accelerator(kind="cpu", model="cpu", slots=cpu_slots, queue=cpu_queue)
    return [*detect_gpus(), cpu]


async def detect_async(cpu_slots: int, cpu_queue: int = 0) -> list[Accelerator]:
    """``detect`` in a worker thread, for async callers."""
    return await anyio.to_thread.run_sync(detect, cpu_slots, cpu_queue)


def detect_gpus() -> list[Accelerator]:
    """The GPUs ``nvidia-smi`` reports; empty without it, or if it fails. Blocks up to 5 s."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return []
    try:
        done = subprocess.run(
            [binary, *NVIDIA_SMI_ARGS],
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_TIMEOUT_S,
            check=True,
        )
    except (OSError, subprocess.SubprocessError) as err:
        log.warning("nvidia-smi failed, reporting CPU slots only: %s", err)
        return []
    return parse_gpus(done.stdout)


def parse_gpus(text: str) -> list[Accelerator]:
    """Parse ``name, memory_mb`` lines (nvidia-smi's CSV, no header, no units); identical
    GPUs become one accelerator with ``slots`` = their count, in order of first appearance.
    Unreadable lines are skipped with a warning; unknown memory (``[N/A]``) gives None."""
    counts: dict[tuple[str, int | None], int] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        name, comma, memory = (part.strip() for part in line.rpartition(","))
        if not comma or not name:
            log.warning("ignoring unreadable nvidia-smi line %r", line)
            continue
        key = (name, int(memory) if memory.isdigit() else None)
        counts[key] = counts.get(key, 0) + 1
    return [
        Accelerator(kind="gpu", model=name, memory_mb=memory, slots=count)
        for (name, memory), count in counts.items()
    ]
