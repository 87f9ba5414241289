"""Runners: a job goes to a task that waits for one, a new task only when none waits."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from runtime.node.runners import Runners, RunnersStatistics

pytestmark = pytest.mark.anyio


async def test_a_task_that_finished_a_job_runs_the_next_and_busy_ones_get_company() -> None:
    done: list[int] = []
    gates = {i: anyio.Event() for i in range(3)}

    async def job(i: int) -> None:
        await gates[i].wait()
        done.append(i)

    async with anyio.create_task_group() as tg:
        runners = Runners(tg, job)
        runners.start(0)
        runners.start(1)  # 0 is still running: a second task
        assert runners.statistics() == RunnersStatistics(tasks=2, idle=0)
        gates[0].set()
        gates[1].set()
        with anyio.fail_after(5):
            while runners.statistics().idle < 2:
                await anyio.sleep(0.001)
        runners.start(2)  # one of the waiting tasks takes it
        gates[2].set()
        with anyio.fail_after(5):
            while len(done) < 3:
                await anyio.sleep(0.001)
        assert runners.statistics() == RunnersStatistics(tasks=2, idle=2)
        tg.cancel_scope.cancel()
    assert sorted(done) == [0, 1, 2]
    assert runners.statistics().tasks == 0


async def test_a_jobs_exception_reaches_the_task_group() -> None:
    async def job(i: int) -> None:
        raise ValueError(f"job {i}")

    with pytest.raises(ExceptionGroup) as raised:
        async with anyio.create_task_group() as tg:
            Runners(tg, job).start(7)
    assert [str(e) for e in raised.value.exceptions] == ["job 7"]


async def test_a_job_is_never_handed_to_a_task_being_cancelled() -> None:
    ran: list[int] = []

    async def job(i: int) -> None:
        ran.append(i)

    async with anyio.create_task_group() as outer:
        async with anyio.create_task_group() as inner:
            runners = Runners(inner, job)
            runners.start(1)
            with anyio.fail_after(5):
                while runners.statistics().idle < 1:
                    await anyio.sleep(0.001)
            inner.cancel_scope.cancel()
        runners.tg = outer  # the waiting task is gone: the next job starts a new one
        runners.start(2)
        with anyio.fail_after(5):
            while len(ran) < 2:
                await anyio.sleep(0.001)
        outer.cancel_scope.cancel()
    assert ran == [1, 2]


async def test_a_job_handed_over_as_the_group_is_cancelled_still_starts() -> None:
    ran: list[int] = []

    async def job(i: int) -> None:
        ran.append(i)
        await anyio.lowlevel.checkpoint()

    for outer_cancel in (False, True):
        ran.clear()
        with anyio.CancelScope() as outer:
            async with anyio.create_task_group() as tg:
                runners = Runners(tg, job)
                runners.start(1)
                with anyio.fail_after(5):
                    while runners.statistics().idle < 1:
                        await anyio.sleep(0.001)
                assert runners.start(2)  # handed to the waiting task...
                (outer if outer_cancel else tg.cancel_scope).cancel()  # ...cancelled at once
        assert ran == [1, 2]


async def test_a_job_handed_over_once_the_group_ended_is_refused_not_raised() -> None:
    ran: list[int] = []

    async def job(i: int) -> None:
        ran.append(i)

    async with anyio.create_task_group() as tg:
        runners = Runners(tg, job)
        assert runners.start(1)
        with anyio.fail_after(5):
            while runners.statistics().idle < 1:
                await anyio.sleep(0.001)
        tg.cancel_scope.cancel()
    assert not runners.start(2)  # the shutdown: the caller learns the job will never run
    assert ran == [1] and runners.statistics().tasks == 0
