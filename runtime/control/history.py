"""Every run a team has had, durably, newest first: the index behind ``GET /v4/runs``.

The stream ``JETRUN_LISTING`` holds one ``Listed`` entry per run, numbered ``n`` from 1 per
team in the order the event log recorded their submission. The leading scheduler writes each
entry once (``HistoryWriter``, fed by its index as it reads ``submitted`` events), a team's
entries in log order, in blocks: each step, one message per team and up to ``BLOCK`` runs (a
JSON array, oldest first) on ``jetrun.listing.<team>.<n>``, ``n`` the number of its last entry
(an earlier release wrote one entry, a JSON object, per message; both are read alike). Each
block is published with ``Nats-Expected-Last-Sequence`` = the stream's last message when its
writer read the team's newest entry (or stored its own last block): stored only if nothing was
stored in ``JETRUN_LISTING`` since, so two writers can never give one number to two runs, and
none is skipped. nats-server checks that against one number it keeps; an earlier release
expected the team's newest message over ``jetrun.listing.<team>.>``, which nats-server finds by
visiting every subject under it (one per block: a cost per block that grew with the team's
history). Both checks hold together while writers of both releases run.

Reading needs no consumer and holds nothing in memory: the newest number of a team is one
direct get (the last message on ``jetrun.listing.<team>.>``), the oldest one kept another (the
first at or after sequence 1), and a block a third, exact one. A page walks ``n`` down from its
cursor, a few gets at a time (``entries``; the block holding a cursor's number ends at most
``BLOCK - 1`` above it). Entries are kept as long as the run views are (``views_max_age_s``,
applied by ``jetrun admin apply-retention``). The ``seq`` each entry carries orders it against
runs still in memory (``runtime.control.listing``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import NamedTuple

import anyio
import msgspec
from nats.js import JetStreamContext
from nats.js.errors import BadRequestError, NotFoundError

from contracts.events import AnyEvent, RunSubmitted
from contracts.names import check_token
from contracts.run import RunRecord
from runtime.infra import jspub
from runtime.infra.eventlog import PUBLISH_TIMEOUT_S
from runtime.infra.jsretry import RETRYABLE, retrying
from runtime.infra.projection import RunIndex
from runtime.infra.streams import LISTING_PREFIX, LISTING_STREAM, listing_config
from runtime.infra.streamsetup import ensure_stream, require_stream

log = logging.getLogger("jetrun.history")

WRONG_LAST_SEQUENCE = 10071
READ_AHEAD = 16  # numbers looked up at once while walking down
BLOCK = 16  # entries per message at most (one message per team per step at up to 16 runs)


class Listed(msgspec.Struct, frozen=True, kw_only=True):
    """One run in its team's history."""

    run_id: str
    pipeline: str
    created_at: float
    seq: int  # the sequence of the run's first event (``submitted``) in the event log


class Top(NamedTuple):
    """Where a team's history ends."""

    number: int  # its newest entry's number (0: none)
    seq: int  # that run's sequence in the event log
    stream_seq: int  # the message's sequence in ``JETRUN_LISTING``


_encoder = msgspec.json.Encoder()
_block_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Listed | list[Listed])


def _decode(data: bytes) -> list[Listed]:
    """A message holds one entry (an object) or a block of them (an array, oldest first)."""
    found = _decoder.decode(data)
    return found if isinstance(found, list) else [found]


def entry_subject(team: str, n: int) -> str:
    check_token(team, "team")
    return f"{LISTING_PREFIX}.{team}.{n}"


def _number(subject: str) -> int:
    return int(subject.rsplit(".", 1)[1])


