"""The run history (the durable listing index) against a real nats-server, in process: the
writer lists every run once, in log order, and pages merge held runs with listed ones across
the boundary without duplicates or gaps."""

from __future__ import annotations

import anyio
import msgspec
import pytest
from nats.aio.client import Client
from nats.js.errors import BadRequestError

from contracts import RunSubmitted
from contracts.errors import ErrorType, RunError
from contracts.events import (
    AdmissionGrant,
    AnyEvent,
    RunCompleted,
    RunDispatched,
    RunFailed,
    RunQueued,
    RunStarted,
)
from contracts.machine import restate
from contracts.run import RunRecord
from contracts.states import RunState
from runtime.control import listing as listing_module
from runtime.control.history import HistoryWriter, Listed, RunHistory, Top
from runtime.control.listing import Cursor, ListQuery, RunListing, decode_cursor
from runtime.infra.projection import RunIndex
from runtime.infra.streams import LISTING_STREAM

pytestmark = pytest.mark.anyio


class Views:
    """Stands in for the run views: the last record of every run fed."""

    def __init__(self, index: RunIndex) -> None:
        self.records: dict[str, RunRecord] = {}
        index.listen(lambda seq, event, before, after: self.records.__setitem__(after.id, after))

    async def load(self, run_id: str) -> RunRecord | None:
        return self.records.get(run_id)


def run_events(run_id: str, at: float, team: str, pipeline: str, fail: bool) -> list[AnyEvent]:
    end: AnyEvent = RunCompleted(run_id=run_id, at=at + 1, attempt=1, outputs=[])
    if fail:
        error = RunError(type=ErrorType.pipeline_error, message="no")
        end = RunFailed(run_id=run_id, at=at + 1, attempt=1, error=error)
    return [
        RunSubmitted(
            run_id=run_id,
            at=at,
            team=team,
            pipeline=pipeline,
            inputs=[],
            admission=AdmissionGrant(tier="basic"),
        ),
        RunQueued(run_id=run_id, at=at, attempt=1),
        RunDispatched(run_id=run_id, at=at, attempt=1, agent_id="a1"),
        RunStarted(run_id=run_id, at=at, attempt=1, agent_id="a1"),
        end,
    ]


def feed(index: RunIndex, events: list[AnyEvent]) -> None:
    for event in events:
        index.apply(index.last_seq + 1, event)


async def every_page(listing: RunListing, team: str, query: ListQuery) -> list[list[str]]:
    pages, cursor = [], None
    while True:
        q = msgspec.structs.replace(query, cursor=cursor and decode_cursor(cursor))
        runs, cursor = await listing.page(team, q)
        pages.append([r.id for r in runs])
        assert len(pages) < 100
        if cursor is None:
            return pages


def flat(pages: list[list[str]]) -> list[str]:
    return [run_id for page in pages for run_id in page]


async def test_pages_merge_held_and_listed_runs_without_duplicates_or_gaps(nc: Client) -> None:
    index = RunIndex()
    views = Views(index)
    history = RunHistory(nc.jetstream())
    writer = HistoryWriter(history, index)
    listing = RunListing(index, history, views.load)
    acme: list[str] = []
    for i in range(30):
        run_id = f"run_a{i:02d}"
        acme.append(run_id)
        pipeline = "t/x:v1" if i % 3 else "t/y:v1"
        feed(index, run_events(run_id, 1000.0 + i, "acme", pipeline, fail=i % 5 == 0))
        if i % 3 == 0:
            feed(index, run_events(f"run_r{i:02d}", 1000.5 + i, "rival", "t/x:v1", fail=False))
    await writer.step(leading=True)
    assert not writer.pending
    assert index.forget_ended(1000.0 + 21) == 20 + 7  # acme's 20 oldest (and rival's) leave
    for i in range(30, 33):  # held and not listed yet
        acme.append(f"run_a{i:02d}")
        feed(index, run_events(acme[-1], 1000.0 + i, "acme", "t/x:v1", fail=False))
    newest_first = acme[::-1]

    pages = await every_page(listing, "acme", ListQuery(limit=7))
    assert flat(pages) == newest_first
    assert all(len(page) == 7 for page in pages[:-1])

    # the boundary moves between pages: more runs are forgotten, the new ones listed
    runs, cursor = await listing.page("acme", ListQuery(limit=5))
    seen = [r.id for r in runs]
    await writer.step(leading=True)
    index.forget_ended(1000.0 + 40)
    while cursor is not None:
        runs, cursor = await listing.page("acme", ListQuery(limit=5, cursor=decode_cursor(cursor)))
        seen += [r.id for r in runs]
    assert seen == newest_first

    failed = await every_page(listing, "acme", ListQuery(states=frozenset({RunState.failed})))
    assert flat(failed) == [f"run_a{i:02d}" for i in (25, 20, 15, 10, 5, 0)]
    ys = flat(await every_page(listing, "acme", ListQuery(pipeline="t/y:v1", limit=3)))
    assert ys == [f"run_a{i:02d}" for i in range(30, -1, -3) if i < 30]
    window = ListQuery(created_after=1005.0, created_before=1009.0)
    assert flat(await every_page(listing, "acme", window)) == [
        f"run_a{i:02d}" for i in (8, 7, 6, 5)
    ]
    rival = flat(await every_page(listing, "rival", ListQuery(limit=4)))
    assert rival == [f"run_r{i:02d}" for i in range(27, -1, -3)]
    assert flat(await every_page(listing, "nobody", ListQuery())) == []


