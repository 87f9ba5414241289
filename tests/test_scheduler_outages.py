"""The scheduler carries on through NATS timeouts on its side calls (catalogue, permits)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import anyio
import pytest
from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeoutError

from contracts import RunAdmitted, RunState, RunSubmitted
from contracts.agents import (
    Accelerator,
    AgentHeartbeat,
    LoadedPipeline,
    PipelineInfo,
    PipelineStatus,
)
from contracts.events import AdmissionSlot, RunCompleted, RunQueued
from runtime.control.scheduler import Scheduler
from runtime.infra.catalog import Catalog
from runtime.infra.config import parse
from runtime.infra.natsserver import NatsServer

pytestmark = pytest.mark.anyio

CONFIG = parse({"settings": {"node_loss_timeout_s": 60}})


def beat(agent_id: str) -> AgentHeartbeat:
    return AgentHeartbeat(
        agent_id=agent_id,
        at=0.0,
        started_at=0.0,
        accelerators=[Accelerator(kind="cpu", slots=2)],
        pipelines=[LoadedPipeline(pointer="t/p:v1", status=PipelineStatus.ready)],
    )


async def submit(scheduler: Scheduler, run_id: str) -> None:
    at = time.time()
    await scheduler.log.append(
        RunSubmitted(run_id=run_id, at=at, team="t", pipeline="t/p:v1", inputs=[])
    )
    slot = AdmissionSlot(stream="JETRUN_ADMISSION_3", seq=1)
    await scheduler.log.append(RunAdmitted(run_id=run_id, at=at, tier="basic", slot=slot))


async def until(done: Callable[[], bool], timeout: float = 30) -> None:
    with anyio.fail_after(timeout):
        while not done():
            await anyio.sleep(0.02)


def state(scheduler: Scheduler, run_id: str) -> RunState | None:
    run = scheduler.index.get(run_id)
    return run.state if run is not None else None


async def test_a_catalogue_lookup_that_times_out_is_retried(
    nc: Client, nats_server: NatsServer
) -> None:
    """The server freezes (SIGSTOP) just as the scheduler looks a pipeline up: the lookup times
    out, is retried, and the run is dispatched once the server is back."""
    scheduler = Scheduler(nc, CONFIG, tick_s=0.05)
    await scheduler.ensure()
    await Catalog(nc.jetstream()).register(PipelineInfo(pointer="t/p:v1"))  # not cached there
    await submit(scheduler, "r1")
    await scheduler.log.append(RunQueued(run_id="r1", at=time.time(), attempt=1))
    pid = nats_server.pid
    assert pid is not None
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            await tg.start(scheduler.run)
            scheduler.fleet.observe(beat("a1"))
            os.kill(pid, signal.SIGSTOP)  # before the first pass reads the catalogue
            try:
                await anyio.sleep(6)  # past the 5 s request timeout
            finally:
                os.kill(pid, signal.SIGCONT)
            await until(lambda: state(scheduler, "r1") is RunState.running)
            tg.cancel_scope.cancel()


async def test_a_permit_release_that_times_out_is_retried(nc: Client) -> None:
    scheduler = Scheduler(nc, CONFIG, tick_s=0.05)
    await scheduler.ensure()
    await Catalog(nc.jetstream()).register(PipelineInfo(pointer="t/p:v1"))  # not cached there
    release = scheduler.admission.release
    failures = 3
    released: list[AdmissionSlot] = []

    async def flaky_release(slot: AdmissionSlot) -> bool:
        nonlocal failures
        if failures:
            failures -= 1
            raise NatsTimeoutError
        released.append(slot)
        return await release(slot)

    async def timing_out(slots: list[AdmissionSlot]) -> list[bool | Exception]:
        return [NatsTimeoutError() for _ in slots]  # each first try (together) times out

    scheduler.admission.release = flaky_release  # type: ignore[method-assign]
    scheduler.admission.release_all = timing_out  # type: ignore[method-assign,assignment]
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            await tg.start(scheduler.run)
            scheduler.fleet.observe(beat("a1"))
            await submit(scheduler, "r1")
            await until(lambda: state(scheduler, "r1") is RunState.running)
            await scheduler.log.append(
                RunCompleted(run_id="r1", at=time.time(), attempt=1, outputs=[])
            )
            await until(lambda: bool(released))
            # and it still decides
            await submit(scheduler, "r2")
            await until(lambda: state(scheduler, "r2") is RunState.running)
            tg.cancel_scope.cancel()
    assert failures == 0
