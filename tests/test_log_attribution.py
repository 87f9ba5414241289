"""What a worker prints between two attempts belongs to neither: a real worker process whose
pipeline prints from a thread after its run returned; the next attempt (maybe another team's
run of the same pipeline) must not get those lines in its logs."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest

from contracts.values import from_python
from runtime.infra.capture import LogCapture
from runtime.node.worker import PipelineWorker

pytestmark = pytest.mark.anyio

LOGS = str(Path(__file__).parent / "fixtures" / "log_pipelines.py")


async def test_output_printed_after_an_attempt_never_lands_in_the_next() -> None:
    async with PipelineWorker(LOGS, "test/late-print:v1") as worker:
        first, second = LogCapture(time.time), LogCapture(time.time)
        with anyio.fail_after(30):
            ok = await worker.run([from_python("team-a-secret"), from_python(0.3)], output=first)
            assert ok.ok, ok
            await anyio.sleep(0.6)  # the late line is printed between the attempts
            ok = await worker.run([from_python("team-b"), from_python(30.0)], output=second)
            assert ok.ok, ok
    assert [line.text for line in first.take()] == ["now: team-a-secret"]
    assert [line.text for line in second.take()] == ["now: team-b"]
