"""Where a run can go in one decision pass: the free slots of live agents, then their queues.

A run goes to a live agent with its pipeline ready and a free slot of the kind it needs, the
freest first. Only when no agent has one may it go into an agent's queue room: the dispatches
an agent holds waiting for a busy CPU slot (``Accelerator.queue``), so that its next attempt
is already there when a slot frees instead of a log round trip later. Queue room is used only
- for CPU runs (GPU runs are long, and placed by GPU memory);
- for a run's first attempt (a requeued run waits for a real slot);
- for pipelines whose typical attempt (``runtime.control.durations``) is shorter than
  ``Settings.short_attempt_s`` (50 ms by default); unknown (none has ended yet): no room;
- while the run's expected wait there is under ``Settings.agent_queue_wait_s`` (20 ms by
  default): the runs ahead of it there (those the log says wait there, and one more, for the
  first slot to free) over the agent's drain rate (``runtime.control.durations``: how many CPU
  attempts it ended per second recently, until now, whatever their pipeline; unknown: no
  room; it falls while the agent ends nothing). An agent
  runs what it holds first come first served, so the run starts within about that long; a
  run the log still shows there that has ended counts as waiting, so the figure errs long.
  A long attempt holding one of its slots slows its drain, and so shortens its line.
Among agents with room, the one where the run would start soonest. A run waiting at an agent
is ``running``, ``waiting_for: worker``, until a worker takes it, with no queue position; the
bound is what it (and any other team's run behind it) waits there. A pipeline whose attempts
are long keeps its runs in the scheduler's queue, with exact positions, where any agent's
freed slot takes the head.
"""

from __future__ import annotations

from collections import Counter

import msgspec

from contracts.agents import AgentHeartbeat
from contracts.events import RunDispatched
from contracts.run import RunRecord
from runtime.control.passes import Decisions, Pass
from runtime.infra.fleet import FleetView

QUEUED_KIND = "cpu"  # the only slot kind whose agents' queues the scheduler fills
INLINE_INPUTS_BYTES = 64 * 1024  # inputs up to this size ride in the dispatch


class Slots:
    """The free slots and queue room of live agents in one pass: what is taken in the pass
    counts at once."""

    def __init__(self, p: Pass) -> None:
        self.fleet: FleetView = p.fleet
        self.kind = p.kind
        self.durations = p.work.durations
        self.short_s = p.config.settings.short_attempt_s
        self.wait_s = p.config.settings.agent_queue_wait_s
        self.now = p.now.wall
        self._queues: dict[str, bool] = {}  # pipeline -> whether its runs may use queue room
        self.used = _slots_in_use(p)

    def queues(self, pipeline: str) -> bool:
        """Whether runs of ``pipeline`` may wait in an agent's queue (see the module
        docstring)."""
        allowed = self._queues.get(pipeline)
        if allowed is None:
            typical = self.durations.typical(pipeline)
            allowed = self._queues[pipeline] = (
                typical is not None
                and typical < self.short_s
                and self.kind(pipeline) == QUEUED_KIND
            )
        return allowed

    def free(self, pipeline: str) -> int:
        """Runs of ``pipeline`` that can still be dispatched in this pass: free slots, and
        queue room where its runs may use it."""
        kind = self.kind(pipeline)
        room = self.queues(pipeline)
        return sum(
            max(a.slots(kind) + (_room(a, kind) if room else 0) - self.used[a.agent_id, kind], 0)
            for a in self.fleet.serving(pipeline)
        )  # at most: the bound on the wait there may leave some of the room unused

    def place(self, p: Pass, d: Decisions, run: RunRecord) -> bool:
        """Dispatch ``run`` to the agent with the most free slots for it, else (where it may)
        into the queue of the agent where it would start soonest; False if none has room (or
        the run already has a decision in this pass)."""
        kind = self.kind(run.pipeline)
        best = self._freest(run.pipeline, kind)
        if best is None and run.attempt <= 1 and self.queues(run.pipeline):
            best = self._soonest(run.pipeline, kind)
        if best is None or not d.add(dispatched(run, p.now.wall, best, kind)):
            return False
        self.used[best, kind] += 1
        return True

    def _freest(self, pipeline: str, kind: str) -> str | None:
        best, most = None, 0
        for agent in self.fleet.serving(pipeline):
            n = agent.slots(kind) - self.used[agent.agent_id, kind]
            if n > most:
                best, most = agent.agent_id, n
        return best

    def _soonest(self, pipeline: str, kind: str) -> str | None:
        """The agent with queue room where a run would start soonest, within the bound."""
        best, soonest = None, self.wait_s
        for agent in self.fleet.serving(pipeline):
            slots = agent.slots(kind)
            ahead = self.used[agent.agent_id, kind] - slots + 1
            # more ends than its slots: those may all end their first attempts at once
            rate = self.durations.drain_rate(agent.agent_id, kind, self.now, slots + 1)
            if ahead > _room(agent, kind) or rate is None:
                continue
            if ahead / rate < soonest:
                best, soonest = agent.agent_id, ahead / rate
        return best


def _room(agent: AgentHeartbeat, kind: str) -> int:
    """The dispatches of ``kind`` ``agent`` holds waiting for a slot (none without a slot)."""
    return agent.queue(kind) if agent.slots(kind) > 0 else 0


def _slots_in_use(p: Pass) -> Counter[tuple[str, str]]:
    """Per (agent, slot kind): its runs the log says are on it (running or waiting there)."""
    used: Counter[tuple[str, str]] = Counter()
    for beat in p.fleet.live():
        for pipeline, n in p.work.agent_load.get(beat.agent_id, {}).items():
            used[beat.agent_id, p.kind(pipeline)] += n
    return used


def dispatched(run: RunRecord, at: float, agent_id: str, slot: str) -> RunDispatched:
    """The dispatch of ``run``'s attempt, carrying its team, pipeline and inputs when they are
    small enough (the agent then runs it without reading the log)."""
    inline = len(msgspec.json.encode(run.inputs)) <= INLINE_INPUTS_BYTES
    return RunDispatched(
        run_id=run.id,
        at=at,
        attempt=run.attempt,
        agent_id=agent_id,
        slot=slot,
        team=run.team if inline else None,
        pipeline=run.pipeline if inline else None,
        inputs=run.inputs if inline else None,
        callback=run.callback_url is not None,
    )
