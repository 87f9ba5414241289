"""Listing a team's runs, newest first, with filters and cursor pagination (``GET /v4/runs``).

Runs are listed in the order the event log recorded their submission, newest first. Two sources
are merged by that order (the sequence of a run's first event):

- ``RunListing`` follows a ``RunIndex`` (as one of its listeners) and keeps, per team, the run
  ids it holds in that order, plus the set of the team's runs that have not ended: every
  unfinished run, and runs that ended within ``keep_ended_s``;
- the run history (``runtime.control.history``) holds one entry per run of the team, however
  old, written by the leading scheduler moments after the submission; an entry whose run the
  index still holds is skipped (the index's copy is the fresher one), and the view of an
  ended run is read from the run views when it is on the page. A held run first read from its
  ``restated`` event (its first events aged out) has no place of its own: its history entry
  places it, with the held record.

The cursor says where both walks resume: the sequence below which runs remain, and the number
of the next history entry to read. A page looks at ``MAX_SCAN`` held runs and ``MAX_HISTORY``
history entries at most; with narrow filters a page may hold fewer runs than asked for while
``next_cursor`` still points further back.
"""

from __future__ import annotations

import base64
import binascii
from collections import defaultdict
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Mapping, Sequence
from typing import TypeVar

import msgspec
from sortedcontainers import SortedList

from contracts.events import AnyEvent, RunRestated
from contracts.run import RunRecord, pipeline_id_of
from contracts.states import RunState
from runtime.control.history import Listed, RunHistory
from runtime.infra.projection import RunIndex

DEFAULT_LIMIT = 20
MAX_LIMIT = 100
MAX_SCAN = 10_000
MAX_HISTORY = 1_000
CLOCK_SLACK_S = 60.0  # creation times may run this much against the log's order (gateways)

N = TypeVar("N", int, float)
Key = tuple[int, str]  # (-seq of the run's first event, run id): ascending is newest first
Load = Callable[[str], Awaitable[RunRecord | None]]


class Cursor(msgspec.Struct, frozen=True, array_like=True):
    """Where the next page starts: runs submitted at log sequences below ``seq`` remain;
    the history walk resumes at entry ``entry`` (0: none left; -1: from the newest)."""

    seq: int
    entry: int = -1


class ListQuery(msgspec.Struct, frozen=True, kw_only=True):
    pipeline: str | None = None  # a pointer (``user/name:v1``) or a pipeline id (``user/name``)
    states: frozenset[RunState] = frozenset()
    created_after: float | None = None  # inclusive
    created_before: float | None = None  # exclusive
    limit: int = DEFAULT_LIMIT
    cursor: Cursor | None = None


class BadQuery(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


_cursor_decoder = msgspec.json.Decoder(Cursor)


def encode_cursor(cursor: Cursor) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode(cursor)).decode().rstrip("=")


def decode_cursor(text: str) -> Cursor:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        return _cursor_decoder.decode(raw)
    except (binascii.Error, ValueError, msgspec.MsgspecError):
        raise BadQuery("cursor", "cursor is not one this API returned") from None


def parse_query(params: Mapping[str, Sequence[str]]) -> ListQuery:
    """Query parameters -> ``ListQuery``; ``BadQuery`` names the parameter that is wrong."""

    def one(name: str) -> str | None:
        values = params.get(name) or []
        if len(values) > 1:
            raise BadQuery(name, f"{name} may be given once")
        return values[0] if values else None

    states: set[RunState] = set()
    for value in params.get("state") or []:
        for part in value.split(","):
            try:
                states.add(RunState(part))
            except ValueError:
                known = ", ".join(s.value for s in RunState if s is not RunState.unknown)
                raise BadQuery("state", f"unknown state {part!r}; one of {known}") from None
    limit_text = one("limit")
    limit = DEFAULT_LIMIT if limit_text is None else _number("limit", limit_text, int)
    if not 1 <= limit <= MAX_LIMIT:
        raise BadQuery("limit", f"limit must be between 1 and {MAX_LIMIT}")
    after, before, cursor = one("created_after"), one("created_before"), one("cursor")
    return ListQuery(
        pipeline=one("pipeline") or None,
        states=frozenset(states),
        created_after=None if after is None else _number("created_after", after, float),
        created_before=None if before is None else _number("created_before", before, float),
        limit=limit,
        cursor=None if cursor is None else decode_cursor(cursor),
    )


