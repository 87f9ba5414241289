"""Listing a team's runs, newest first, with filters and cursor pagination (``GET /v4/runs``).

``RunListing`` follows a ``RunIndex`` (as one of its listeners) and keeps, per team, the run ids
sorted newest first plus the set of the team's runs that have not ended. Records themselves stay
in the index: a run the index forgets (it ended more than ``keep_ended_s`` ago) leaves the
listing too, so a listing covers every unfinished run and the runs that ended within that window;
an older run is still answered by ``GET /v4/runs/{id}`` (from the run views,
``runtime.control.views``).
A page scans at most ``MAX_SCAN`` runs; with narrow filters a page may hold fewer runs than
asked for while ``next_cursor`` still points further back.
"""

from __future__ import annotations

import base64
import binascii
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from typing import TypeVar

import msgspec
from sortedcontainers import SortedList

from contracts.events import AnyEvent
from contracts.run import RunRecord, pipeline_id_of
from contracts.states import RunState
from runtime.infra.projection import RunIndex

DEFAULT_LIMIT = 20
MAX_LIMIT = 100
MAX_SCAN = 10_000

N = TypeVar("N", int, float)
Key = tuple[float, str]  # (-created_at, run id): ascending order is newest first


class ListQuery(msgspec.Struct, frozen=True, kw_only=True):
    pipeline: str | None = None  # a pointer (``user/name:v1``) or a pipeline id (``user/name``)
    states: frozenset[RunState] = frozenset()
    created_after: float | None = None  # inclusive
    created_before: float | None = None  # exclusive
    limit: int = DEFAULT_LIMIT
    cursor: Key | None = None  # the key of the last run of the previous page


class BadQuery(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def encode_cursor(key: Key) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode(key)).decode().rstrip("=")


def decode_cursor(text: str) -> Key:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        neg_created, run_id = msgspec.json.decode(raw, type=tuple[float, str])
    except (binascii.Error, ValueError, msgspec.MsgspecError):
        raise BadQuery("cursor", "cursor is not one this API returned") from None
    return (neg_created, run_id)


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
    """Each team's runs in creation order and its unfinished runs, fed by ``index``."""

    def __init__(self, index: RunIndex) -> None:
        self.index = index
        self._by_team: dict[str, SortedList] = defaultdict(SortedList)
        self._active: dict[str, dict[str, None]] = defaultdict(dict)
        index.listen(self._on_change)
        index.on_forget(self._forget)

    def _forget(self, run: RunRecord) -> None:
        keys = self._by_team.get(run.team)
        if keys is not None:
            keys.discard((-run.created_at, run.id))
            if not keys:
                del self._by_team[run.team]

    def _on_change(
        self, seq: int, event: AnyEvent, before: RunRecord | None, after: RunRecord
    ) -> None:
        if not after.team:
            return
        if before is None or not before.team:
            self._by_team[after.team].add((-after.created_at, after.id))
        if after.is_terminal:
            self._active[after.team].pop(after.id, None)
        else:
            self._active[after.team][after.id] = None

    def active(self, team: str | None) -> list[RunRecord]:
        """The unfinished runs of ``team`` (every team's for ``None``), oldest first."""
        teams = [team] if team is not None else sorted(self._active)
        return [r for t in teams for i in self._active.get(t, {}) if (r := self.index.get(i))]

    def page(
        self, team: str, query: ListQuery, max_scan: int = MAX_SCAN
    ) -> tuple[list[RunRecord], str | None]:
        """One page of ``team``'s runs matching ``query``, newest first, and the cursor of the
        next page (None when there is none). Looks at ``max_scan`` runs at most."""
        found: list[RunRecord] = []
        last: Key | None = None
        for scanned, (key, run) in enumerate(self._scan(team, query), start=1):
            last = key
            if run is not None and _matches(run, query):
                found.append(run)
                if len(found) == query.limit:
                    break
            if scanned >= max_scan:
                break
        else:
            return found, None
        return found, encode_cursor(last) if last is not None else None

    def _scan(self, team: str, query: ListQuery) -> Iterator[tuple[Key, RunRecord | None]]:
        keys = self._by_team.get(team)
        if not keys:
            return
        start = 0
        if query.cursor is not None:
            start = keys.bisect_right(query.cursor)
        if query.created_before is not None:
            start = max(start, keys.bisect_right((-query.created_before, "\U0010ffff")))
        for key in keys.islice(start):
            if query.created_after is not None and -key[0] < query.created_after:
                return
            yield key, self.index.get(key[1])


def _matches(run: RunRecord, query: ListQuery) -> bool:
    if query.states and run.state not in query.states:
        return False
    if query.pipeline is None:
        return True
    if ":" in query.pipeline:
        return run.pipeline == query.pipeline
    return pipeline_id_of(run.pipeline) == query.pipeline
