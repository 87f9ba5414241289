"""What a pipeline's queue was told (``queue_waiting`` events), kept once for the queue.

A queue's event applies to every run waiting in that queue where it stands in the log (the
machine's rule 8). Applying it to each queued run when it is read would cost O(queue) per
fleet change; instead ``QueueLog`` keeps the queue's events and a queued run takes them on when
it is read: the events after the run's own last event, folded by the machine's ``evolve``.

Folding every such event would cost O(events since then) per read. What a chain of queue events
does to a run depends on few of them: its ``waiting_for`` is the last one's; its
``updated_at`` moves to the latest ``at``; its ``resources_since`` is cleared by an event that
waits for something other than a replica (a reset), set by the first event after that which
waits for a replica (a fill) if unset, and kept by one that waits for cancellation. So the run
after the whole chain is the run after at most four of them, in log order: the last reset, the
first fill after it (or after the run's last event if no reset came since), the one with the
latest ``at`` and the last one. Each is found by bisection: O(log n) per read, O(1) amortised
per event.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right

from contracts.events import QueueWaitChanged
from contracts.machine import WAITS_FOR_A_REPLICA, evolve
from contracts.run import RunRecord
from contracts.states import WaitingFor


class QueueLog:
    """One pipeline's ``queue_waiting`` events in log order, with what reads need to find."""

    def __init__(self) -> None:
        self.seqs: list[int] = []
        self.events: list[QueueWaitChanged] = []
        self._resets: list[int] = []  # indices of events that end a wait for a replica
        self._fills: list[int] = []  # indices of events that wait for a replica
        self._peaks: list[int] = []  # indices whose ``at`` is later than every one after them

    def __len__(self) -> int:
        return len(self.seqs)

    def append(self, seq: int, event: QueueWaitChanged) -> None:
        index = len(self.seqs)
        self.seqs.append(seq)
        self.events.append(event)
        if event.waiting_for in WAITS_FOR_A_REPLICA:
            self._fills.append(index)
        elif event.waiting_for is not WaitingFor.cancellation:
            self._resets.append(index)
        peaks = self._peaks
        while peaks and self.events[peaks[-1]].at <= event.at:
            peaks.pop()
        peaks.append(index)

    def after(self, seq: int) -> list[QueueWaitChanged]:
        """The events (at most four) that give a run queued since before ``seq`` and not
        changed by its own events since what all the events after ``seq`` give it."""
        first = bisect_right(self.seqs, seq)
        last = len(self.seqs) - 1
        if first > last:
            return []
        chosen = {last, self._peaks[bisect_left(self._peaks, first)]}
        start = first
        if self._resets and self._resets[-1] >= first:
            chosen.add(self._resets[-1])
            start = self._resets[-1] + 1
        fill = bisect_left(self._fills, start)
        if fill < len(self._fills):
            chosen.add(self._fills[fill])
        return [self.events[i] for i in sorted(chosen)]

    def newer_than(self, seq: int) -> bool:
        return bool(self.seqs) and self.seqs[-1] > seq

    def apply(self, run: RunRecord, since: int) -> RunRecord:
        """``run`` (its last own event at ``since``) after its queue's events since then."""
        for event in self.after(since):
            run = evolve(run, event)
        return run
