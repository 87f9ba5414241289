"""benchmarks/bench_stages.py: events -> per-stage durations -> percentiles (no NATS)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from contracts.errors import ErrorType, RunError
from contracts.events import (
    AnyEvent,
    RunCompleted,
    RunDispatched,
    RunFailed,
    RunQueued,
    RunStarted,
    RunSubmitted,
    queued_runs,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_stages


def submitted(run_id: str, at: float) -> RunSubmitted:
    return RunSubmitted(run_id=run_id, at=at, team="t", pipeline="demo/noop:v1", inputs=[])


def dispatched(run_id: str, at: float, attempt: int = 1) -> RunDispatched:
    return RunDispatched(run_id=run_id, at=at, attempt=attempt, agent_id="a")


def completed(run_id: str, at: float, attempt: int = 1) -> RunCompleted:
    return RunCompleted(run_id=run_id, at=at, attempt=attempt, outputs=[])


def histories() -> list[AnyEvent]:
    """Four runs, interleaved as in a log: a plain no-op, one that waited in a queue, one that
    ran long enough to append ``started``, one that failed; and the end of a run submitted
    before the range (ignored)."""
    error = RunError(type=ErrorType.unknown, message="boom")
    return [
        completed("before", 99.0),
        submitted("plain", 100.000),
        submitted("queued", 100.001),
        dispatched("plain", 100.002),
        RunQueued(run_id="queued", at=100.003, attempt=1),
        submitted("slow", 100.004),
        submitted("failed", 100.005),
        completed("plain", 100.006),
        dispatched("slow", 100.010),
        dispatched("failed", 100.011),
        dispatched("queued", 100.023),
        RunStarted(run_id="slow", at=100.070, attempt=1, agent_id="a"),
        RunFailed(run_id="failed", at=100.021, attempt=1, error=error),
        completed("queued", 100.025),
        completed("slow", 100.110),
    ]


def ms(stages: bench_stages.Stages, stage: str) -> list[float]:
    return [round(x, 3) for x in stages.ms.get(stage, [])]


def test_each_stage_comes_from_the_events_of_its_own_run() -> None:
    stages = bench_stages.stage_durations(histories())

    assert (stages.runs, stages.ended) == (4, 4)
    # in the order the runs were submitted: plain, queued, slow, failed
    assert ms(stages, bench_stages.SUBMITTED_TO_DISPATCHED) == [2.0, 22.0, 6.0, 6.0]
    assert ms(stages, bench_stages.SUBMITTED_TO_QUEUED) == [2.0]
    assert ms(stages, bench_stages.QUEUED_TO_DISPATCHED) == [20.0]
    assert ms(stages, bench_stages.DISPATCHED_TO_STARTED) == [60.0]
    assert ms(stages, bench_stages.DISPATCHED_TO_END) == [4.0, 2.0, 100.0, 10.0]
    assert ms(stages, bench_stages.SUBMITTED_TO_END) == [6.0, 24.0, 106.0, 16.0]
    assert bench_stages.HTTP_AND_GATEWAY not in stages.ms  # no client latencies given


def test_runs_queued_by_one_batch_have_their_queued_stages() -> None:
    """A pass's ``queued_runs`` stands for each of its runs' ``queued``: the same stages."""
    runs = [RunQueued(run_id=r, at=100.003, attempt=1) for r in ("before", "queued")]
    batch = queued_runs(runs, 100.003)
    events = [batch if isinstance(e, RunQueued) else e for e in histories()]
    assert bench_stages.stage_durations(events) == bench_stages.stage_durations(histories())
    assert "queued_runs" in str(bench_stages.SUBJECTS)


def test_a_requeued_run_ends_from_the_dispatch_of_its_last_attempt() -> None:
    events: list[AnyEvent] = [
        submitted("r", 10.0),
        dispatched("r", 10.001),
        RunQueued(run_id="r", at=10.5, attempt=2),
        dispatched("r", 10.6, attempt=2),
        completed("r", 10.604, attempt=2),
    ]
    stages = bench_stages.stage_durations(events)

    assert ms(stages, bench_stages.SUBMITTED_TO_DISPATCHED) == [1.0]  # the first decision
    assert bench_stages.SUBMITTED_TO_QUEUED not in stages.ms  # attempt 1 was not queued
    assert ms(stages, bench_stages.DISPATCHED_TO_END) == [4.0]


def test_sync_runs_count_only_the_timed_ones_and_what_the_client_saw_beyond_the_log() -> None:
    client_s = {"plain": 0.009, "failed": 0.0165}  # the others: warm-ups, not timed
    stages = bench_stages.stage_durations(histories(), client_s)

    assert (stages.runs, stages.ended) == (2, 2)
    assert ms(stages, bench_stages.HTTP_AND_GATEWAY) == [3.0, 0.5]
    assert ms(stages, bench_stages.SUBMITTED_TO_END) == [6.0, 16.0]


def test_a_run_not_yet_ended_has_only_the_stages_it_went_through() -> None:
    stages = bench_stages.stage_durations([submitted("r", 1.0), dispatched("r", 1.002)])

    assert (stages.runs, stages.ended) == (1, 0)
    assert set(stages.ms) == {bench_stages.SUBMITTED_TO_DISPATCHED}


def test_the_lines_give_p50_p99_and_how_many_runs_had_each_stage() -> None:
    stages = bench_stages.Stages(runs=100, ended=99)
    for i in range(1, 101):
        stages.add(bench_stages.SUBMITTED_TO_DISPATCHED, i / 1000)
    stages.add(bench_stages.DISPATCHED_TO_STARTED, 0.0625)

    lines = bench_stages.stage_lines("throughput", stages)

    assert lines[0].startswith("stages of the throughput runs (100 runs, 99 ended; ms ")
    assert lines[1].split() == [
        *("submitted", "->", "dispatched:", "p50", "51.00", "ms", "p99", "99.00", "ms"),
        *("(100", "runs)"),
    ]
    assert lines[2].split()[4:] == ["62.50", "ms", "p99", "62.50", "ms", "(1", "runs)"]
    assert len(lines) == 3  # stages no run had are left out


@pytest.mark.parametrize("values", [[5.0], [3.0, 1.0, 2.0]])
def test_percentile_is_the_nearest_rank_of_bench_runs(values: list[float]) -> None:
    import bench_runs

    for p in (0, 50, 99, 100):
        assert bench_stages.percentile(values, p) == bench_runs.percentile(values, p)


def test_the_clients_wall_clock_splits_its_time_beyond_the_log_into_the_way_in_and_out() -> None:
    client_s = {"plain": 0.009, "failed": 0.0165}
    client_at = {"plain": (99.999, 100.008), "failed": (100.0048, 100.0213)}
    stages = bench_stages.stage_durations(histories(), client_s, client_at)

    assert ms(stages, bench_stages.CLIENT_TO_SUBMITTED) == [1.0, 0.2]  # to the gateway's stamp
    assert ms(stages, bench_stages.END_TO_CLIENT) == [2.0, 0.3]  # from the agent's stamp
    assert ms(stages, bench_stages.HTTP_AND_GATEWAY) == [3.0, 0.5]  # the two together
    lines = bench_stages.stage_lines("sync", stages)
    assert [line.split(":")[0].strip() for line in lines[-2:]] == [
        bench_stages.CLIENT_TO_SUBMITTED,
        bench_stages.END_TO_CLIENT,
    ]
