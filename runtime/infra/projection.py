"""Read models built from the event log: every run's record and every pipeline's queue.

``RunIndex.apply(seq, event)`` is the only way in; it is pure bookkeeping (no I/O), so every
process that tails the log holds the same index at the same sequence, and it can be rebuilt from
the stream at any time. Queue positions are exact and cost O(log n) to read: each queue is a
sorted list of tickets ``(group, seq, index)``; requeued runs (group 0) go before fresh ones
(group 1), each group in log order (``index``: a run's place in the ``queued_runs`` batch that
queued it, 0 for a run queued by an event of its own).
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable, Iterator, Mapping

import msgspec
from sortedcontainers import SortedList

from contracts.events import (
    AnyEvent,
    QueueWaitChanged,
    RunRequeued,
    RunRestated,
    RunsDispatched,
    RunsEnded,
    RunsQueued,
    ended_by,
)
from contracts.machine import evolve
from contracts.run import RunRecord
from contracts.states import RunState
from runtime.infra.index_waits import IndexLagging, IndexWaits
from runtime.infra.queue_log import QueueLog
from runtime.infra.waits import wake

Ticket = tuple[int, int, int]  # (group, sequence, index in its batch)
COMPACT_AFTER = 1024  # queue events kept per queue before its queued runs take them on
Listener = Callable[[int, AnyEvent, RunRecord | None, RunRecord], None]
NewListener = Callable[[int, AnyEvent, RunRecord], None]
EndListener = Callable[[RunRecord], None]
Forgetter = Callable[[RunRecord], None]
QueueListener = Callable[[int, QueueWaitChanged, list[str]], None]


class QueueStats(msgspec.Struct, frozen=True, kw_only=True):
    pipeline: str
    depth: int
    oldest_ticket_seq: int | None


class IndexStats(msgspec.Struct, frozen=True, kw_only=True):
    last_seq: int
    runs: int
    active: int
    queues: list[QueueStats]


class Records(Mapping[str, RunRecord]):
    """Every held run as it stands now: a queued run is read with its queue's events since its
    own last event taken on (``QueueLog``), so a queue's event changes no stored record."""

    def __init__(self, index: RunIndex) -> None:
        self._index = index

    def __getitem__(self, run_id: str) -> RunRecord:
        return self._index.read(run_id)

    def __iter__(self) -> Iterator[str]:
        return iter(self._index.stored)

    def __len__(self) -> int:
        return len(self._index.stored)

    def __contains__(self, run_id: object) -> bool:
        return run_id in self._index.stored

    def pop(self, run_id: str) -> RunRecord:
        """Drop a run from the index (as if it had not been read)."""
        return self._index.current(self._index.stored.pop(run_id))


