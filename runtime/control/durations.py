"""How long a pipeline's attempts typically take, as the scheduler reads them in the log.

An attempt's duration runs from its ``dispatched`` to its end (``completed``, ``failed`` or
``timed_out``), by the events' own times: a replay of the log gives the same figures, and it
includes what the attempt waited at its agent (so it errs long). A cancelled, preempted or
requeued attempt tells nothing and is not counted. The typical duration is the median of the
pipeline's last ``SAMPLES`` attempts; unknown until one has ended. It decides whether a
pipeline's runs may wait in an agent's queue (``runtime.control.slots``).
"""

from __future__ import annotations

import statistics
from collections import deque

from contracts.events import AnyEvent, RunCompleted, RunDispatched, RunFailed, RunTimedOut
from contracts.run import RunRecord
from contracts.states import RunState

SAMPLES = 8  # recent attempts per pipeline the typical duration is the median of
_ENDS = (RunCompleted, RunFailed, RunTimedOut)


class AttemptDurations:
    """Fed every event the scheduler's index applies (``observe``), with the run it made."""

    def __init__(self) -> None:
        self._dispatched: dict[str, tuple[int, float]] = {}  # run -> (attempt, dispatched at)
        self._recent: dict[str, deque[float]] = {}  # pipeline -> its last durations
        self._typical: dict[str, float] = {}  # pipeline -> the median of ``_recent``

    def observe(self, event: AnyEvent, run: RunRecord) -> None:
        if run.state is RunState.running:
            if isinstance(event, RunDispatched) and event.attempt == run.attempt:
                self._dispatched[run.id] = (event.attempt, event.at)
            return
        began = self._dispatched.pop(run.id, None)
        if began is not None and isinstance(event, _ENDS) and event.attempt == began[0]:
            self._add(run.pipeline, max(event.at - began[1], 0.0))

    def typical(self, pipeline: str) -> float | None:
        """The median duration of ``pipeline``'s recent attempts (seconds); None if none
        has ended since this process began reading the log."""
        return self._typical.get(pipeline)

    def _add(self, pipeline: str, seconds: float) -> None:
        recent = self._recent.get(pipeline)
        if recent is None:
            recent = self._recent[pipeline] = deque(maxlen=SAMPLES)
        recent.append(seconds)
        self._typical[pipeline] = statistics.median(recent)
