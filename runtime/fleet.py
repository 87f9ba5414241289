"""What the control plane knows about node agents, from their heartbeats.

Heartbeats are plain NATS messages on ``jetrun.agents.heartbeat.<agent_id>``. Liveness uses the
receiver's own (injected, monotonic) clock, never the sender's, so clock skew cannot kill a node.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from contracts.agents import AgentHeartbeat, PipelineStatus

HEARTBEAT_SUBJECT = "jetrun.agents.heartbeat"
DRAIN_SUBJECT = "jetrun.agents.drain"  # request: an agent received a preemption notice
RECALL_SUBJECT = "jetrun.agents.recall"  # request to ``.<agent_id>``: recall that node now

# Reasons on preempted/requeued events. Only the node-level ones mean the agent itself was
# declared lost; an attempt lost on a live agent leaves the agent in service.
NODE_LOST = "node_lost"
NODE_RECALLED = "node_preempted"
ATTEMPT_LOST = "attempt_lost"

heartbeat_decoder = msgspec.json.Decoder(AgentHeartbeat)


def declares_node_lost(reason: str) -> bool:
    return not reason.startswith(ATTEMPT_LOST)


@dataclass
class _Seen:
    beat: AgentHeartbeat | None
    last_seen: float


class Fleet:
    def __init__(self, monotonic: Callable[[], float], loss_timeout_s: float) -> None:
        self.monotonic = monotonic
        self.loss_timeout_s = loss_timeout_s
        self._agents: dict[str, _Seen] = {}
        self._gone: set[str] = set()

    def observe(self, beat: AgentHeartbeat) -> None:
        """Record a heartbeat. Heartbeats of an agent declared lost are ignored: it must come
        back under a new id."""
        if beat.agent_id not in self._gone:
            self._agents[beat.agent_id] = _Seen(beat, self.monotonic())

    def suspect(self, agent_id: str) -> None:
        """Start the loss clock for an agent known only from the log (it holds runs but has
        not been heard from since this process started)."""
        if agent_id not in self._agents and agent_id not in self._gone:
            self._agents[agent_id] = _Seen(None, self.monotonic())

    def refresh(self) -> None:
        """Restart every agent's loss clock (after this process was cut off from NATS)."""
        now = self.monotonic()
        for seen in self._agents.values():
            seen.last_seen = now

    def forget(self, agent_id: str) -> None:
        """Declare the agent lost for good."""
        self._agents.pop(agent_id, None)
        self._gone.add(agent_id)

    def is_gone(self, agent_id: str) -> bool:
        return agent_id in self._gone

    def expired(self) -> list[str]:
        """Agents silent for longer than the loss timeout, or that announced a drain."""
        cutoff = self.monotonic() - self.loss_timeout_s
        return [
            agent_id
            for agent_id, seen in self._agents.items()
            if seen.last_seen < cutoff or (seen.beat is not None and seen.beat.draining)
        ]

    def live(self) -> list[AgentHeartbeat]:
        cutoff = self.monotonic() - self.loss_timeout_s
        return [
            s.beat
            for s in self._agents.values()
            if s.beat is not None and s.last_seen >= cutoff and not s.beat.draining
        ]

    def heard_at(self, agent_id: str) -> float:
        """When the last heartbeat of ``agent_id`` arrived (this process's monotonic clock)."""
        seen = self._agents.get(agent_id)
        return seen.last_seen if seen is not None else float("-inf")

    def get(self, agent_id: str) -> AgentHeartbeat | None:
        seen = self._agents.get(agent_id)
        return seen.beat if seen is not None else None

    def serving(
        self, pointer: str, status: PipelineStatus = PipelineStatus.ready
    ) -> list[AgentHeartbeat]:
        """Live agents on which ``pointer`` has ``status``."""
        return [
            beat
            for beat in self.live()
            if any(p.pointer == pointer and p.status is status for p in beat.pipelines)
        ]

    def pipeline_states(self, pointer: str) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for beat in self.live():
            for p in beat.pipelines:
                if p.pointer == pointer:
                    counts[p.status.value] += 1
        return dict(counts)
