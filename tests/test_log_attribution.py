"""What a worker prints belongs to the attempt that printed it: real worker processes whose
pipeline leaves a thread, a forked process or a program it ran printing after its run returned;
the next attempt (maybe another team's run of the same pipeline) must not get those lines in its
logs, even while they go on printing during it."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import anyio
import pytest

from contracts.values import from_python
from runtime.infra.capture import LogCapture
from runtime.node.worker import PipelineWorker

pytestmark = pytest.mark.anyio

LOGS = str(Path(__file__).parent / "fixtures" / "log_pipelines.py")


def tries(tally: Path) -> int:
    return len(tally.read_text().splitlines()) if tally.exists() else 0


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


@pytest.mark.parametrize(
    "how",
    [
        *("thread", "raw-thread", "thread-program", "fork", "fork-print", "exec"),
        *("thread+sigpipe", "fork+sigpipe"),
    ],
)
async def test_what_lingers_and_prints_during_the_next_attempt_never_lands_in_it(
    how: str, tmp_path: Path
) -> None:
    tally = tmp_path / "tally"
    team_a = [from_python(v) for v in ("team-a-secret", how, 5.0, 0.4, str(tally))]
    team_b = [from_python(v) for v in ("team-b", "nothing", 0.0, 0.8, str(tally))]
    async with PipelineWorker(LOGS, "test/linger:v1") as worker:
        first, second, third = (LogCapture(time.time) for _ in range(3))
        with anyio.fail_after(30):
            assert (await worker.run(team_a, output=first)).ok
            before = tries(tally)
            assert (await worker.run(team_b, output=second)).ok
            during = tries(tally) - before
            assert (await worker.run(team_b, output=third)).ok
        assert worker.alive  # nothing the worker writes goes into a closed pipe
    if how == "fork+sigpipe":  # SIGPIPE killed it at its first write after the attempt
        assert during <= 1
    else:  # it was printing while the next attempts ran (about 80 tries in 0.8 s)
        assert during >= 10
    mine = [line.text for line in first.take()]
    assert mine[0] == "now: team-a-secret" and "late: team-a-secret" in mine  # while it ran
    assert [line.text for line in second.take()] == ["now: team-b"]
    assert [line.text for line in third.take()] == ["now: team-b"]


async def test_a_pool_kept_across_runs_prints_into_the_run_that_gave_it_work() -> None:
    async with PipelineWorker(LOGS, "test/pool-print:v1") as worker:
        for team in ("team-a", "team-b", "team-c"):
            capture = LogCapture(time.time)
            with anyio.fail_after(30):
                assert (await worker.run([from_python(team)], output=capture)).ok
            assert [line.text for line in capture.take()] == [f"pool: {team}"]


def pipeline_log(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    """What the worker logged as the pipeline's own output: (stream, text)."""
    return [
        (getattr(r, "stream", ""), r.getMessage().split(": ", 1)[1])
        for r in caplog.records
        if r.name == "jetrun.worker" and getattr(r, "pipeline", None)
    ]


async def test_a_thread_the_startup_step_started_prints_into_no_attempt(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="jetrun.worker")
    async with PipelineWorker(LOGS, "test/helper-thread:v1") as worker:
        for team in ("team-a", "team-b"):
            capture = LogCapture(time.time)
            with anyio.fail_after(30):
                assert (await worker.run([from_python(team)], output=capture)).ok
            assert capture.take() == []
    logged = [text for _, text in pipeline_log(caplog)]
    assert logged == ["helper: team-a", "helper: team-b"]  # the pipeline's own log


@pytest.mark.parametrize("kind", ["heartbeat", "raw-heartbeat"])
async def test_a_startup_thread_printing_through_two_teams_attempts_lands_in_neither(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="jetrun.worker")
    async with PipelineWorker(LOGS, f"test/{kind}:v1") as worker:
        captures = {team: LogCapture(time.time) for team in ("team-a", "team-b")}
        with anyio.fail_after(30):
            for team, capture in captures.items():
                done = await worker.run([from_python(team), from_python(0.4)], output=capture)
                assert done.ok, done
            beats = [text for _, text in pipeline_log(caplog) if text.startswith("heartbeat")]
            assert len(beats) >= 30  # logged as they came, while the attempts ran (0.8 s)
    for team, capture in captures.items():
        assert [line.text for line in capture.take()] == [f"now: {team}"]
    logged = pipeline_log(caplog)
    assert logged[0] == ("stdout", "loading")
    beats_by_way: dict[int, set[str]] = {}  # print to stdout, stderr, sys.__stderr__, echo
    for stream, text in logged:
        if text.startswith("heartbeat"):
            beats_by_way.setdefault(int(text.split()[1]) % 4, set()).add(stream)
    assert beats_by_way == {0: {"stdout"}, 1: {"stderr"}, 2: {"stderr"}, 3: {"stdout"}}


async def test_a_thread_nobody_tagged_prints_into_no_attempt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="jetrun.worker")
    tally = str(tmp_path / "tally")
    team_a = [from_python(v) for v in ("team-a-secret", "untagged-thread", 5.0, 0.4, tally)]
    team_b = [from_python(v) for v in ("team-b", "nothing", 0.0, 0.4, tally)]
    async with PipelineWorker(LOGS, "test/linger:v1") as worker:
        first, second = LogCapture(time.time), LogCapture(time.time)
        with anyio.fail_after(30):
            assert (await worker.run(team_a, output=first)).ok
            assert (await worker.run(team_b, output=second)).ok
    assert [line.text for line in first.take()] == ["now: team-a-secret"]
    assert [line.text for line in second.take()] == ["now: team-b"]
    assert ("stdout", "late: team-a-secret") in pipeline_log(caplog)
