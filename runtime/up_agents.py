"""The local agents of ``jetrun up``: ``--agents N`` child processes (``jetrun agent``), each with
its own id and NATS identity and ``--slots`` CPU slots of its own.

One agent is one Python event loop, and on a machine with many cores it is one of the loops that
caps runs/s (about 0.11-0.13 ms of CPU per run on a 16-core machine: one core near 8,000 runs/s),
so from ``MANY_CORES`` usable cores on ``jetrun up`` runs one agent per ``AGENT_CORES`` cores, at
most ``MAX_AGENTS`` (``default_agents``); below, one, as always. The scheduler spreads runs over
them like over any agents (the freest first, then the queue where a run starts soonest).

Startup: every agent is started at once; the banner comes once ALL of them have their pipelines
ready (and the modules' pipelines are in the catalogue), so what it says is up is the whole
capacity; any agent that exits or whose pipeline fails first is a startup error. Afterwards an
agent that was declared lost (exit code ``FENCED_EXIT``) is started again at once with the same
id, as the one agent always was. An agent that exits by itself: with one agent ``jetrun up``
stops (``AgentExited``: nothing would serve); with several, the others keep serving, the
scheduler declares it lost (its runs are requeued or preempted onto the others) and it is started
again with the same id once it has been (or after ``2 * node_loss_timeout_s``, if a scheduler
elsewhere leads: a new process with the same id holds no runs, so the attempts the log still
gives it are lost attempts then). On shutdown every agent gets SIGTERM at once and SIGKILL after
the grace period: bounded whatever their number.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import subprocess
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio

from contracts.agents import AgentHeartbeat
from runtime.control.gateway_pool import MANY_CORES, usable_cores
from runtime.control.providers import list_pipelines
from runtime.infra.catalog import Catalog
from runtime.infra.fleet import Fleet
from runtime.infra.natsserver import NatsServer
from runtime.up_children import (
    FENCED_EXIT,
    AgentExited,
    _banner,
    _exited,
    agent_command,
    agent_env,
    agent_identity,
)
from runtime.up_ready import pipelines_ready, pointer, registered

if TYPE_CHECKING:
    from runtime.up import UpOptions

log = logging.getLogger("jetrun")

#: from ``MANY_CORES`` usable cores, one local agent per this many (so 2 on the 16-core
#: machine's 14 cores beside the load generator); chosen from one 16-core measurement
#: (docs/architecture.md, "Local agents on many cores"): change it when a measurement says so
AGENT_CORES = 7
#: the most local agents the default picks (the scheduler's one event loop caps runs/s long
#: before more would pay)
MAX_AGENTS = 4
RESTART_AFTER_LOSS_TIMEOUTS = 2.0  # a dead agent comes back after this many loss timeouts


def default_agents(cpus: int | None = None) -> int:
    """Local agents for a machine with ``cpus`` cores (default: the cores this process may run
    on): 1 below ``MANY_CORES``; from there one per ``AGENT_CORES`` cores, 1 to
    ``MAX_AGENTS``."""
    cores = usable_cores() if cpus is None else cpus
    if cores < MANY_CORES:
        return 1
    return max(1, min(MAX_AGENTS, cores // AGENT_CORES))


def local_agent_ids(count: int, *, fresh: bool) -> list[str]:
    """``local-<host>``, plus a random part each where identities are minted here (``fresh``);
    without it where the operator minted them ahead: ``local-<host>``, ``local-<host>-2``,
    ... (``jetrun keys DIR --agent local-<host>-2``)."""
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:40] or "host"
    if fresh:
        return [f"local-{host}-{uuid.uuid4().hex[:6]}" for _ in range(count)]
    return [f"local-{host}" if i == 0 else f"local-{host}-{i + 1}" for i in range(count)]


class LocalAgent:
    """One local agent: its id, environment and current process."""

    def __init__(self, opts: UpOptions, agent_id: str, env: dict[str, str]) -> None:
        self.opts, self.agent_id, self.env = opts, agent_id, env
        self.proc = self.start()

    def start(self) -> subprocess.Popen[bytes]:
        self.proc = subprocess.Popen(
            agent_command(self.opts.modules, self.opts.slots, self.agent_id, self.opts.queue_depth),
            env=self.env,
        )
        return self.proc


async def serve_agents(
    opts: UpOptions,
    fleet: Fleet,
    catalog: Catalog,
    nats_url: str,
    server: NatsServer | None,
    stopping: anyio.Event,
) -> None:
    """Run ``opts.agents`` local agents until ``stopping``: the banner once all are ready;
    each restarted as the module docstring says; all stopped (bounded) on the way out.
    ``fleet``: this process's scheduler's (whether it has declared an agent lost);
    ``catalog``: where the agents' pipelines are looked up before the banner."""
    is_gone = fleet.is_gone
    embedded = server is not None
    ids = local_agent_ids(opts.agents, fresh=embedded or opts.credentials_dir is None)
    envs = [agent_env(nats_url, await agent_identity(opts, server, i)) for i in ids]
    agents: list[LocalAgent] = []
    try:
        for agent_id, env in zip(ids, envs, strict=True):
            agents.append(LocalAgent(opts, agent_id, env))  # each one stopped if the next fails
        beats = [await pipelines_ready(fleet, a.proc, a.agent_id, stopping) for a in agents]
        ready = [beat for beat in beats if beat is not None]
        if len(ready) < len(agents) or not await _registered(opts, catalog, ready, stopping):
            return
        data_dir = opts.data_dir if embedded else None
        _banner(opts.host, opts.port, nats_url, data_dir, opts.config, pointer(ready[0]))
        async with anyio.create_task_group() as tg:
            for agent in agents:
                tg.start_soon(_keep, agent, len(agents) > 1, stopping, is_gone)
    finally:
        with anyio.CancelScope(shield=True):
            await stop_all([a.proc for a in agents], opts.config.settings.shutdown_grace_s + 5.0)