async def test_every_run_is_listed_once_in_log_order_by_any_writer(nc: Client) -> None:
    history = RunHistory(nc.jetstream())
    first_index, second_index = RunIndex(), RunIndex()
    first = HistoryWriter(history, first_index)
    second = HistoryWriter(history, second_index)  # a standby, then the next leader
    events = [
        e for i in range(6) for e in run_events(f"run_{i}", 10.0 + i, "acme", "t/x:v1", False)
    ]
    feed(first_index, events[:15])
    await first.step(leading=True)
    feed(second_index, events[:15])
    await second.step(leading=False)  # the standby drops what the leader has listed
    assert not second.pending
    feed(first_index, events[15:])
    feed(second_index, events[15:])
    await second.step(leading=True)  # the leader died before listing runs 3 to 5
    await first.step(leading=True)  # it comes back, still thinking it leads: lists nothing twice
    newest = await history.newest("acme")
    assert newest is not None and newest[0] == 6
    entries = [(n, listed.run_id) async for n, listed in history.entries("acme", 6, 1)]
    assert entries == [(6 - i, f"run_{5 - i}") for i in range(6)]
    seqs = [listed.seq async for _, listed in history.entries("acme", 6, 1)]
    assert seqs == sorted(seqs, reverse=True)
    run_0 = first_index.get("run_0")
    assert run_0 is not None
    restated = restate(run_0, 5, 30.0, None)
    third_index = RunIndex()  # a scheduler that starts where run_0's first events aged out
    third = HistoryWriter(history, third_index)
    third_index.apply(100, restated)
    assert third_index.get("run_0") is not None and not third.pending  # listed once, long ago
    taken = Listed(run_id="run_x", pipeline="t/x:v1", created_at=1.0, seq=999)
    assert not await history.add("acme", 3, taken)  # a number is never given twice
    assert await history.oldest("acme") == 1 and await history.oldest("rival") is None


async def test_a_run_first_read_from_its_restatement_keeps_its_place(nc: Client) -> None:
    """A gateway that starts after a live run's first events aged out reads the run from its
    ``restated`` event: it is listed where it was submitted, once, with its live state."""
    history = RunHistory(nc.jetstream())
    leader = RunIndex()
    writer = HistoryWriter(history, leader)
    queued = run_events("run_q", 10.0, "acme", "t/x:v1", False)[:2]  # submitted, queued
    done = [e for i in (1, 2) for e in run_events(f"run_{i}", 10.0 + i, "acme", "t/x:v1", False)]
    events = list(enumerate([*queued, *done], start=1))
    for seq, event in events:
        leader.apply(seq, event)
    await writer.step(leading=True)
    held = leader.get("run_q")
    assert held is not None
    restated = restate(held, 2, 30.0, None)
    index = RunIndex()  # the gateway, from where run_q's first events are gone
    views = Views(index)
    listing = RunListing(index, history, views.load)
    for seq, event in events[2:]:
        index.apply(seq, event)
    index.apply(len(events) + 1, restated)
    assert not listing.placed("run_q") and listing.placed("run_1")
    pages = await every_page(listing, "acme", ListQuery(limit=1))
    assert flat(pages) == ["run_2", "run_1", "run_q"]  # by submission, not by restatement
    unfinished = ListQuery(states=frozenset({RunState.queued}))
    assert flat(await every_page(listing, "acme", unfinished)) == ["run_q"]


