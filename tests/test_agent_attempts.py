"""An agent survives whatever one attempt raises, never reports what the log cannot take, and
appends ``started`` only for an attempt that runs long enough."""

from __future__ import annotations

import anyio
import pytest
from anyio.abc import TaskGroup
from nats.aio.client import Client

from contracts.errors import ErrorType, RunError
from contracts.events import (
    Event,
    RunCompleted,
    RunDispatched,
    RunFailed,
    RunOutputProduced,
    RunStarted,
    encode_event,
)
from contracts.values import from_python
from runtime.node.agent import Agent, default_agent_id
from runtime.node.attempts import Attempt, Starts, Streaming
from runtime.node.results import fitted

pytestmark = pytest.mark.anyio

DISPATCH = RunDispatched(run_id="run_x", at=1.0, attempt=2, agent_id="agent-t")


async def test_an_exception_in_an_attempt_fails_that_attempt_alone(
    nc: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = Agent(nc, modules=[], agent_id="agent-t")

    async def explode(dispatch: RunDispatched, attempt: Attempt, tg: TaskGroup) -> None:
        raise OverflowError("can't serialize ints > 2**64 - 1")

    monkeypatch.setattr(agent.runner, "execute", explode)
    async with anyio.create_task_group() as tg:
        result = await agent.runner.result(DISPATCH, Attempt("run_x", 2, anyio.CancelScope()), tg)
    assert isinstance(result, RunFailed)
    assert (result.run_id, result.attempt) == ("run_x", 2)
    assert result.error.type is ErrorType.unknown
    assert "OverflowError" in result.error.message


def test_a_result_over_the_limit_becomes_a_pipeline_error() -> None:
    done = RunCompleted(run_id="run_x", at=1.0, attempt=1, outputs=[from_python("x" * 5000)])
    assert fitted(done, 10_000) == (done, encode_event(done))  # measured is what is sent
    failed, payload = fitted(done, 4000)
    assert payload == encode_event(failed)
    assert isinstance(failed, RunFailed) and failed.attempt == 1
    assert failed.error.type is ErrorType.pipeline_error
    assert failed.error.message.startswith("output too large: the result is 5,")


def test_a_failure_too_large_to_store_is_cut() -> None:
    huge = RunError(type=ErrorType.pipeline_error, message="m" * 100_000, traceback="t" * 100_000)
    failed, payload = fitted(RunFailed(run_id="run_x", at=1.0, attempt=1, error=huge), 50_000)
    assert payload == encode_event(failed)
    assert isinstance(failed, RunFailed)
    assert len(failed.error.message) < 20_000 and failed.error.message.endswith("[cut]")
    assert failed.error.traceback is not None and failed.error.traceback.startswith("[cut]")


def test_the_default_agent_id_is_one_subject_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("socket.gethostname", lambda: "node-1.example.com")
    agent_id = default_agent_id()
    assert agent_id.startswith("agent-node-1-example-com-") and "." not in agent_id


@pytest.mark.parametrize("bad", ["a.b", "*", ">", "a b", "x" * 300])
async def test_an_agent_id_that_is_not_a_subject_token_is_refused(nc: Client, bad: str) -> None:
    with pytest.raises(ValueError, match="invalid agent id"):
        Agent(nc, modules=[], agent_id=bad)


# --- ``started``: appended only for an attempt that runs long enough ------------------------


class Recorder:
    """Stands in for the reporter: records what would be appended."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    async def report_then_set(self, event: Event, done: anyio.Event) -> None:
        self.events.append(event)
        done.set()


def started(run_id: str) -> RunStarted:
    return RunStarted(run_id=run_id, at=1.0, attempt=1, agent_id="agent-t")


async def test_an_attempt_that_ends_soon_appends_no_started() -> None:
    recorder = Recorder()
    starts = Starts(recorder, after_s=0.05)  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        tg.start_soon(starts.run)
        start = starts.begin(started("run_short"))
        await starts.settle(start, ended=True)
        await anyio.sleep(0.15)  # past its due time: the loop must not append it either
        tg.cancel_scope.cancel()
    assert recorder.events == []


async def test_an_attempt_still_running_appends_started_while_it_runs() -> None:
    recorder = Recorder()
    starts = Starts(recorder, after_s=0.05)  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        tg.start_soon(starts.run)
        start = starts.begin(started("run_long"))
        with anyio.fail_after(5):
            while not recorder.events:
                await anyio.sleep(0.01)
        assert [e.run_id for e in recorder.events] == ["run_long"]
        with anyio.fail_after(5):
            await starts.settle(start, ended=True)  # the end waits for it, adds nothing
        tg.cancel_scope.cancel()
    assert len(recorder.events) == 1


async def test_an_output_before_the_delay_appends_started_first_and_once() -> None:
    recorder = Recorder()
    starts = Starts(recorder, after_s=0.05)  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        tg.start_soon(starts.run)
        start = starts.begin(started("run_streams"))
        await starts.settle(start, ended=False)  # an output: started is stored before it
        assert [e.run_id for e in recorder.events] == ["run_streams"]
        await anyio.sleep(0.15)
        await starts.settle(start, ended=True)
        tg.cancel_scope.cancel()
    assert len(recorder.events) == 1


async def test_streamed_outputs_are_appended_together_and_all_stored_before_the_end() -> None:
    reported: list[int] = []
    release = anyio.Event()

    class SlowReporter:
        async def report(self, event: RunOutputProduced, payload: bytes) -> None:
            assert payload == encode_event(event)
            await release.wait()
            reported.append(event.index)

    async with anyio.create_task_group() as tg:
        streaming = Streaming(SlowReporter(), tg)  # type: ignore[arg-type]
        for index in range(3):  # none waits for the one before it to be stored
            output = RunOutputProduced(
                run_id="run_s", at=1.0, attempt=1, index=index, output=from_python(index)
            )
            with anyio.fail_after(5):
                await streaming.append(output, encode_event(output))
        assert reported == []
        with anyio.move_on_after(0.1):
            await streaming.stored()
        assert reported == []  # still in flight: the end must wait
        release.set()
        with anyio.fail_after(5):
            await streaming.stored()
        assert sorted(reported) == [0, 1, 2]
