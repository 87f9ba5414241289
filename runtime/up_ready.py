"""When ``jetrun up`` may say it is up: the local agent's pipelines have loaded (a failed
startup is a startup error) and every pipeline its modules define is in the catalogue, so a run
of any of them, sent as the banner suggests, is never answered ``pipeline_not_found``.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

import anyio

from contracts.agents import AgentHeartbeat, PipelineInfo, PipelineStatus
from runtime.infra.catalog import Catalog
from runtime.infra.fleet import Fleet

DEMO_POINTER = "demo/echo:v1"
REGISTERED_WITHIN_S = 30.0  # once the agent's pipelines have loaded


class StartupError(Exception):
    """``jetrun up`` cannot start; the message is one line for the user."""


async def pipelines_ready(
    fleet: Fleet, proc: subprocess.Popen[bytes], agent_id: str, stopping: anyio.Event
) -> AgentHeartbeat | None:
    """Wait until the agent's pipelines have all loaded; None if stopped first. Raises
    ``StartupError`` if the agent exits or a pipeline's startup step fails."""
    while not stopping.is_set():
        code = proc.poll()
        if code is not None:
            raise StartupError(f"the local agent exited with code {code} before it was ready")
        beat = fleet.get(agent_id)
        if beat is not None and loaded(beat):
            return beat
        with anyio.move_on_after(0.1):
            await stopping.wait()
    return None


def loaded(beat: AgentHeartbeat) -> bool:
    if any(p.status is PipelineStatus.loading for p in beat.pipelines):
        return False
    for p in beat.pipelines:
        if p.status is PipelineStatus.failed:
            raise StartupError(f"pipeline {p.pointer} failed to start: {p.error}")
    if not beat.pipelines and not beat.can_serve:
        raise StartupError("the pipeline modules define no pipeline this node can run")
    return True


def pointer(beat: AgentHeartbeat) -> str:
    """The pipeline the banner's example runs: the demo's, else one that is ready."""
    ready = [p.pointer for p in beat.pipelines if p.status is PipelineStatus.ready]
    names = ready or list(beat.can_serve)
    return DEMO_POINTER if DEMO_POINTER in names else sorted(names)[0]


async def registered(
    catalog: Catalog,
    deployed: Sequence[PipelineInfo],
    beat: AgentHeartbeat,
    stopping: anyio.Event,
    within_s: float = REGISTERED_WITHIN_S,
) -> bool:
    """Wait until every ``deployed`` pipeline is in the catalogue as ``catalog`` reads it;
    False if stopped first. Raises ``StartupError`` naming a pipeline no agent here can serve
    (nothing will register it) or one still missing after ``within_s`` seconds."""
    for info in deployed:
        if info.pointer not in beat.can_serve:
            raise StartupError(
                f"pipeline {info.pointer} needs a {info.accelerator} slot and no agent here has "
                "one: it is not registered, so its runs would be answered 404"
            )
    with anyio.move_on_after(within_s):
        for info in deployed:
            while await catalog.lookup(info.pointer) is None:
                with anyio.move_on_after(0.1):
                    await stopping.wait()
                if stopping.is_set():
                    return False
        return True
    missing = [i.pointer for i in deployed if catalog.cached(i.pointer) is None]
    raise StartupError(
        f"pipeline {', '.join(missing)} was not registered in the catalogue within {within_s:g} s"
    )
