"""GPU detection against fake ``nvidia-smi`` scripts put first on PATH."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from contracts.agents import Accelerator
from runtime.node import accelerators
from runtime.node.accelerators import detect, detect_async, parse_gpus

CPU = Accelerator(kind="cpu", model="cpu", slots=4)


def fake_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> None:
    """Install an executable ``nvidia-smi`` shell script first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "nvidia-smi"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")


def test_gpus_are_reported_grouped_then_cpu_slots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = "NVIDIA H100 80GB HBM3, 81559\nNVIDIA H100 80GB HBM3, 81559\nNVIDIA L4, 23034\n"
    # the script checks it was asked the right question
    fake_nvidia_smi(
        tmp_path,
        monkeypatch,
        '[ "$1 $2" = "--query-gpu=name,memory.total --format=csv,noheader,nounits" ] || exit 9\n'
        f"printf '{output}'",
    )
    assert detect(4) == [
        Accelerator(kind="gpu", model="NVIDIA H100 80GB HBM3", memory_mb=81559, slots=2),
        Accelerator(kind="gpu", model="NVIDIA L4", memory_mb=23034, slots=1),
        CPU,
    ]


def test_without_nvidia_smi_only_cpu_slots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert detect(4) == [CPU]


def test_a_failing_nvidia_smi_gives_cpu_slots_and_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake_nvidia_smi(
        tmp_path, monkeypatch, "echo 'NVIDIA-SMI has failed: driver not loaded' >&2\nexit 9"
    )
    with caplog.at_level(logging.WARNING, logger="jetrun.accelerators"):
        assert detect(4) == [CPU]
    assert "nvidia-smi failed" in caplog.text


def test_a_hanging_nvidia_smi_times_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nvidia_smi(tmp_path, monkeypatch, "exec sleep 30")
    monkeypatch.setattr(accelerators, "NVIDIA_SMI_TIMEOUT_S", 0.2)
    assert detect(4) == [CPU]


@pytest.mark.anyio
async def test_detect_async_runs_in_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_nvidia_smi(tmp_path, monkeypatch, "echo 'NVIDIA A10G, 23028'")
    assert await detect_async(1) == [
        Accelerator(kind="gpu", model="NVIDIA A10G", memory_mb=23028, slots=1),
        Accelerator(kind="cpu", model="cpu", slots=1),
    ]


def test_parse_tolerates_unknown_memory_and_junk_lines(caplog: pytest.LogCaptureFixture) -> None:
    text = "Tesla T4, [N/A]\n\nno comma here\nA, B, 100\n"
    assert parse_gpus(text) == [
        Accelerator(kind="gpu", model="Tesla T4", memory_mb=None, slots=1),
        Accelerator(kind="gpu", model="A, B", memory_mb=100, slots=1),
    ]
    assert "no comma here" in caplog.text
