"""How long a pipeline's attempts typically take, and how fast each agent ends attempts, as the
scheduler reads them in the log.

An attempt's duration is what its worker ran it: a ``completed`` says so (``ran_s``, by the
agent's clock, without what the attempt waited at its agent for a slot). An end that does not
(``failed``, ``timed_out``, a ``completed`` from an older agent) counts from its ``dispatched``
to the end, by the events' own times, which includes any wait at the agent (so it errs long). A
cancelled, preempted or requeued attempt tells nothing and is not counted. The typical duration
is the median of the pipeline's last ``SAMPLES`` attempts; unknown until one has ended. It
decides whether a pipeline's runs may wait in an agent's queue (``runtime.control.slots``).

An agent's drain rate is how many attempts of a slot kind it ended per second, from the first
of its last ``DRAIN_SAMPLES`` ends of that kind until now (by the ends' own times, whatever
their pipeline): when all its slots are busy, about how fast the runs waiting there reach a
slot. Counting until now, not until its last end, makes it fall while an agent ends nothing
(its slots held by attempts that turned long). It bounds how many runs may wait there
(``runtime.control.slots``). Both are the same after a replay of the log.
"""

from __future__ import annotations

import statistics
from collections import deque
from typing import cast

from contracts.events import AnyEvent, RunCompleted, RunDispatched, RunFailed, RunTimedOut
from contracts.run import RunRecord
from contracts.states import RunState

SAMPLES = 8  # recent attempts per pipeline the typical duration is the median of
DRAIN_SAMPLES = 32  # recent ends per agent and slot kind its drain rate is measured over
MAX_AGENTS = 1024  # agents whose ends are kept (the first seen is forgotten past it)
_ENDS = frozenset({RunCompleted, RunFailed, RunTimedOut})  # kinds, tested by identity
_RUNNING = RunState.running


class AttemptDurations:
    """Fed every event the scheduler's index applies (``observe``), with the run it made."""

    def __init__(self) -> None:
        # run -> (attempt, dispatched at, agent, slot kind)
        self._dispatched: dict[str, tuple[int, float, str, str]] = {}
        self._recent: dict[str, deque[float]] = {}  # pipeline -> its last durations
        self._typical: dict[str, float] = {}  # pipeline -> the median of ``_recent``
        self._ends: dict[tuple[str, str], deque[float]] = {}  # (agent, kind) -> its last ends

    def observe(self, event: AnyEvent, run: RunRecord) -> None:
        kind = type(event)  # identity tests: ``isinstance`` walks the class's bases
        if run.state is _RUNNING:
            if kind is RunDispatched:
                sent = cast(RunDispatched, event)
                if sent.attempt == run.attempt:
                    self._dispatched[run.id] = (sent.attempt, sent.at, sent.agent_id, sent.slot)
            return
        if not self._dispatched:
            return
        began = self._dispatched.pop(run.id, None)
        if began is None or kind not in _ENDS or event.attempt != began[0]:  # type: ignore[union-attr]
            return
        ran = event.ran_s if kind is RunCompleted else None  # type: ignore[union-attr]
        self._add(run.pipeline, max(event.at - began[1], 0.0) if ran is None else ran)
        self._ended(began[2], began[3], event.at)

    def typical(self, pipeline: str) -> float | None:
        """The median duration of ``pipeline``'s recent attempts (seconds); None if none
        has ended since this process began reading the log."""
        return self._typical.get(pipeline)

    def drain_rate(self, agent_id: str, kind: str, now: float, min_ends: int = 2) -> float | None:
        """Attempts of slot ``kind`` ``agent_id`` ended per second from the first of its
        recent ends until ``now`` (Unix seconds; an agent's clock ahead of ``now``: until its
        last end); None until ``min_ends`` (at least 2, at most ``DRAIN_SAMPLES``) have ended
        at distinct times. Ask for one more end than the agent has slots: its slots may end
        their first attempts all at once, and ends closer together than one attempt's length
        would read as a pace it cannot keep."""
        ends = self._ends.get((agent_id, kind))
        if ends is None or len(ends) < min(max(min_ends, 2), DRAIN_SAMPLES):
            return None
        span = max(now, max(ends)) - min(ends)
        return (len(ends) - 1) / span if span > 0 else None

    def _add(self, pipeline: str, seconds: float) -> None:
        recent = self._recent.get(pipeline)
        if recent is None:
            recent = self._recent[pipeline] = deque(maxlen=SAMPLES)
        recent.append(seconds)
        self._typical[pipeline] = statistics.median(recent)

    def _ended(self, agent_id: str, kind: str, at: float) -> None:
        ends = self._ends.get((agent_id, kind))
        if ends is None:
            if len(self._ends) >= MAX_AGENTS:
                del self._ends[next(iter(self._ends))]
            ends = self._ends[agent_id, kind] = deque(maxlen=DRAIN_SAMPLES)
        ends.append(at)
