"""Every run a team has had, durably, newest first: the index behind ``GET /v4/runs``.

The stream ``JETRUN_LISTING`` holds one ``Listed`` entry per run on the subject
``jetrun.listing.<team>.<n>``, where ``n`` counts the team's runs from 1 in the order the event
log recorded their submission. The leading scheduler writes each entry once (``HistoryWriter``,
fed by its index as it reads ``submitted`` events), one team's entries in log order, each with
``Nats-Expected-Last-Subject-Sequence: 0`` so two writers can never give one number to two runs.

Reading needs no consumer and holds nothing in memory: the newest number of a team is one
direct get (the last message on ``jetrun.listing.<team>.>``), the oldest one kept another (the
first at or after sequence 1), and entry ``n`` a third, exact one. A page walks ``n`` down from
its cursor, a few gets at a time (``entries``). Entries are kept as long as the run views are
(``views_max_age_s``, applied by ``jetrun admin apply-retention``). The ``seq`` each entry
carries orders it against runs still in memory (``runtime.control.listing``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

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
READ_AHEAD = 16  # entries fetched at once while walking down


class Listed(msgspec.Struct, frozen=True, kw_only=True):
    """One run in its team's history."""

    run_id: str
    pipeline: str
    created_at: float
    seq: int  # the sequence of the run's first event (``submitted``) in the event log


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Listed)


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

    async def newest(self, team: str) -> tuple[int, Listed] | None:
        """The team's newest entry and its number; None when it has none."""
        return await self._get(f"{LISTING_PREFIX}.{_team(team)}.>", last=True)

    async def oldest(self, team: str) -> int | None:
        """The number of the team's oldest entry still kept (older ones aged out)."""
        found = await self._get(f"{LISTING_PREFIX}.{_team(team)}.>", last=False)
        return None if found is None else found[0]

    async def entry(self, team: str, n: int) -> Listed | None:
        found = await self._get(entry_subject(team, n), last=True)
        return None if found is None else found[1]

    async def entries(self, team: str, start: int, stop: int) -> AsyncIterator[tuple[int, Listed]]:
        """Entries ``start``, ``start - 1``, ... down to ``stop`` (inclusive), skipping numbers
        with no entry; ``READ_AHEAD`` gets in flight at a time."""
        n = start
        while n >= stop:
            batch = list(range(n, max(stop, n - READ_AHEAD + 1) - 1, -1))
            found = await self._many(team, batch)
            for k in batch:
                if (listed := found.get(k)) is not None:
                    yield k, listed
            n = batch[-1] - 1

    async def _many(self, team: str, numbers: list[int]) -> dict[int, Listed | None]:
        found: dict[int, Listed | None] = {}

        async def get(k: int) -> None:
            found[k] = await self.entry(team, k)

        async with anyio.create_task_group() as tg:
            for k in numbers:
                tg.start_soon(get, k)
        return found

    async def add(self, team: str, n: int, listed: Listed) -> bool:
        """Store ``listed`` as the team's entry ``n``; False if ``n`` is taken already."""
        subject, payload = entry_subject(team, n), _encoder.encode(listed)
        headers = {
            "Nats-Msg-Id": f"listed:{listed.run_id}",
            "Nats-Expected-Last-Subject-Sequence": "0",
        }

        publisher = jspub.publisher_of(self.js)  # the same answers as js.publish, cheaper

        async def publish() -> None:
            await publisher.publish(subject, payload, headers, PUBLISH_TIMEOUT_S)

        try:
            await retrying(f"list {listed.run_id}", publish, self.deadline_s)
        except BadRequestError as err:
            if err.err_code == WRONG_LAST_SEQUENCE:
                return False
            raise
        return True

    async def _get(self, subject: str, *, last: bool) -> tuple[int, Listed] | None:
        async def get() -> tuple[int, Listed] | None:
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
            return _number(msg.subject), _decoder.decode(msg.data)

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
        self._tops: dict[str, tuple[int, int]] = {}  # team -> (newest number, its run's seq)
        index.listen(self._observe)

    def _observe(
        self, seq: int, event: AnyEvent, before: RunRecord | None, after: RunRecord
    ) -> None:
        if before is None and isinstance(event, RunSubmitted) and after.team:
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
                self._tops.clear()
                await self._drop_listed()
        except RETRYABLE as err:
            log.warning("run history not written now (%r); later", err)

    async def _top(self, team: str) -> tuple[int, int]:
        top = self._tops.get(team)
        if top is None:
            newest = await self.history.newest(team)
            top = self._tops[team] = (0, 0) if newest is None else (newest[0], newest[1].seq)
        return top

    async def _write(self) -> None:
        blocked: set[str] = set()
        for run_id, (team, listed) in list(self.pending.items()):
            if team in blocked:
                continue
            n, last_seq = await self._top(team)
            if listed.seq <= last_seq:  # listed already (by this writer before a restart)
                self.pending.pop(run_id, None)
                continue
            if await self.history.add(team, n + 1, listed):
                self._tops[team] = (n + 1, listed.seq)
                self.pending.pop(run_id, None)
            else:  # another writer took n + 1: read the team's newest again next step
                self._tops.pop(team, None)
                blocked.add(team)

    async def _drop_listed(self) -> None:
        teams = {team for team, _ in self.pending.values()}
        for team in teams:
            _, last_seq = await self._top(team)
            for run_id, (t, listed) in list(self.pending.items()):
                if t == team and listed.seq <= last_seq:
                    del self.pending[run_id]
        self._tops.clear()