async def test_a_crafted_cursor_pages_only_the_callers_runs_and_ends(nc: Client) -> None:
    """A cursor is the caller's text: whatever numbers it names, a page holds only the team's
    own runs below the cursor's sequence and is answered (the history walk starts at most at
    the team's newest entry, not at an entry number the cursor made up)."""
    index = RunIndex()
    views = Views(index)
    history = RunHistory(nc.jetstream())
    writer = HistoryWriter(history, index)
    listing = RunListing(index, history, views.load)
    for i in range(4):
        feed(index, run_events(f"run_a{i}", 10.0 + i, "acme", "t/x:v1", fail=False))
        feed(index, run_events(f"run_r{i}", 10.5 + i, "rival", "t/x:v1", fail=False))
    await writer.step(leading=True)
    assert index.forget_ended(100.0) == 8  # every run is read back from the history
    everything = ["run_a3", "run_a2", "run_a1", "run_a0"]
    for seq, entry in [(2**62, 2**62), (2**63 - 1, 2**63 - 1), (10**9, 10**9), (10**9, -7)]:
        with anyio.fail_after(20):
            runs, cursor = await listing.page("acme", ListQuery(cursor=Cursor(seq, entry)))
        assert [r.id for r in runs] == everything and cursor is None
    with anyio.fail_after(20):
        below, _ = await listing.page("acme", ListQuery(cursor=Cursor(21, 2**62)))
    assert [r.id for r in below] == ["run_a1", "run_a0"]  # runs submitted below seq 21


async def test_a_step_lists_a_teams_runs_in_blocks_one_message_each(nc: Client) -> None:
    """40 runs in one step: three messages (16 + 16 + 8 entries), numbered 1 to 40 in log
    order; a walk from any number (a cursor may name one inside a block) reads them back."""
    js = nc.jetstream()
    history = RunHistory(js)
    index = RunIndex()
    writer = HistoryWriter(history, index)
    for i in range(40):
        feed(index, run_events(f"run_{i:02d}", 10.0 + i, "acme", "t/x:v1", fail=False))
    await writer.step(leading=True)
    assert not writer.pending
    assert (await js.stream_info(LISTING_STREAM)).state.messages == 3
    newest = await history.newest("acme")
    assert newest is not None and newest == (40, newest[1]) and newest[1].run_id == "run_39"
    assert await history.oldest("acme") == 1
    walked = [(n, listed.run_id) async for n, listed in history.entries("acme", 40, 1)]
    assert walked == [(40 - i, f"run_{39 - i:02d}") for i in range(40)]
    inside = [n async for n, _ in history.entries("acme", 21, 14)]  # from inside a block
    assert inside == list(range(21, 13, -1))
    entry = await history.entry("acme", 17)
    assert entry is not None and entry.run_id == "run_16"


async def test_a_writer_whose_picture_is_stale_lists_nothing_and_numbers_stay_unique(
    nc: Client,
) -> None:
    history = RunHistory(nc.jetstream())
    listed = [Listed(run_id=f"run_{i}", pipeline="t/x:v1", created_at=1.0, seq=i) for i in (1, 2)]
    last = await history.last_seq()
    start = await history.top("acme")
    assert start == (0, 0, 0)
    stored = await history.add_block("acme", start, listed[:1], last)
    assert stored is not None
    assert await history.add_block("acme", start, listed[1:], last) is None  # another wrote first
    top = await history.top("acme")
    assert top.number == 1 and top.seq == 1
    assert await history.add_block("acme", top, listed[1:], stored) is not None
    assert [n async for n, _ in history.entries("acme", 5, 1)] == [2, 1]


async def test_a_block_is_refused_after_any_write_to_the_history_and_listed_later(
    nc: Client,
) -> None:
    """A block expects the stream's last message (one number nats-server keeps, however long
    the team's history), not the team's newest found over ``jetrun.listing.<team>.>``: so a
    write of another team's block since the writer read its picture refuses it too. The
    refused writer reads the picture again and lists its runs on its next step, each once,
    numbered on from the team's newest."""
    js = nc.jetstream()
    history = RunHistory(js)
    first_index, second_index = RunIndex(), RunIndex()
    first = HistoryWriter(history, first_index)
    second = HistoryWriter(history, second_index)  # a second leader, for a moment
    acme = [e for i in range(3) for e in run_events(f"run_a{i}", 10.0 + i, "acme", "t/x:v1", False)]
    rival = [
        e for i in range(2) for e in run_events(f"run_r{i}", 20.0 + i, "rival", "t/x:v1", False)
    ]
    feed(first_index, acme[:5])  # run_a0
    await first.step(leading=True)  # first's picture: the stream ends at its block
    feed(second_index, rival)
    await second.step(leading=True)  # another team's block, by another writer
    feed(first_index, acme[5:])  # run_a1, run_a2
    await first.step(leading=True)  # refused: the stream moved on since its picture
    assert set(first.pending) == {"run_a1", "run_a2"}
    assert (await js.stream_info(LISTING_STREAM)).state.messages == 2
    await first.step(leading=True)  # with the picture read again
    assert not first.pending and not second.pending
    acme_entries = [(n, e.run_id) async for n, e in history.entries("acme", 3, 1)]
    assert acme_entries == [(3, "run_a2"), (2, "run_a1"), (1, "run_a0")]
    rival_entries = [(n, e.run_id) async for n, e in history.entries("rival", 2, 1)]
    assert rival_entries == [(2, "run_r1"), (1, "run_r0")]


