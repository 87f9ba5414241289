"""The throughput benchmarks' observer (benchmarks/run_ends.py) against a real nats-server:
the counts nats-server keeps say when every run ended, and the runs/s is read from the
events' own timestamps afterwards."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from contracts.events import RunCompleted, RunSubmitted, RunTimedOut
from runtime.infra.eventlog import EventLog

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import run_ends

pytestmark = pytest.mark.anyio


def submitted(run_id: str, at: float) -> RunSubmitted:
    return RunSubmitted(run_id=run_id, at=at, team="acme", pipeline="demo/noop:v1", inputs=[])


async def test_the_counts_say_when_every_run_ended_and_the_rate_comes_from_the_events(
    nc,  # type: ignore[no-untyped-def]
) -> None:
    log = EventLog(nc)
    await log.ensure()
    await log.append(submitted("before", 1.0))  # not this phase's
    span = run_ends.Span(since=10.0, next_seq=await log.last_seq() + 1)
    async with run_ends.EndCounts(log.js, span.next_seq) as counts:
        assert await counts.counts() == (0, 0)
        with pytest.raises(TimeoutError):  # nothing submitted yet: never "all ended"
            await counts.until_all_ended(0.3)
        await log.append(RunCompleted(run_id="before", at=11.0, attempt=1, outputs=[]))
        await log.append(submitted("run_a", 12.0))
        await log.append(submitted("run_b", 13.0))
        await log.append(RunCompleted(run_id="run_a", at=14.0, attempt=1, outputs=[]))
        assert await counts.counts() == (2, 2)  # the end of "before" counts as an end ...
        await log.append(submitted("run_c", 14.5))
        with pytest.raises(TimeoutError):  # ... so the counts are checked against the events
            await span.read_all(log.js, 3, timeout_s=0.3)
        await log.append(RunTimedOut(run_id="run_b", at=15.0, attempt=1, timeout_s=1.0))
        await log.append(RunCompleted(run_id="run_c", at=16.0, attempt=1, outputs=[]))
        assert await counts.until_all_ended(5.0) == 3
        await span.read_all(log.js, 3)
    assert span.first == {"run_a": 12.0, "run_b": 13.0, "run_c": 14.5}
    assert span.runs_per_s() == 3 / (16.0 - 12.0)
    names = [c.name async for c in _consumers(log)]
    assert not [n for n in names if n.startswith("bench-count-")]  # removed when done


async def _consumers(log: EventLog):  # type: ignore[no-untyped-def]
    for info in await log.js.consumers_info("JETRUN_EVENTS"):
        yield info
