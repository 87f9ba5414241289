"""Which runs ended (cancelled, or requeued/preempted off this agent) where in the log.

An agent reads its dispatches and the ends of runs on separate consumers (so NATS permissions can
keep each agent to its own dispatches), and those arrive in no common order: a cancellation
appended after a dispatch may be handled first. A dispatch older in the log than its run's end
must not start. Pure and bounded: the newest ``capacity`` runs are remembered.
"""

from __future__ import annotations

from collections import OrderedDict


class EndedRuns:
    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self._ended: OrderedDict[str, int] = OrderedDict()  # run id -> log sequence of its end

    def note(self, run_id: str, seq: int) -> None:
        """``run_id`` ended (for this agent) at log sequence ``seq``."""
        if seq <= self._ended.get(run_id, 0):
            return
        self._ended[run_id] = seq
        self._ended.move_to_end(run_id)
        while len(self._ended) > self.capacity:
            self._ended.popitem(last=False)

    def ended_after(self, run_id: str, seq: int) -> bool:
        """Whether the run ended later in the log than ``seq`` (a dispatch there is stale)."""
        return self._ended.get(run_id, 0) > seq

    def __len__(self) -> int:
        return len(self._ended)