def _number(field: str, text: str, kind: type[N]) -> N:
    try:
        value = kind(text)
    except ValueError:
        raise BadQuery(field, f"{field} must be a {kind.__name__}, got {text[:40]!r}") from None
    if value != value or value in (float("inf"), float("-inf")):  # NaN, infinities
        raise BadQuery(field, f"{field} must be a finite number")
    return value


class RunListing:
    """Each team's held runs in log order and its unfinished runs, fed by ``index``; with a
    ``history`` (and ``load`` for the views of ended runs), pages reach every run."""

    def __init__(
        self, index: RunIndex, history: RunHistory | None = None, load: Load | None = None
    ) -> None:
        self.index = index
        self.history = history
        self.load = load
        self._by_team: dict[str, SortedList] = defaultdict(SortedList)
        self._seq: dict[str, int] = {}
        # held runs first read from a restatement (their first events aged out): the history
        # places them, at their submission
        self._unplaced: dict[str, dict[str, None]] = defaultdict(dict)
        self._active: dict[str, dict[str, None]] = defaultdict(dict)
        # a run's first event places it and its end leaves the unfinished: no call for the
        # events between (every gateway process applies every event of every run)
        index.listen_new(self._on_new)
        index.listen_ended(self._on_ended)
        index.on_forget(self._forget)

    def _forget(self, run: RunRecord) -> None:
        seq = self._seq.pop(run.id, None)
        unplaced = self._unplaced.get(run.team)
        if unplaced is not None:
            unplaced.pop(run.id, None)
            if not unplaced:
                del self._unplaced[run.team]
        keys = self._by_team.get(run.team)
        if keys is not None and seq is not None:
            keys.discard((-seq, run.id))
            if not keys:
                del self._by_team[run.team]

    def _on_new(self, seq: int, event: AnyEvent, run: RunRecord) -> None:
        """The first event of a run held here: its place by submission (a run first read
        from its restatement is placed by its history entry) and, unless it has ended
        already, among its team's unfinished runs."""
        team = run.team
        if not team:
            return
        if isinstance(event, RunRestated):
            self._unplaced[team][run.id] = None
        else:
            self._seq[run.id] = seq
            self._by_team[team].add((-seq, run.id))
        if not run.is_terminal:
            self._active[team][run.id] = None

    def _on_ended(self, run: RunRecord) -> None:
        active = self._active.get(run.team)
        if active is not None:
            active.pop(run.id, None)

    def placed(self, run_id: str) -> bool:
        """Held, and placed in the team's order by its submission."""
        return run_id in self._seq

    def active(self, team: str | None) -> list[RunRecord]:
        """The unfinished runs of ``team`` (every team's for ``None``), oldest first."""
        teams = [team] if team is not None else sorted(self._active)
        return [r for t in teams for i in self._active.get(t, {}) if (r := self.index.get(i))]

    def page_held(
        self, team: str, query: ListQuery, max_scan: int = MAX_SCAN
    ) -> tuple[list[RunRecord], str | None]:
        """A page of the runs held in memory only (no I/O): the dashboard's recent runs."""
        found: list[RunRecord] = []
        last: int | None = None
        for scanned, (seq, run) in enumerate(self.held(team, query), start=1):
            last = seq
            if _matches(run, query):
                found.append(run)
                if len(found) == query.limit:
                    break
            if scanned >= max_scan:
                break
        else:
            return found, None
        return found, encode_cursor(Cursor(last, 0)) if last is not None else None

    async def page(
        self, team: str, query: ListQuery, max_scan: int = MAX_SCAN
    ) -> tuple[list[RunRecord], str | None]:
        """One page of ``team``'s runs matching ``query``, newest first, and the cursor of the
        next page (None when there is none): held runs and the history, merged."""
        if self.history is None or (_only_unfinished(query) and not self._unplaced.get(team)):
            return self.page_held(team, query, max_scan)
        pager = _Pager(self, self.history, team, query)
        return await pager.run(max_scan)

    def held(self, team: str, query: ListQuery) -> Iterator[tuple[int, RunRecord]]:
        keys = self._by_team.get(team)
        if not keys:
            return
        start = 0
        if query.cursor is not None:
            start = keys.bisect_right((-query.cursor.seq, "\U0010ffff"))
        for neg_seq, run_id in keys.islice(start):
            run = self.index.get(run_id)
            if run is None:
                continue
            if _too_old(run.created_at, query):
                return
            yield -neg_seq, run


