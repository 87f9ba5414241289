"""A failing NATS callback is loud (ERROR with its traceback) and, where the process's state
would silently diverge from the log, fatal: the process exits for its supervisor to restart."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import anyio
import pytest

from contracts.events import RunSubmitted
from contracts.values import RunIO
from runtime.infra.eventlog import EventLog
from runtime.infra.guard import CallbackFailed, Guard
from tests.harness import FIXTURES, Proc, Stack

pytestmark = pytest.mark.anyio


async def test_a_fatal_callback_is_logged_and_fails_the_watch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    guard = Guard("tester")

    async def broken(seq: int) -> None:
        raise KeyError(seq)

    with caplog.at_level(logging.ERROR, logger="jetrun.guard"):
        await guard.wrap("event-log tail", broken)(7)  # never raises into nats-py
    record = caplog.records[-1]
    assert record.levelno == logging.ERROR and record.exc_info is not None
    assert "tester: event-log tail raised" in record.getMessage()
    with pytest.raises(CallbackFailed, match="KeyError"), anyio.fail_after(1):
        await guard.watch()


async def test_a_non_fatal_callback_is_logged_and_carries_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    guard = Guard("tester")

    async def broken() -> None:
        raise ValueError("bad request")

    with caplog.at_level(logging.ERROR, logger="jetrun.guard"):
        await guard.wrap("drain handler", broken, fatal=False)()
    assert caplog.records[-1].exc_info is not None
    with anyio.move_on_after(0.05) as scope:
        await guard.watch()
    assert scope.cancelled_caught


async def test_a_plain_function_is_guarded_too(caplog: pytest.LogCaptureFixture) -> None:
    """``wrap_sync``: what an index's apply is wrapped in (called from the connection's reader):
    its result is dropped, an exception logged and, if fatal, failing the watch."""
    guard = Guard("tester")
    calls: list[int] = []

    def apply(seq: int) -> int:
        calls.append(seq)
        if seq == 2:
            raise KeyError(seq)
        return seq

    guarded = guard.wrap_sync("event-log tail", apply)
    with caplog.at_level(logging.ERROR, logger="jetrun.guard"):
        assert guarded(1) is None
        with anyio.move_on_after(0.05) as scope:
            await guard.watch()
        assert scope.cancelled_caught  # nothing failed yet
        guarded(2)  # never raises into the reader
    assert calls == [1, 2]
    assert caplog.records[-1].exc_info is not None
    with pytest.raises(CallbackFailed, match="KeyError"), anyio.fail_after(1):
        await guard.watch()


async def test_a_scheduler_whose_log_callback_raises_exits_loudly(tmp_path: Path) -> None:
    async with Stack(tmp_path) as stack:
        await stack.start_nats()
        argv = [sys.executable, str(FIXTURES / "buggy_scheduler.py"), "scheduler"]
        argv += [*stack.nats_args("scheduler"), "--config", str(stack.config_path)]
        scheduler = Proc("scheduler", argv, tmp_path / "scheduler.log").start()
        stack.procs.append(scheduler)
        nc = await stack.connect()
        try:
            deadline = time.monotonic() + 30
            while "scheduler running" not in scheduler.output():
                assert time.monotonic() < deadline, scheduler.output()
                await anyio.sleep(0.05)
            event = RunSubmitted(
                run_id="run_boom",
                at=time.time(),
                team="acme",
                pipeline="demo/echo:v1",
                inputs=[RunIO(type="string", value="x")],
            )
            await EventLog(nc).append(event)
        finally:
            await nc.close()
        assert scheduler.popen is not None
        deadline = time.monotonic() + 20
        while scheduler.popen.poll() is None:
            assert time.monotonic() < deadline, f"still running:\n{scheduler.output()}"
            await anyio.sleep(0.05)
        output = scheduler.output()
        assert scheduler.popen.returncode != 0, output
        assert "ERROR jetrun.guard: scheduler: event-log tail raised" in output, output
        assert "RuntimeError: a bug in the index" in output and "Traceback" in output