class RunIndex(IndexWaits):
    """In-memory projection of the event log. Not thread-safe; one event loop owns it."""

    def __init__(self) -> None:
        super().__init__()  # the waits (``IndexWaits``)
        self.last_seq = 0
        # each run as its own events left it; ``records`` reads it with its queue's events
        self.stored: dict[str, RunRecord] = {}
        self.records = Records(self)
        self._queue_logs: dict[str, QueueLog] = {}  # pipeline -> its queue's events
        self._queue_listeners: list[QueueListener] = []
        self._queues: dict[str, SortedList] = defaultdict(SortedList)
        self._tickets: dict[str, Ticket] = {}
        self._by_ticket: dict[Ticket, str] = {}
        self.on_agent: dict[str, set[str]] = defaultdict(set)
        self._listeners: list[Listener] = []
        self._new_listeners: list[NewListener] = []
        self._end_listeners: list[EndListener] = []
        self._forgetters: list[Forgetter] = []
        # held run -> (sequence, time) of its first event here (log order: a restated run moves
        # to the end), and the sequence of its last event (a restatement expects it)
        self._first: dict[str, tuple[int, float]] = {}
        self._last_of: dict[str, int] = {}
        # run -> the sequence of its last event on its own subjects, while its last event is
        # a batch (``queued_runs``, ``dispatched_runs``: not on them): what a restatement expects
        self._own_last: dict[str, int] = {}
        self._ended: deque[str] = deque()  # runs that ended, in log order, until forgotten
        self._queue_events: dict[str, int] = {}  # pipeline -> its queue's last event (seq)
        self._synced: dict[str, int] = {}  # queued run -> the queue event its record includes

    # --- writing -----------------------------------------------------------------------------

    def listen(self, listener: Listener) -> None:
        """Call ``listener(seq, event, before, after)`` after every event that changed a run."""
        self._listeners.append(listener)

    def listen_new(self, listener: NewListener) -> None:
        """Call ``listener(seq, event, run)`` after the first event of a run held here (its
        ``submitted``, or the ``restated`` it was first read from), after the ``listen``-ers:
        for what only a run's beginning concerns, without a call for each of its events."""
        self._new_listeners.append(listener)

    def listen_ended(self, listener: EndListener) -> None:
        """Call ``listener(run)`` after the event that ended a run, after the ``listen``-ers and
        the ``listen_new``-ers."""
        self._end_listeners.append(listener)

    def listen_queue(self, listener: QueueListener) -> None:
        """Call ``listener(seq, event, queued)`` after every queue event, with the ids of the
        runs it applies to (that queue's, head first). Per-run listeners do not hear it: the
        runs' stored records do not change (``records`` reads them with it)."""
        self._queue_listeners.append(listener)

    def start_at(self, seq: int) -> None:
        """Start an empty index at ``seq``: the log is read from ``seq + 1`` on (a replay from a
        checkpoint). A run whose first event comes before that is not in the index."""
        if self.stored or self.last_seq:
            raise ValueError("start_at is for an empty index")
        self.last_seq = max(seq, 0)

    def on_forget(self, forgetter: Forgetter) -> None:
        """Call ``forgetter(run)`` for every ended run that ``forget_ended`` drops."""
        self._forgetters.append(forgetter)

    def apply(self, seq: int, event: AnyEvent, batched: int = -1) -> RunRecord | None:
        """Apply the event stored at ``seq``; sequences already applied are skipped. Returns
        the run if the event changed it. (``batched``, internal: the index in a batch
        (``queued_runs``, ``dispatched_runs``) of the run's event it stands for, applied at the
        batch's ``seq``; one function, not a call more, on the path of every event.)"""
        if batched < 0:
            if seq <= self.last_seq:
                return None
            self.last_seq = seq
            kind = type(event)  # an identity test: ``isinstance`` walks the class's bases
            if kind is QueueWaitChanged:
                self._apply_to_queue(seq, event)  # type: ignore[arg-type]
                if self._seq_waiters:
                    self._wake_seq_waiters()
                return None
            if kind is RunsQueued or kind is RunsDispatched:  # each run's own, in order
                for index, one in enumerate(event.each()):  # type: ignore[union-attr]
                    self.apply(seq, one, index)
                if self._seq_waiters:
                    self._wake_seq_waiters()
                return None
            if kind is RunsEnded:  # each end, to a run whose attempt went to its agent
                for index, one in enumerate(event.ends):  # type: ignore[union-attr]
                    held = self.stored.get(one.run_id)
                    if held is not None and ended_by(held.agent_id, event):  # type: ignore[arg-type]
                        self.apply(seq, one, index)
                if self._seq_waiters:
                    self._wake_seq_waiters()
                return None
        run_id = event.run_id
        held = self.stored.get(run_id)
        if held is None:
            before = None
            base = RunRecord(id=run_id)
        else:  # a queued run is read with its queue's events
            before = base = held if held.state is not RunState.queued else self.current(held)
        after = evolve(base, event)
        if before is not None:
            if batched < 0:
                if self._own_last and run_id in self._own_last:
                    del self._own_last[run_id]
            elif run_id not in self._own_last:
                self._own_last[run_id] = self._last_of[run_id]
            self._last_of[run_id] = seq
            if isinstance(event, RunRestated):  # its older events are no longer needed
                del self._first[run_id]
                self._first[run_id] = (seq, event.at)
        if after is base:
            if before is not None and before is not held:  # its queue's events, taken on now
                self.stored[run_id] = before
            if self._seq_waiters:
                self._wake_seq_waiters()
            return None
        self.stored[run_id] = after
        if before is None:
            self._first[run_id] = (seq, event.at)
            self._last_of[run_id] = seq
        ended = after.state.is_terminal and (before is None or not before.state.is_terminal)
        if ended:
            self._ended.append(run_id)
        self._reindex(seq, event, before, after, batched)
        # the run's waiters (a request waiting for its end) are woken before the listeners'
        # tasks (the scheduler's next pass), so an answer does not wait behind that pass
        if (waiters := self._changed.pop(run_id, None)) and (left := wake(waiters, after)):
            self._changed[run_id] = left
        for listener in self._listeners:
            listener(seq, event, before, after)
        if before is None:
            for new in self._new_listeners:
                new(seq, event, after)
        if ended:
            for end in self._end_listeners:
                end(after)
        if self._seq_waiters:
            self._wake_seq_waiters()
        return after

    def _apply_to_queue(self, seq: int, event: QueueWaitChanged) -> None:
        """A queue's event applies to every run in that queue (the machine's rule 8): kept once
        for the queue and taken on by each run when it is read, so it costs O(1) however long
        the queue (no run is touched, and no event per run is in the log)."""
        self._queue_events[event.pipeline] = seq
        queue = self._queues.get(event.pipeline)
        if not queue:
            self._queue_logs.pop(event.pipeline, None)  # no run waits: nobody takes it on
            return
        log = self._queue_logs.get(event.pipeline)
        if log is None:
            log = self._queue_logs[event.pipeline] = QueueLog()
        elif len(log) >= COMPACT_AFTER:
            self._compact(event.pipeline)
            log = self._queue_logs[event.pipeline] = QueueLog()
        log.append(seq, event)
        if self._queue_listeners:
            queued = self.queued(event.pipeline)
            for listener in self._queue_listeners:
                listener(seq, event, queued)
        for run_id in list(self._changed):  # O(waiters): those waiting on a run of the queue
            run = self.stored.get(run_id)
            if run is None or run.pipeline != event.pipeline or run.state is not RunState.queued:
                continue
            if left := wake(self._changed.pop(run_id), self.current(run)):
                self._changed[run_id] = left

    def _compact(self, pipeline: str) -> None:
        """Store every queued run of ``pipeline`` as its queue's events left it, so that those
        events can go: once per ``COMPACT_AFTER`` events of a queue, O(1) amortised."""
        upto = self._queue_logs[pipeline].seqs[-1]
        for run_id in self.queued(pipeline):
            self.stored[run_id] = self.current(self.stored[run_id])
            self._synced[run_id] = upto

    def read(self, run_id: str) -> RunRecord:
        """The run as it stands now; a queued run that took on its queue's events is stored so
        (a cache: the next read of it is a lookup)."""
        run = self.stored[run_id]
        now = self.current(run)
        if now is not run:
            self.stored[run_id] = now
            self._synced[run_id] = self._queue_logs[now.pipeline].seqs[-1]
        return now

    def current(self, run: RunRecord) -> RunRecord:
        """``run`` (a stored record) with its queue's events since its own last event."""
        if run.state is not RunState.queued:
            return run
        log = self._queue_logs.get(run.pipeline)
        if log is None:
            return run
        since = max(self._last_of.get(run.id, 0), self._synced.get(run.id, 0))
        return log.apply(run, since) if log.newer_than(since) else run

    def skip(self, seq: int) -> None:
        """Move past ``seq``, a message that is not an event this release knows (a newer kind
        during a rolling upgrade): waiters for that sequence are not left hanging."""
        if seq > self.last_seq:
            self.last_seq = seq
            self._wake_seq_waiters()

    def _reindex(
        self, seq: int, event: AnyEvent, before: RunRecord | None, after: RunRecord, index: int
    ) -> None:
        was_queued = before is not None and before.state is RunState.queued
        if after.state is RunState.queued and not was_queued:
            group = 0 if isinstance(event, RunRequeued) else 1
            ticket = (group, seq, index if index > 0 else 0)
            place = event.queue_ticket if isinstance(event, RunRestated) else None
            if place is not None and len(place) in (2, 3):  # its place in the queue, kept
                ticket = (place[0], place[1], place[2] if len(place) == 3 else 0)
            self._enqueue(after, ticket)
        elif was_queued and after.state is not RunState.queued:
            self._dequeue(after)
        if before is not None and before.agent_id and before.agent_id != after.agent_id:
            self.on_agent[before.agent_id].discard(after.id)
        if after.agent_id and after.state is RunState.running:
            self.on_agent[after.agent_id].add(after.id)
        elif after.agent_id:
            self.on_agent[after.agent_id].discard(after.id)

    def _enqueue(self, run: RunRecord, ticket: Ticket) -> None:
        self._queues[run.pipeline].add(ticket)
        self._tickets[run.id] = ticket
        self._by_ticket[ticket] = run.id

    def _dequeue(self, run: RunRecord) -> None:
        ticket = self._tickets.pop(run.id, None)
        if ticket is not None:
            queue = self._queues[run.pipeline]
            queue.discard(ticket)
            del self._by_ticket[ticket]
            self._synced.pop(run.id, None)
            if not queue:
                self._queue_logs.pop(run.pipeline, None)

    def forget_ended(self, before: float, may: Callable[[str], bool] | None = None) -> int:
        """Drop runs that ended (by their last event's time) before ``before``, oldest first,
        stopping at the first that ``may`` refuses (a run whose view is not stored yet).
        Returns how many were dropped. Live state is bounded by live runs, not history."""
        dropped = 0
        while self._ended:
            run = self.records.get(self._ended[0])
            if run is not None and run.updated_at >= before:
                break
            if run is not None and may is not None and not may(run.id):
                break
            self._ended.popleft()
            if run is None or not run.is_terminal:
                continue
            del self.stored[run.id]
            self._first.pop(run.id, None)
            self._last_of.pop(run.id, None)
            self._own_last.pop(run.id, None)
            self._changed.pop(run.id, None)
            for forgetter in self._forgetters:
                forgetter(run)
            dropped += 1
        return dropped

    def replay_from(self) -> int:
        """Where a process starting now may begin reading the log and hold what this index
        holds: the first event of the oldest run held, or the next sequence if none is held."""
        for seq, _ in self._first.values():  # insertion (log) order: the first is the oldest
            return seq
        return self.last_seq + 1

    def restatable(self, before: float, limit: int) -> list[tuple[RunRecord, int]]:
        """Up to ``limit`` live runs whose first event here is older than ``before``, oldest
        first, each with the sequence of its last event on its own subjects (a restatement
        expects it there; a batch is not on them): the runs to restate before
        their events age out of the log. Ended runs are skipped (their views are stored)."""
        due: list[tuple[RunRecord, int]] = []
        for run_id, (_, at) in self._first.items():  # log order: stops at the first young one
            if at >= before or len(due) >= limit:
                break
            run = self.records[run_id]
            if not run.is_terminal:
                due.append((run, self._own_last.get(run_id, self._last_of[run_id])))
        return due

    def last_seq_of(self, run_id: str) -> int | None:
        """The sequence of the last event of ``run_id`` read here; None unless it is held."""
        return self._last_of.get(run_id)

    def ticket(self, run_id: str) -> Ticket | None:
        """The run's place in its queue; None unless it is queued."""
        return self._tickets.get(run_id)

    # --- reading -----------------------------------------------------------------------------

    def get(self, run_id: str) -> RunRecord | None:
        """The run as it stands now, or None: a membership test first, not ``Mapping.get``'s
        KeyError raised and caught for a run not held (every new submission asks)."""
        return self.read(run_id) if run_id in self.stored else None

    def queue_position(self, run_id: str) -> int | None:
        """Runs of the same queue waiting ahead of ``run_id``; ``None`` unless it is queued."""
        ticket = self._tickets.get(run_id)
        if ticket is None:
            return None
        run = self.records[run_id]
        return int(self._queues[run.pipeline].bisect_left(ticket))

    def queue_depth(self, pipeline: str) -> int:
        return len(self._queues.get(pipeline, ()))

    def queued(self, pipeline: str, limit: int | None = None) -> list[str]:
        """The first ``limit`` waiting runs of ``pipeline``'s queue, head first."""
        queue = self._queues.get(pipeline)
        if not queue:
            return []
        stop = len(queue) if limit is None else min(limit, len(queue))
        return [self._by_ticket[t] for t in queue.islice(0, stop)]

    def queue_version(self, pipeline: str) -> int:
        """The later of the last ``queue_waiting`` of ``pipeline`` read and the event that
        queued its head (0: neither): what a new ``queue_waiting`` follows. Every queue event
        after the head was queued is read (a replay starts before the head's first event), so
        a needed change never takes the id of an earlier one."""
        queue = self._queues.get(pipeline)
        head = queue[0][1] if queue else 0
        return max(self._queue_events.get(pipeline, 0), head)

    def pipelines_with_queue(self) -> list[str]:
        return [p for p, q in self._queues.items() if q]

    def any_queued(self) -> bool:
        """Whether any run waits in a queue (``pipelines_with_queue`` without the list, for a
        check made at every run's end)."""
        return any(self._queues.values())

    def statistics(self) -> IndexStats:
        queues = [
            QueueStats(pipeline=p, depth=len(q), oldest_ticket_seq=q[0][1] if q else None)
            for p, q in sorted(self._queues.items())
            if q
        ]
        active = sum(1 for r in self.stored.values() if not r.is_terminal)
        return IndexStats(
            last_seq=self.last_seq, runs=len(self.records), active=active, queues=queues
        )


__all__ = [
    "COMPACT_AFTER",
    "IndexLagging",
    "IndexStats",
    "QueueStats",
    "Records",
    "RunIndex",
    "Ticket",
]
