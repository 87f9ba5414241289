"""An agent loads and unloads replicas when the scaling log tells it to (real NATS, real worker
processes): nothing autoscaled is loaded at start, a load runs the startup on the GPUs it was
given, an unload stops the worker, and what is meant for another agent is ignored."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from nats.aio.client import Client

from contracts.agents import Accelerator, AgentHeartbeat, PipelineStatus
from contracts.scaling import ReplicaLoadRequested, ReplicaUnloadRequested
from runtime.infra.scalinglog import ScalingLog
from runtime.node.agent import Agent
from tests.harness import FIXTURES

pytestmark = pytest.mark.anyio

POINTER = "test/gpu:v1"


async def until(check: Callable[[], bool], timeout: float = 30.0) -> None:
    with anyio.fail_after(timeout):
        while not check():
            await anyio.sleep(0.05)


def status(beat: AgentHeartbeat) -> PipelineStatus | None:
    return next((p.status for p in beat.pipelines if p.pointer == POINTER), None)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return "Z"


async def test_a_replica_loads_on_its_gpus_when_told_and_its_worker_exits_on_unload(
    nc: Client,
) -> None:
    gpus = Accelerator(kind="gpu", model="fake", memory_mb=80_000, slots=2)
    agent = Agent(
        nc,
        modules=[str(FIXTURES / "gpu_pipeline.py")],
        accelerators=[gpus, Accelerator(kind="cpu", slots=1)],
        heartbeat_interval_s=0.1,
    )
    log = ScalingLog(nc.jetstream(timeout=5.0))
    async with anyio.create_task_group() as tg:
        await tg.start(agent.run)
        beat = agent.heartbeat()
        assert POINTER in beat.can_serve and status(beat) is None  # autoscaled: not loaded

        await log.append(
            ReplicaLoadRequested(pipeline=POINTER, at=1.0, agent_id="someone-else", gpus=[0])
        )
        await log.append(
            ReplicaLoadRequested(pipeline="test/absent:v1", at=1.0, agent_id=agent.agent_id)
        )
        await log.append(
            ReplicaLoadRequested(pipeline=POINTER, at=2.0, agent_id=agent.agent_id, gpus=[1])
        )
        await until(lambda: status(agent.heartbeat()) is PipelineStatus.ready)
        (loaded,) = agent.heartbeat().pipelines
        assert loaded.gpus == [1]
        pid = agent.pools[POINTER].idle[0].pid
        assert pid is not None
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert b"CUDA_VISIBLE_DEVICES=1" in environ

        await log.append(ReplicaUnloadRequested(pipeline=POINTER, at=3.0, agent_id=agent.agent_id))
        await until(lambda: status(agent.heartbeat()) is None)
        await until(lambda: not alive(pid), timeout=10)
        assert agent.pools[POINTER].idle == []
        tg.cancel_scope.cancel()