async def _registered(
    opts: UpOptions, catalog: Catalog, beats: list[AgentHeartbeat], stopping: anyio.Event
) -> bool:
    deployed = await list_pipelines(opts.modules)
    return await registered(catalog, deployed, beats[0], stopping)


async def _keep(
    agent: LocalAgent, others: bool, stopping: anyio.Event, is_gone: Callable[[str], bool]
) -> None:
    """Keep ``agent`` running until ``stopping``; raises ``AgentExited`` if it exits by itself
    while it is the only one (``others`` False)."""
    settings = agent.opts.config.settings
    while True:
        code = await _exited(agent.proc, stopping)
        if code is None:
            return
        if code == FENCED_EXIT:
            log.warning("local agent %s was declared lost; starting it again", agent.agent_id)
        elif not others:
            raise AgentExited(f"the local agent exited with code {code}")
        else:
            log.error(
                "local agent %s exited with code %d; the others keep serving, and it starts "
                "again once it is declared lost",
                agent.agent_id,
                code,
            )
            within = RESTART_AFTER_LOSS_TIMEOUTS * settings.node_loss_timeout_s
            if not await _declared_lost(agent.agent_id, is_gone, within, stopping):
                return
        agent.start()


async def _declared_lost(
    agent_id: str, is_gone: Callable[[str], bool], within_s: float, stopping: anyio.Event
) -> bool:
    """Wait until ``is_gone(agent_id)`` or ``within_s`` seconds; False if stopping first."""
    with anyio.move_on_after(within_s):
        while not is_gone(agent_id):
            with anyio.move_on_after(0.2):
                await stopping.wait()
            if stopping.is_set():
                return False
    return not stopping.is_set()


async def stop_all(procs: list[subprocess.Popen[bytes]], grace: float) -> None:
    """SIGTERM (the agents' preemption notice) to every one at once, SIGKILL to those still
    running ``grace`` seconds later: bounded by ``grace`` whatever their number."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
    deadline = anyio.current_time() + grace
    for proc in procs:
        try:
            left = max(deadline - anyio.current_time(), 0.0)
            await anyio.to_thread.run_sync(proc.wait, left)
        except subprocess.TimeoutExpired:
            log.warning("local agent %d did not stop within %g s; killing it", proc.pid, grace)
            proc.kill()
            await anyio.to_thread.run_sync(proc.wait)


__all__ = ["AGENT_CORES", "MAX_AGENTS", "default_agents", "local_agent_ids", "serve_agents"]