class RunHistory:
    """Read and write ``JETRUN_LISTING``. Safe to share within one process."""

    def __init__(
        self, js: JetStreamContext, *, replicas: int = 1, deadline_s: float = 10.0
    ) -> None:
        self.js, self.replicas, self.deadline_s = js, replicas, deadline_s

    async def ensure(self) -> None:
        await ensure_stream(self.js, listing_config(replicas=self.replicas), 120.0)

    async def require(self) -> None:
        await require_stream(self.js, LISTING_STREAM, 120.0)

    async def top(self, team: str) -> Top:
        """Where the team's history ends: its newest number, that run's log sequence, and the
        message's sequence in ``JETRUN_LISTING`` (all 0 when the team has none)."""
        found = await self._get(f"{LISTING_PREFIX}.{_team(team)}.>", last=True)
        if found is None:
            return Top(0, 0, 0)
        end, block, stream_seq = found
        return Top(end, block[-1].seq, stream_seq)

    async def newest(self, team: str) -> tuple[int, Listed] | None:
        """The team's newest entry and its number; None when it has none."""
        found = await self._get(f"{LISTING_PREFIX}.{_team(team)}.>", last=True)
        return None if found is None else (found[0], found[1][-1])

    async def oldest(self, team: str) -> int | None:
        """The number of the team's oldest entry still kept (older ones aged out)."""
        found = await self._get(f"{LISTING_PREFIX}.{_team(team)}.>", last=False)
        return None if found is None else found[0] - len(found[1]) + 1

    async def entry(self, team: str, n: int) -> Listed | None:
        async for k, listed in self.entries(team, n, n):
            if k == n:
                return listed
        return None

    async def entries(self, team: str, start: int, stop: int) -> AsyncIterator[tuple[int, Listed]]:
        """Entries ``start``, ``start - 1``, ... down to ``stop`` (inclusive), skipping numbers
        with no entry; ``READ_AHEAD`` gets in flight at a time. A block holds at most
        ``BLOCK`` entries, so the one holding ``start`` ends at most ``BLOCK - 1`` above it."""
        if start < stop:
            return
        n = start + BLOCK - 1  # numbers above ``start``: only to find the block holding it
        bottom = max(stop, start - READ_AHEAD + 1)  # (looked up with the first numbers below)
        while n >= stop:
            found = await self._many(team, list(range(n, bottom - 1, -1)))
            lowest = bottom
            for end in sorted(found, reverse=True):
                block = found[end]
                first = end - len(block) + 1
                for k in range(min(end, start), max(first, stop) - 1, -1):
                    yield k, block[k - first]
                lowest = min(lowest, first)
            n = lowest - 1
            bottom = max(stop, n - READ_AHEAD + 1)

    async def _many(self, team: str, numbers: list[int]) -> dict[int, list[Listed]]:
        """The blocks ending at any of ``numbers``, by their last number."""
        found: dict[int, list[Listed]] = {}

        async def get(k: int) -> None:
            got = await self._get(entry_subject(team, k), last=True)
            if got is not None:
                found[k] = got[1]

        async with anyio.create_task_group() as tg:
            for k in numbers:
                tg.start_soon(get, k)
        return found

    async def add(self, team: str, n: int, listed: Listed) -> bool:
        """Store ``listed`` as the team's entry ``n``; False unless ``n`` follows the team's
        newest number (a number is never given twice)."""
        last = await self.last_seq()  # first: a top read after it is current until it moves
        top = await self.top(team)
        if n != top.number + 1:
            return False
        return await self.add_block(team, top, [listed], last) is not None

    async def last_seq(self) -> int:
        """The sequence of the last message stored in ``JETRUN_LISTING`` (0: none ever)."""

        async def info() -> int:
            return int((await self.js.stream_info(LISTING_STREAM)).state.last_seq)

        return await retrying("history's last sequence", info, self.deadline_s)

    async def add_block(
        self, team: str, after: Top, block: list[Listed], last_seq: int
    ) -> int | None:
        """Store ``block`` as the team's entries ``after.number + 1`` on, in one message, only
        if the stream's last message is still ``last_seq`` (``Nats-Expected-Last-Sequence``).
        ``after`` must have been read (or stored) when the stream ended at ``last_seq``: then
        nothing was stored since, so ``after`` is still the team's newest, no number is given
        twice and none is skipped, whoever else writes. Returns the message's sequence; None
        when the stream has moved on (another writer, or this one's earlier try whose answer
        was lost)."""
        assert 0 < len(block) <= BLOCK
        subject = entry_subject(team, after.number + len(block))
        payload = _block_encoder.encode(block) if len(block) > 1 else _encoder.encode(block[0])
        headers = {"Nats-Expected-Last-Sequence": str(last_seq)}
        publisher = jspub.publisher_of(self.js)  # the same answers as js.publish, cheaper

        async def publish() -> int:
            ack = await publisher.publish(subject, payload, headers, PUBLISH_TIMEOUT_S)
            return int(ack.seq)

        try:
            return await retrying(f"list {len(block)} runs of {team}", publish, self.deadline_s)
        except BadRequestError as err:
            if err.err_code == WRONG_LAST_SEQUENCE:
                return None
            raise

    async def _get(self, subject: str, *, last: bool) -> tuple[int, list[Listed], int] | None:
        """``(last number, entries, stream sequence)`` of the message found; None if none."""

        async def get() -> tuple[int, list[Listed], int] | None:
            try:
                if last:
                    msg = await self.js.get_last_msg(LISTING_STREAM, subject, direct=True)
                else:
                    msg = await self.js.get_msg(
                        LISTING_STREAM, seq=1, subject=subject, direct=True, next=True
                    )
            except NotFoundError:
                return None
            assert msg.subject is not None and msg.data is not None
            return _number(msg.subject), _decode(msg.data), int(msg.seq or 0)

        return await retrying(f"history {subject}", get, self.deadline_s)