class _Pager:
    """One page of the merge: the held runs and the history entries, newest first."""

    def __init__(
        self, listing: RunListing, history: RunHistory, team: str, query: ListQuery
    ) -> None:
        self.listing, self.history, self.team, self.query = listing, history, team, query
        self.found: list[RunRecord] = []
        self.seen: set[str] = set()
        self.entry = query.cursor.entry if query.cursor is not None else -1
        self.cursor_seq = query.cursor.seq if query.cursor is not None else None
        self.last_seq: int | None = None

    async def run(self, max_scan: int) -> tuple[list[RunRecord], str | None]:
        held = self.listing.held(self.team, self.query)
        listed = self._listed()
        try:
            head = next(held, None)
            entry = await anext(listed, None)
            held_scanned = listed_scanned = 0
            while head is not None or entry is not None:
                full = len(self.found) == self.query.limit
                if full or held_scanned >= max_scan or listed_scanned >= MAX_HISTORY:
                    return self.found, self._cursor(entry)
                if entry is None or (head is not None and head[0] > entry[1].seq):
                    assert head is not None
                    held_scanned += 1
                    self._offer(head[0], head[1])
                    head = next(held, None)
                    continue
                listed_scanned += 1
                if self.cursor_seq is None or entry[1].seq < self.cursor_seq:
                    await self._offer_listed(entry[1])
                entry = await anext(listed, None)
            return self.found, None
        finally:
            await listed.aclose()

    def _cursor(self, entry: tuple[int, Listed] | None) -> str | None:
        """Resume below the last run looked at; the history at the entry not read yet (0 when
        none is left: entries written later are of runs held in memory until then)."""
        seq = self.last_seq if self.last_seq is not None else self.cursor_seq
        if seq is None:
            return None
        resume = entry[0] if entry is not None else 0
        return encode_cursor(Cursor(seq, resume))

    def _offer(self, seq: int, run: RunRecord) -> None:
        self.last_seq = seq
        if run.id not in self.seen and _matches(run, self.query):
            self.seen.add(run.id)
            self.found.append(run)

    async def _offer_listed(self, listed: Listed) -> None:
        self.last_seq = listed.seq
        if listed.run_id in self.seen or self.listing.placed(listed.run_id):
            return  # held and placed: the held copy is listed (or was, on an earlier page)
        if not _matches_listed(listed, self.query):
            return
        assert self.listing.load is not None
        run = self.listing.index.get(listed.run_id) or await self.listing.load(listed.run_id)
        if run is not None and run.team == self.team and _matches(run, self.query):
            self.seen.add(run.id)
            self.found.append(run)

    async def _listed(self) -> AsyncGenerator[tuple[int, Listed]]:
        if self.entry == 0:
            return
        newest = await self.history.newest(self.team)
        if newest is None:
            return
        # the walk never starts above the team's newest entry: a cursor is the caller's text,
        # and one naming entry 2**62 would otherwise be walked down one number at a time
        start = newest[0] if self.entry < 0 else min(self.entry, newest[0])
        oldest = await self.history.oldest(self.team) or 1
        # entries at or above the cursor's sequence are skipped by ``run``, each counted
        # against ``MAX_HISTORY``: a cursor naming sequence 1 must not walk the whole history
        async for n, listed in self.history.entries(self.team, start, oldest):
            if _too_old(listed.created_at, self.query):
                return
            yield n, listed


def _only_unfinished(query: ListQuery) -> bool:
    """Every unfinished run is held: a query for unfinished states needs no history."""
    return bool(query.states) and not any(s.is_terminal for s in query.states)


def _too_old(created_at: float, query: ListQuery) -> bool:
    after = query.created_after
    return after is not None and created_at < after - CLOCK_SLACK_S


def _matches_listed(listed: Listed, query: ListQuery) -> bool:
    if not _created_in(listed.created_at, query):
        return False
    if query.pipeline is None:
        return True
    if ":" in query.pipeline:
        return listed.pipeline == query.pipeline
    return pipeline_id_of(listed.pipeline) == query.pipeline


def _created_in(created_at: float, query: ListQuery) -> bool:
    if query.created_after is not None and created_at < query.created_after:
        return False
    return query.created_before is None or created_at < query.created_before


def _matches(run: RunRecord, query: ListQuery) -> bool:
    if not _created_in(run.created_at, query):
        return False
    if query.states and run.state not in query.states:
        return False
    if query.pipeline is None:
        return True
    if ":" in query.pipeline:
        return run.pipeline == query.pipeline
    return pipeline_id_of(run.pipeline) == query.pipeline
