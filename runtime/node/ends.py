"""The ends of attempts an agent has ready at once, appended as one ``ended_runs`` event.

Under load several of an agent's attempts end in the same turn of its event loop (the replies
of several workers read together). Each would cost a publish, an ack, a stored message and a
delivery to every reader of the log; ``Ends.report`` puts the ends reported in the same turn
into one ``ended_runs`` event instead (``contracts.events.RunsEnded``), appended the way one
end is (``Reporter.report``: the first try unshielded, then retried shielded with the same
message id, which dedupes a retried batch). It waits for nothing more: the first end of a turn
lets the attempts already ready run (one loop step) and then appends what they added; an end
reported while no other attempt runs here (a sync run's) is appended at once, as a plain
event. A batch of one is a plain event too, and so is an end that would make the batch larger
than ``ENDED_BYTES`` (or the node's largest event): ends carry outputs, and a message must
stay under nats-server's ``max_payload``. The ends of runs with a callback URL never come here
(they go where the webhook outbox reads them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import anyio
import anyio.lowlevel
import msgspec

from contracts.events import ENDED_RUNS_ID, Event, RunCompleted, RunFailed, RunsEnded, RunTimedOut

End = RunCompleted | RunFailed | RunTimedOut
ENDS_PER_EVENT = 256  # ends per ``ended_runs`` event
ENDED_BYTES = 256 * 1024  # bytes of one ``ended_runs`` event (the node's largest event if less)
_HEAD_BYTES = 256  # the batch's own fields around its entries (a bound, with its agent id)
_encode = msgspec.json.Encoder().encode


class Reports(Protocol):
    """What ``Ends`` appends through (``runtime.node.attempts.Reporter``)."""

    async def report(self, event: Event, payload: bytes | None = None) -> None: ...


@dataclass(eq=False)
class _Batch:
    ends: list[End]
    payloads: list[bytes]
    size: int
    done: anyio.Event = field(default_factory=anyio.Event)


class Ends:
    """Appends attempts' ends, batched per turn of the loop (see the module docstring).
    ``running``: the attempts running on this node now (the one ending included).
    ``batching``: whether ends may go in a batch now (no scheduler of a release before batches
    heard lately: ``runtime.infra.peers``)."""

    def __init__(
        self,
        reporter: Reports,
        agent_id: str,
        max_event_bytes: Callable[[], int],
        running: Callable[[], int],
        batching: Callable[[], bool] = lambda: True,
    ) -> None:
        self.reporter, self.agent_id = reporter, agent_id
        self.max_event_bytes, self.running = max_event_bytes, running
        self.batching = batching
        self._open: _Batch | None = None  # the batch of this turn, not yet appended
        self._agent = _encode(agent_id)

    def _limit(self) -> int:
        return min(ENDED_BYTES, self.max_event_bytes()) - _HEAD_BYTES - len(self._agent)

    async def report(self, end: End, payload: bytes) -> None:
        """Append ``end`` (encoded: ``payload``), alone or in this turn's batch; returns once
        the append that carries it returned (stored, or given up on as ``Reporter.report``
        does)."""
        batch = self._open
        size = len(payload) + 1
        if batch is not None:
            if len(batch.ends) < ENDS_PER_EVENT and batch.size + size <= self._limit():
                batch.ends.append(end)
                batch.payloads.append(payload)
                batch.size += size
                await _outcome(batch)
                return
        elif self.running() > 1 and size <= self._limit() and self.batching():
            batch = self._open = _Batch([end], [payload], size)
            try:  # the attempts ready in this turn report theirs meanwhile
                await anyio.lowlevel.checkpoint()
            finally:
                self._open = None
                await self._append(batch)  # cancelled: appended shielded, as a lone end is
            return
        await self.reporter.report(end, payload)  # too large, the batch full, or no other

    async def _append(self, batch: _Batch) -> None:
        try:
            if len(batch.ends) == 1:
                await self.reporter.report(batch.ends[0], batch.payloads[0])
                return
            event = RunsEnded(
                run_id=ENDED_RUNS_ID, at=batch.ends[0].at, agent_id=self.agent_id, ends=batch.ends
            )
            await self.reporter.report(event, self._encoded(event, batch.payloads))
        finally:
            batch.done.set()

    def _encoded(self, event: RunsEnded, payloads: list[bytes]) -> bytes:
        """``encode_event(event)``, from its entries' encodings already made."""
        return b"".join(
            (
                b'{"event":"ended_runs","run_id":"',
                ENDED_RUNS_ID.encode(),
                b'","at":',
                _encode(event.at),
                b',"agent_id":',
                self._agent,
                b',"ends":[',
                b",".join(payloads),
                b"]}",
            )
        )


async def _outcome(batch: _Batch) -> None:
    """Wait until ``batch`` was appended (or given up on); cancelled meanwhile, wait all the
    same (shielded: its append is under way, as a lone end's would be), then raise."""
    try:
        await batch.done.wait()
    except anyio.get_cancelled_exc_class():
        with anyio.CancelScope(shield=True):
            await batch.done.wait()
        raise


__all__ = ["ENDED_BYTES", "ENDS_PER_EVENT", "Ends"]
