"""The agent's pipelines and their replicas: which pipelines of its modules this node can
serve, entering them in the catalogue, the cold start of a replica (one worker runs the
pipeline's startup step), and loading or unloading a replica when the autoscaler asks."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod

from anyio.abc import TaskGroup
from prometheus_client import Histogram

from contracts.agents import Accelerator, PipelineStatus
from contracts.scaling import AnyScalingEvent, ReplicaLoadRequested, ReplicaUnloadRequested
from runtime.infra.catalog import Catalog
from runtime.infra.clock import Clock
from runtime.node.attempts import Attempt, Pool
from runtime.node.pipelines import PipelineSpec, load_module
from runtime.node.worker import PipelineWorker, StartupFailed

log = logging.getLogger("jetrun.agent")


def _load(module: str) -> list[PipelineSpec]:
    try:
        return load_module(module)
    except Exception as err:
        lines = str(err).strip().splitlines()
        why = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
        raise PipelineModuleError(f"cannot load pipeline module {module!r}: {why}") from err


class PipelineModuleError(Exception):
    """A pipeline module given to the agent cannot be loaded; the message is one line."""


class Replicas(ABC):
    """The pipeline pools of an ``Agent`` (a base class of it: these methods share the agent's
    state, declared here)."""

    agent_id: str
    modules: list[str]
    accelerators: list[Accelerator]
    catalog: Catalog
    clock: Clock
    pools: dict[str, Pool]
    attempts: dict[str, Attempt]
    draining: bool
    cold_starts: Histogram
    _tg: TaskGroup | None
    _scaling_seq: int

    @abstractmethod
    def max_event_bytes(self) -> int:
        """The largest event the log takes (what a worker's outputs are weighed against)."""

    @abstractmethod
    async def _beat(self) -> None:
        """Publish the agent's heartbeat now (a pool's status changed)."""

    # --- pipelines: loading, cold starts ------------------------------------------------------

    def _load_specs(self) -> None:
        kinds = {a.kind for a in self.accelerators if a.slots > 0}
        for module in self.modules:
            for spec in _load(module):
                if spec.accelerator not in kinds:
                    log.warning(
                        "%s needs a %s slot; this node has none", spec.pointer, spec.accelerator
                    )
                    continue
                self.pools[spec.pointer] = Pool(spec=spec, module=module)

    async def _register(self, pool: Pool) -> None:
        """Enter the pipeline in the catalogue, unless it is deployed with scaling settings
        (those are the operator's: never overwritten by an agent starting)."""
        known = await self.catalog.lookup(pool.spec.pointer)
        if known is not None and known.scaling is not None:
            pool.scaled = True
        else:
            await self.catalog.register(pool.spec.info())
            pool.scaled = pool.spec.scaling is not None
        pool.loaded = not pool.scaled

    async def _warm(self, pool: Pool, generation: int) -> None:
        """The cold start: one worker runs the pipeline's startup step."""
        try:
            worker = await self._spawn(pool)
        except StartupFailed as failed:
            if pool.generation == generation:
                pool.status, pool.error = PipelineStatus.failed, failed.error.message
            log.error("%s failed to start: %s", pool.spec.pointer, failed.error.message)
        else:
            if pool.generation != generation:  # unloaded meanwhile
                await worker.kill()
                return
            pool.idle.append(worker)
            pool.status = PipelineStatus.ready
            log.info("%s ready on %s", pool.spec.pointer, self.agent_id)
        await self._beat()

    async def _spawn(self, pool: Pool) -> PipelineWorker:
        env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, pool.gpus))} if pool.gpus else None
        worker = PipelineWorker(
            pool.module,
            pool.spec.pointer,
            env=env,
            declared=pool.spec.env,
            max_output_bytes=self.max_event_bytes,
        )
        with self.cold_starts.labels(pool.spec.pointer).time():
            await worker.start()
        return worker

    # --- replicas the autoscaler asks for ----------------------------------------------------

    async def _on_scaling(self, seq: int, event: AnyScalingEvent) -> None:
        if seq <= self._scaling_seq or self._tg is None:
            return  # a redelivery after the consumer was recreated
        self._scaling_seq = seq
        pool = self.pools.get(event.pipeline)
        if getattr(event, "agent_id", None) != self.agent_id or pool is None or self.draining:
            return
        if isinstance(event, ReplicaLoadRequested):
            if pool.loaded and pool.status is not PipelineStatus.failed:
                return  # already loaded or loading: idempotent
            await self._kill_idle(pool)
            pool.generation += 1
            pool.loaded, pool.status, pool.error = True, PipelineStatus.loading, None
            pool.gpus = list(event.gpus)
            log.info("%s loading %s (gpus %s)", self.agent_id, event.pipeline, pool.gpus)
            await self._beat()
            self._tg.start_soon(self._warm, pool, pool.generation)
        elif isinstance(event, ReplicaUnloadRequested) and pool.loaded:
            pool.generation += 1
            pool.status = PipelineStatus.draining
            await self._beat()
            self._tg.start_soon(self._unload, pool, pool.generation)

    async def _unload(self, pool: Pool, generation: int) -> None:
        """Let the replica's running attempts finish, then stop its workers (which frees the
        memory they hold) and stop advertising it."""
        while any(a.pipeline == pool.spec.pointer for a in self.attempts.values()):
            await self.clock.sleep(0.05)
        if pool.generation != generation:
            return  # loaded again meanwhile
        await self._kill_idle(pool)
        pool.loaded, pool.status, pool.error, pool.gpus = False, PipelineStatus.loading, None, []
        log.info("%s unloaded %s", self.agent_id, pool.spec.pointer)
        await self._beat()

    async def _kill_idle(self, pool: Pool) -> None:
        idle, pool.idle = pool.idle, []
        for worker in idle:
            await worker.kill()