def _team(team: str) -> str:
    check_token(team, "team")
    return team


class HistoryWriter:
    """The scheduler's side: every run its index reads the submission of gets an entry, once.

    A run is ``holds``-ed until its entry is stored (or found stored by another writer), so
    the index must not forget it before then. A standby (``leading`` False) writes nothing: it
    only drops the runs the leader has listed, read from each team's newest entry."""

    def __init__(self, history: RunHistory, index: RunIndex) -> None:
        self.history = history
        self.pending: dict[str, tuple[str, Listed]] = {}  # run id -> (team, entry), log order
        self._tops: dict[str, Top] = {}  # team -> where its history ends
        # the stream's last sequence, known before every top in ``_tops`` was read (or stored)
        self._last: int | None = None
        index.listen_new(self._observe)

    def _observe(self, seq: int, event: AnyEvent, after: RunRecord) -> None:
        if isinstance(event, RunSubmitted) and after.team:
            # (a run first read from its ``restated`` event was listed at its submission)
            listed = Listed(
                run_id=after.id, pipeline=after.pipeline, created_at=after.created_at, seq=seq
            )
            self.pending[after.id] = (after.team, listed)

    def holds(self, run_id: str) -> bool:
        return run_id in self.pending

    async def step(self, leading: bool) -> None:
        """Write (leader) or drop (standby) what is pending; an outage ends the step early."""
        try:
            if leading:
                await self._write()
            else:
                self._forget_picture()
                await self._drop_listed()
        except RETRYABLE as err:
            log.warning("run history not written now (%r); later", err)

    def _forget_picture(self) -> None:
        self._tops.clear()
        self._last = None

    async def _top(self, team: str) -> Top:
        top = self._tops.get(team)
        if top is None:
            top = self._tops[team] = await self.history.top(team)
        return top

    async def _last_seq(self) -> int:
        """The stream's last sequence, read before any top then held (a top read after it is
        the team's newest as long as the stream still ends there: the publish checks that)."""
        if self._last is None:
            self._tops.clear()
            self._last = await self.history.last_seq()
        return self._last

    async def _write(self) -> None:
        """Each team's pending runs, in log order, as blocks of up to ``BLOCK`` entries: one
        message and one acknowledgement per block, not per run."""
        teams: dict[str, list[tuple[str, Listed]]] = {}
        for run_id, (team, listed) in self.pending.items():
            teams.setdefault(team, []).append((run_id, listed))
        for team, runs in teams.items():
            await self._write_team(team, runs)

    async def _write_team(self, team: str, runs: list[tuple[str, Listed]]) -> None:
        await self._last_seq()
        top = await self._top(team)
        fresh = []
        for run_id, listed in runs:
            if listed.seq <= top.seq:  # listed already (by this writer before a restart)
                self.pending.pop(run_id, None)
            else:
                fresh.append((run_id, listed))
        for at in range(0, len(fresh), BLOCK):
            chunk = fresh[at : at + BLOCK]
            block = [listed for _, listed in chunk]
            stored = await self.history.add_block(team, top, block, await self._last_seq())
            if stored is None:  # another writer stored something: read the picture again
                self._forget_picture()
                return
            self._last = stored
            top = self._tops[team] = Top(top.number + len(chunk), chunk[-1][1].seq, stored)
            for run_id, _ in chunk:
                self.pending.pop(run_id, None)

    async def _drop_listed(self) -> None:
        teams = {team for team, _ in self.pending.values()}
        for team in teams:
            last_seq = (await self._top(team)).seq
            for run_id, (t, listed) in list(self.pending.items()):
                if t == team and listed.seq <= last_seq:
                    del self.pending[run_id]
        self._forget_picture()
