"""An agent survives whatever one attempt raises, and never reports what the log cannot take."""

from __future__ import annotations

import anyio
import pytest
from anyio.abc import TaskGroup
from nats.aio.client import Client

from contracts.errors import ErrorType, RunError
from contracts.events import RunCompleted, RunDispatched, RunFailed
from contracts.values import from_python
from runtime.node.agent import Agent, default_agent_id
from runtime.node.attempts import Attempt
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
    assert fitted(done, 10_000) is done
    failed = fitted(done, 4000)
    assert isinstance(failed, RunFailed) and failed.attempt == 1
    assert failed.error.type is ErrorType.pipeline_error
    assert failed.error.message.startswith("output too large: the result is 5,")


def test_a_failure_too_large_to_store_is_cut() -> None:
    huge = RunError(type=ErrorType.pipeline_error, message="m" * 100_000, traceback="t" * 100_000)
    failed = fitted(RunFailed(run_id="run_x", at=1.0, attempt=1, error=huge), 50_000)
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
