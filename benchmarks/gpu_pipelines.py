"""A GPU pipeline for ``benchmarks/gpu_check.py``: a bf16 matrix product on the GPU, scaled to
zero when idle. Its replica holds ``HOLD_GB`` of GPU memory so that loading and unloading show
in ``nvidia-smi``. Needs PyTorch with CUDA."""

from __future__ import annotations

import os

from contracts.scaling import ScalingSettings
from runtime.node.pipelines import pipeline

HOLD_GB = 16
SIZE = 8192


@pipeline(
    "gpu/matmul:v1",
    accelerator="gpu",
    gpu_memory_mb=HOLD_GB * 1024 + 2048,
    scaling=ScalingSettings(min_replicas=0, max_replicas=1, cooldown_s=5),
)
class MatMul:
    def startup(self) -> None:
        import torch

        self.torch = torch
        self.weights = torch.randn(SIZE, SIZE, device="cuda", dtype=torch.bfloat16)
        self.held = torch.empty(HOLD_GB * 2**30, dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()

    def run(self, rows: int) -> str:
        torch = self.torch
        x = torch.randn(rows, SIZE, device="cuda", dtype=torch.bfloat16)
        norm = float((x @ self.weights).float().norm())
        return (
            f"{torch.cuda.get_device_name(0)} CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES')} norm={norm:.1f}"
        )
