"""What the control plane knows about node agents, from their heartbeats.

Heartbeats are plain NATS messages on ``jetrun.agents.heartbeat.<agent_id>``. Liveness uses the
receiver's own (injected, monotonic) clock, never the sender's, so clock skew cannot kill a node.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import msgspec

from contracts.agents import AgentHeartbeat, PipelineStatus

HEARTBEAT_SUBJECT = "jetrun.agents.heartbeat"
DRAIN_SUBJECT = "jetrun.agents.drain"  # request to ``.<agent_id>``: it got a preemption notice
RECALL_SUBJECT = "jetrun.agents.recall"  # request to ``.<agent_id>``: recall that node now

# Reasons on preempted/requeued events. Only the node-level ones mean the agent itself was
# declared lost; an attempt lost on a live agent leaves the agent in service.
NODE_LOST = "node_lost"
NODE_RECALLED = "node_preempted"
ATTEMPT_LOST = "attempt_lost"

heartbeat_decoder = msgspec.json.Decoder(AgentHeartbeat)


def decode_heartbeat(subject: str, data: bytes) -> AgentHeartbeat:
    """The heartbeat published on ``subject``. An agent may publish only on its own subject
    (NATS permissions), so a beat naming another agent is a forgery: raises
    ``msgspec.ValidationError`` for it, ``msgspec.DecodeError`` for one that does not decode."""
    beat = heartbeat_decoder.decode(data)
    if subject != f"{HEARTBEAT_SUBJECT}.{beat.agent_id}":
        raise msgspec.ValidationError(f"a heartbeat of {beat.agent_id!r} on {subject}")
    return beat


def drain_subject(agent_id: str) -> str:
    return f"{DRAIN_SUBJECT}.{agent_id}"


def agent_of_drain(subject: str) -> str | None:
    """The agent a drain request on ``subject`` comes from (its subject's last token)."""
    prefix = f"{DRAIN_SUBJECT}."
    rest = subject[len(prefix) :] if subject.startswith(prefix) else ""
    return rest if rest and "." not in rest else None


def declares_node_lost(reason: str) -> bool:
    return not reason.startswith(ATTEMPT_LOST)


@dataclass
class _Seen:
    beat: AgentHeartbeat | None
    last_seen: float


@dataclass(frozen=True)
class FleetView:
    """The fleet as it stands at one instant (``mono``, the receiver's monotonic clock): what a
    decision pass reads. Pure: no clock, no I/O."""

    agents: Mapping[str, _Seen]
    gone: frozenset[str]
    recalled: frozenset[str]  # agents that sent a preemption notice (drain request)
    mono: float
    loss_timeout_s: float

    def _alive(self, seen: _Seen) -> bool:
        return seen.last_seen >= self.mono - self.loss_timeout_s

    def expired(self) -> list[str]:
        """Agents silent for longer than the loss timeout."""
        return [a for a, seen in self.agents.items() if not self._alive(seen)]

    def draining(self) -> list[str]:
        """Agents that announced a drain (a recall notice, or ``draining`` in a heartbeat)."""
        announced = [a for a, s in self.agents.items() if s.beat is not None and s.beat.draining]
        return sorted(self.recalled.union(announced))

    def live(self) -> list[AgentHeartbeat]:
        """Agents that may take new work: heard from in time, not draining, not recalled."""
        return [
            s.beat
            for a, s in self.agents.items()
            if s.beat is not None
            and self._alive(s)
            and not s.beat.draining
            and a not in self.recalled
        ]

    def heard_at(self, agent_id: str) -> float:
        """When the last heartbeat of ``agent_id`` arrived (the receiver's monotonic clock)."""
        seen = self.agents.get(agent_id)
        return seen.last_seen if seen is not None else float("-inf")

    def is_gone(self, agent_id: str) -> bool:
        return agent_id in self.gone

    def serving(
        self, pointer: str, status: PipelineStatus = PipelineStatus.ready
    ) -> list[AgentHeartbeat]:
        """Live agents on which ``pointer`` has ``status``."""
        return [
            beat
            for beat in self.live()
            if any(p.pointer == pointer and p.status is status for p in beat.pipelines)
        ]

    def startup_errors(self, pointer: str) -> dict[str, str]:
        """Live agents on which ``pointer``'s startup step raised: agent id -> the error."""
        return {
            beat.agent_id: p.error or "startup failed"
            for beat in self.live()
            for p in beat.pipelines
            if p.pointer == pointer and p.status is PipelineStatus.failed
        }

    def pipeline_states(self, pointer: str) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for beat in self.live():
            for p in beat.pipelines:
                if p.pointer == pointer:
                    counts[p.status.value] += 1
        return dict(counts)


class Fleet:
    """What heartbeats and drain requests said, on the receiver's monotonic clock. Read it
    through ``view()`` (one instant) or the shortcuts below (now)."""

    def __init__(self, monotonic: Callable[[], float], loss_timeout_s: float) -> None:
        self.monotonic = monotonic
        self.loss_timeout_s = loss_timeout_s
        self._agents: dict[str, _Seen] = {}
        self._gone: set[str] = set()
        self._gone_started: dict[str, float | None] = {}  # the incarnation declared lost
        self._recalled: set[str] = set()

    def observe(self, beat: AgentHeartbeat) -> bool:
        """Record a heartbeat; False if it was ignored. An agent declared lost is ignored until
        it comes back as a new process (restarted with the same id): the process that was
        declared lost exits once it learns so, and never takes work again."""
        agent_id = beat.agent_id
        if agent_id in self._gone:
            if not self._restarted(beat):
                return False
            self._gone.discard(agent_id)
            del self._gone_started[agent_id]
        self._agents[agent_id] = _Seen(beat, self.monotonic())
        return True

    def _restarted(self, beat: AgentHeartbeat) -> bool:
        lost = self._gone_started.get(beat.agent_id)
        if lost is not None:
            return beat.started_at != lost
        # declared lost before any of its heartbeats was heard here: a fresh process holds
        # no runs and does not drain (the lost one lists the runs it still holds, then drains)
        return not beat.running and not beat.draining

    def recall(self, agent_id: str) -> None:
        """The agent got a preemption notice: it takes no new work from now on."""
        self._recalled.add(agent_id)

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
        """Declare the agent lost: ignored until it restarts."""
        seen = self._agents.pop(agent_id, None)
        if agent_id not in self._gone:
            self._gone_started[agent_id] = seen.beat.started_at if seen and seen.beat else None
        self._recalled.discard(agent_id)
        self._gone.add(agent_id)

    def view(self) -> FleetView:
        """A snapshot at this instant. Copies the agent table (O(agents))."""
        agents = {a: _Seen(s.beat, s.last_seen) for a, s in self._agents.items()}
        return FleetView(
            agents=agents,
            gone=frozenset(self._gone),
            recalled=frozenset(self._recalled),
            mono=self.monotonic(),
            loss_timeout_s=self.loss_timeout_s,
        )

    def is_gone(self, agent_id: str) -> bool:
        return agent_id in self._gone

    def get(self, agent_id: str) -> AgentHeartbeat | None:
        seen = self._agents.get(agent_id)
        return seen.beat if seen is not None else None

    def expired(self) -> list[str]:
        return self.view().expired()

    def live(self) -> list[AgentHeartbeat]:
        return self.view().live()

    def heard_at(self, agent_id: str) -> float:
        return self.view().heard_at(agent_id)

    def serving(
        self, pointer: str, status: PipelineStatus = PipelineStatus.ready
    ) -> list[AgentHeartbeat]:
        return self.view().serving(pointer, status)

    def pipeline_states(self, pointer: str) -> dict[str, int]:
        return self.view().pipeline_states(pointer)
