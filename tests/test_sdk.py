"""The Python SDK against a live stack (real processes): the seed's calls, sync and async."""

from __future__ import annotations

from contextlib import aclosing
from functools import partial
from pathlib import Path

import anyio
import pytest

from runtime.clients import sdk
from runtime.clients.sdk import (
    AsyncClient,
    ConcurrencyLimitReached,
    JetrunError,
    NoResourcesAvailable,
    RunState,
)
from tests.harness import Stack, open_gate

pytestmark = pytest.mark.anyio


async def test_the_seeds_sync_call(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JETRUN_URL", stack.url)
    monkeypatch.setenv("JETRUN_TOKEN", "jr_demo_token")
    input_data = ["my_input_string", 5]
    result = await anyio.to_thread.run_sync(partial(sdk.run_pipeline, "demo/echo:v1", *input_data))
    assert result.state is RunState.completed
    assert result.outputs_formatted() == ["my_input_string" * 5]


async def test_module_level_calls_share_one_kept_alive_client(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JETRUN_URL", stack.url)
    monkeypatch.setenv("JETRUN_TOKEN", "jr_demo_token")
    first = sdk.shared_client()
    assert sdk.shared_client(stack.url, "jr_demo_token") is first
    assert sdk.shared_client(stack.url, "tok_acme") is not first
    for _ in range(3):
        run = await anyio.to_thread.run_sync(partial(sdk.run_pipeline, "demo/noop:v1"))
        assert run.state is RunState.completed
    pool = first._http._transport._pool  # type: ignore[attr-defined]
    assert len(pool.connections) == 1  # three calls, one connection


async def test_the_seeds_async_call_and_polling(stack: Stack) -> None:
    kw = {"base_url": stack.url, "token": "jr_demo_token"}
    initial = await anyio.to_thread.run_sync(
        partial(sdk.run_pipeline, "demo/echo:v1", "my input string", 2, async_run=True, **kw)
    )
    assert initial.state in (RunState.queued, RunState.running, RunState.completed)
    result = await anyio.to_thread.run_sync(
        partial(sdk.poll_for_run_completion, initial.id, timeout_secs=30, interval_secs=0.05, **kw)
    )
    assert result.state is RunState.completed
    assert result.outputs_formatted() == ["my input string" * 2]
    again = await anyio.to_thread.run_sync(partial(sdk.get_run, initial.id, **kw))
    assert again == result


async def test_errors_are_typed(stack: Stack, tmp_path: Path) -> None:
    async with AsyncClient(stack.url, "jr_demo_token") as client:
        with pytest.raises(NoResourcesAvailable) as no_resources:
            await client.run_pipeline("test/ghost:v1")
        assert no_resources.value.run.state is RunState.no_resources_available
        assert "no replica of test/ghost:v1 is ready" in str(no_resources.value)
        with pytest.raises(JetrunError) as not_found:
            await client.run_pipeline("nobody/nothing:v1")
        assert not_found.value.status == 404
        failed = await client.run_pipeline("demo/fail:v1")
        assert failed.state is RunState.failed and failed.error is not None
        assert '"type": "pipeline_error"' in failed.error.json(indent=2)
    async with AsyncClient(stack.url, "tok_rival") as rival:
        gates = [tmp_path / f"g{i}" for i in range(3)]
        held = [await rival.run_pipeline("test/gate:v1", str(g), async_run=True) for g in gates]
        with pytest.raises(ConcurrencyLimitReached) as full:
            await rival.run_pipeline("test/gate:v1", str(tmp_path / "x"), async_run=True)
        assert (full.value.tier, full.value.limit, full.value.active) == ("basic", 3, 3)
        assert full.value.retry_after >= 1
        for gate in gates:
            open_gate(gate, "ok")
        for run in held:
            done = await rival.poll_for_run_completion(run.id, timeout_secs=30, interval_secs=0.05)
            assert done.outputs_formatted() == ["ok"]
    async with AsyncClient(stack.url, "nope") as stranger:
        with pytest.raises(JetrunError) as unauthorized:
            await stranger.get_run("run_x")
        assert unauthorized.value.status == 401


async def test_cancel_and_stream(stack: Stack, tmp_path: Path) -> None:
    async with AsyncClient(stack.url, "tok_big") as client:
        run = await client.run_pipeline("test/gate:v1", str(tmp_path / "never"), async_run=True)
        cancelled = await client.cancel_run(run.id)
        assert cancelled.state is RunState.cancelled
        async with aclosing(client.stream_pipeline("demo/stream:v1", 3)) as updates:
            seen = [update async for update in updates]
        assert seen[-1].state is RunState.completed
        streamed = [value for update in seen for value in update.outputs_formatted()]
        assert streamed == ["chunk 0", "chunk 1", "chunk 2"]  # each update: only new outputs
        assert all(not update.state.is_terminal for update in seen[:-1])
        assert len({update.id for update in seen}) == 1