async def test_a_writer_of_the_team_wide_check_and_one_of_the_stream_wide_check_chain_together(
    nc: Client,
) -> None:
    """While schedulers of both releases run (an upgrade), a block an earlier release stores
    (its check: the team's newest over ``jetrun.listing.<team>.>``) refuses this release's
    next block, which is then numbered after it; and the earlier check refuses a block whose
    team gained one meanwhile."""
    js = nc.jetstream()
    history = RunHistory(js)
    index = RunIndex()
    writer = HistoryWriter(history, index)
    events = [
        e for i in range(3) for e in run_events(f"run_{i}", 10.0 + i, "acme", "t/x:v1", False)
    ]
    feed(index, events[:5])
    await writer.step(leading=True)  # run_0 is entry 1
    top = await history.top("acme")
    old = Listed(run_id="run_old", pipeline="t/x:v1", created_at=1.0, seq=top.seq + 1)

    async def earlier_release(after: Top) -> int | None:
        headers = {
            "Nats-Expected-Last-Subject-Sequence": str(after.stream_seq),
            "Nats-Expected-Last-Subject-Sequence-Subject": "jetrun.listing.acme.>",
        }
        try:
            ack = await js.publish(
                f"jetrun.listing.acme.{after.number + 1}",
                msgspec.json.encode([old]),
                headers=headers,
            )
        except BadRequestError:
            return None
        return int(ack.seq)

    assert await earlier_release(top) is not None  # entry 2, by the earlier release
    feed(index, events[5:])
    await writer.step(leading=True)  # refused, then listed after it
    await writer.step(leading=True)
    assert not writer.pending
    walked = [(n, e.run_id) async for n, e in history.entries("acme", 4, 1)]
    assert walked == [(4, "run_2"), (3, "run_1"), (2, "run_old"), (1, "run_0")]
    assert await earlier_release(top) is None  # its picture is stale: refused


async def test_entries_of_single_run_messages_and_blocks_are_read_alike(nc: Client) -> None:
    """Entries an earlier release wrote, one message per run, and blocks after them."""
    js = nc.jetstream()
    history = RunHistory(js)
    for n in (1, 2, 4):  # number 3 was never written (a gap is skipped)
        old = Listed(run_id=f"run_{n}", pipeline="t/x:v1", created_at=1.0, seq=0)
        await js.publish(f"jetrun.listing.acme.{n}", msgspec.json.encode(old))
    index = RunIndex()
    writer = HistoryWriter(history, index)
    for i in range(5, 8):
        feed(index, run_events(f"run_{i}", 10.0 + i, "acme", "t/x:v1", fail=False))
    await writer.step(leading=True)
    walked = [(n, listed.run_id) async for n, listed in history.entries("acme", 7, 1)]
    assert walked == [(7, "run_7"), (6, "run_6"), (5, "run_5"), (4, "run_4"), (2, "run_2"),
                      (1, "run_1")]  # fmt: skip


async def test_a_cursor_below_every_entry_walks_no_more_than_a_page_of_the_history(
    nc: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cursor naming sequence 1 and no entry (walk from the newest): every entry lies at or
    above its sequence and is skipped. Each skipped entry counts against ``MAX_HISTORY``, so a
    page reads a bounded part of the history and hands on a cursor, and the pages end (the
    walk had read the team's whole history, a get per number, in one request)."""
    monkeypatch.setattr(listing_module, "MAX_HISTORY", 16)
    index = RunIndex()
    views = Views(index)
    history = RunHistory(nc.jetstream())
    writer = HistoryWriter(history, index)
    listing = RunListing(index, history, views.load)
    for i in range(160):
        feed(index, run_events(f"run_{i:03d}", 10.0 + i, "acme", "t/x:v1", fail=False))
    await writer.step(leading=True)
    assert index.forget_ended(1000.0) == 160
    gets = 0
    real_get = history._get

    async def counted(subject: str, *, last: bool) -> tuple[int, list[Listed], int] | None:
        nonlocal gets
        gets += 1
        return await real_get(subject, last=last)

    monkeypatch.setattr(history, "_get", counted)
    with anyio.fail_after(20):
        runs, cursor = await listing.page("acme", ListQuery(cursor=Cursor(1, -1)))
    assert runs == [] and cursor is not None
    assert gets <= 2 + 3 * 31  # newest, oldest, and at most three rounds of lookups
    assert decode_cursor(cursor).seq == 1
    pages = 1
    while cursor is not None:
        with anyio.fail_after(20):
            runs, cursor = await listing.page("acme", ListQuery(cursor=decode_cursor(cursor)))
        assert runs == []
        pages += 1
        assert pages <= 11
