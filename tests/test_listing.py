"""Listing runs: ``RunListing`` on an index (pure), then ``GET /v4/runs`` and the SDK's
``list_runs`` against a live stack (real processes)."""

from __future__ import annotations

import base64
from functools import partial

import anyio
import msgspec
import pytest

from contracts import RunAdmitted, RunCancelled, RunSubmitted
from contracts.events import AnyEvent
from contracts.machine import restate
from contracts.run import RunRecord
from contracts.states import RunState
from runtime.clients import sdk
from runtime.control.listing import (
    BadQuery,
    Cursor,
    ListQuery,
    RunListing,
    decode_cursor,
    parse_query,
)
from runtime.infra.projection import RunIndex
from tests.harness import Stack, client, wait_state


def submit(run_id: str, at: float, team: str = "t", pipeline: str = "a/b:v1") -> list[AnyEvent]:
    return [
        RunSubmitted(run_id=run_id, at=at, team=team, pipeline=pipeline, inputs=[]),
        RunAdmitted(run_id=run_id, at=at, tier="basic"),
    ]


def feed(index: RunIndex, events: list[AnyEvent]) -> None:
    for event in events:
        index.apply(index.last_seq + 1, event)


def all_pages(listing: RunListing, team: str, query: ListQuery) -> list[list[str]]:
    pages, cursor = [], None
    while True:
        q = msgspec.structs.replace(query, cursor=cursor and decode_cursor(cursor))
        runs, cursor = listing.page_held(team, q)
        pages.append([r.id for r in runs])
        if cursor is None:
            return pages


def test_pages_are_newest_first_per_team_and_end() -> None:
    index = RunIndex()
    listing = RunListing(index)
    for i in range(7):
        feed(index, submit(f"r{i}", at=100.0 + i))
    feed(index, submit("other", at=200.0, team="u"))
    pages = all_pages(listing, "t", ListQuery(limit=3))
    assert pages == [["r6", "r5", "r4"], ["r3", "r2", "r1"], ["r0"]]
    assert all_pages(listing, "u", ListQuery()) == [["other"]]
    assert all_pages(listing, "nobody", ListQuery()) == [[]]


def test_a_cursor_from_another_team_or_forged_pages_only_the_callers_runs() -> None:
    index = RunIndex()
    listing = RunListing(index)
    for i in range(4):
        feed(index, submit(f"mine{i}", at=100.0 + 2 * i))
        feed(index, submit(f"theirs{i}", at=101.0 + 2 * i, team="u"))
    _, theirs = listing.page_held("u", ListQuery(limit=1))
    assert theirs is not None
    runs, _ = listing.page_held("t", ListQuery(cursor=decode_cursor(theirs)))  # their cursor
    assert [r.id for r in runs] == ["mine3", "mine2", "mine1", "mine0"]  # below their position
    forged = ListQuery(cursor=Cursor(10**18, 5))  # a position past every run
    assert [r.id for r in listing.page_held("t", forged)[0]] == ["mine3", "mine2", "mine1", "mine0"]
    assert listing.page_held("t", ListQuery(cursor=Cursor(0)))[0] == []
    with pytest.raises(BadQuery):
        decode_cursor(base64.urlsafe_b64encode(b"[" * 5000 + b"]" * 5000).decode())


def test_runs_created_at_the_same_second_are_neither_lost_nor_repeated() -> None:
    index = RunIndex()
    listing = RunListing(index)
    for i in range(5):
        feed(index, submit(f"r{i}", at=100.0))
    pages = all_pages(listing, "t", ListQuery(limit=2))
    assert sorted(i for page in pages for i in page) == [f"r{i}" for i in range(5)]


def test_a_page_scans_a_bounded_number_of_runs_and_says_where_to_go_on() -> None:
    index = RunIndex()
    listing = RunListing(index)
    feed(index, submit("old", at=1.0, pipeline="a/rare:v1"))
    for i in range(30):
        feed(index, submit(f"r{i}", at=10.0 + i))
    query = ListQuery(pipeline="a/rare:v1")
    runs, cursor = listing.page_held("t", query, max_scan=20)
    assert runs == [] and cursor is not None  # nothing in the first 20, more to look at
    more = msgspec.structs.replace(query, cursor=decode_cursor(cursor))
    assert [r.id for r in listing.page_held("t", more, max_scan=20)[0]] == ["old"]


def test_filters_by_pipeline_state_and_creation_time() -> None:
    index = RunIndex()
    listing = RunListing(index)
    feed(index, submit("x1", 10.0, pipeline="a/x:v1") + submit("x2", 20.0, pipeline="a/x:v2"))
    feed(index, [*submit("y1", 30.0, pipeline="a/y:v1"), RunCancelled(run_id="x2", at=40.0)])

    def ids(**kw: object) -> list[str]:
        return [r.id for r in listing.page_held("t", ListQuery(**kw))[0]]  # type: ignore[arg-type]

    assert ids(pipeline="a/x") == ["x2", "x1"]
    assert ids(pipeline="a/x:v1") == ["x1"]
    assert ids(states=frozenset({RunState.cancelled})) == ["x2"]
    assert ids(created_after=20.0) == ["y1", "x2"]
    assert ids(created_before=20.0) == ["x1"]
    assert ids(created_after=15.0, created_before=30.0) == ["x2"]
    assert [r.id for r in listing.active("t")] == ["x1", "y1"]
    assert [r.id for r in listing.active(None)] == ["x1", "y1"]


def test_query_parameters_are_checked_and_named() -> None:
    assert parse_query({"state": ["queued,running"], "limit": ["5"]}) == ListQuery(
        states=frozenset({RunState.queued, RunState.running}), limit=5
    )
    for params, field in [
        ({"state": ["bogus"]}, "state"),
        ({"limit": ["0"]}, "limit"),
        ({"limit": ["101"]}, "limit"),
        ({"limit": ["ten"]}, "limit"),
        ({"created_after": ["nan"]}, "created_after"),
        ({"created_before": ["1e999"]}, "created_before"),
        ({"cursor": ["!!!"]}, "cursor"),
        ({"cursor": ["eyJhIjoxfQ"]}, "cursor"),  # valid base64, not a cursor
        ({"pipeline": ["a/b:v1", "a/c:v1"]}, "pipeline"),
    ]:
        with pytest.raises(BadQuery) as err:
            parse_query(params)
        assert err.value.field == field


@pytest.mark.anyio
async def test_listing_over_http_and_the_sdk(stack: Stack) -> None:
    ids = []
    async with client(stack, "tok_acme") as acme, client(stack, "tok_rival") as rival:
        for text in ("a", "b", "c"):
            body = {
                "pipeline": "demo/echo:v1",
                "inputs": [{"type": "string", "value": text}, {"type": "integer", "value": 1}],
                "async_run": True,
            }
            response = await acme.post("/v4/runs", json=body)
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])
            await wait_state(acme, ids[-1], {"completed"})
        await rival.post("/v4/runs", json={**body, "pipeline": "demo/noop:v1", "inputs": []})

        first = await acme.get("/v4/runs", params={"limit": 2, "pipeline": "demo/echo"})
        assert first.status_code == 200, first.text
        page = first.json()
        assert [r["id"] for r in page["runs"]] == ids[::-1][:2]
        assert page["runs"][0]["state"] == "completed" and page["runs"][0]["outputs"]
        second = await acme.get("/v4/runs", params={"limit": 2, "cursor": page["next_cursor"]})
        assert [r["id"] for r in second.json()["runs"]] == ids[:1]
        assert second.json()["next_cursor"] is None

        theirs = (await rival.get("/v4/runs")).json()["runs"]
        assert theirs and not set(ids) & {r["id"] for r in theirs}
        assert (await acme.get("/v4/runs", params={"pipeline": "demo/noop"})).json() == {
            "runs": [],
            "next_cursor": None,
        }

        bad = await acme.get("/v4/runs", params={"state": "done"})
        assert bad.status_code == 422 and bad.json()["detail"]["field"] == "state"
        assert (await acme.get("/v4/runs", headers={"Authorization": ""})).status_code == 401

    listed = await anyio.to_thread.run_sync(
        partial(
            sdk.list_runs,
            pipeline="demo/echo:v1",
            state="completed",
            base_url=stack.url,
            token="tok_acme",
        )
    )
    assert [r.id for r in listed.runs] == ids[::-1]

    def every_echo() -> list[str]:
        with sdk.Client(stack.url, "tok_acme") as c:
            return [r.id for r in c.iter_runs(pipeline="demo/echo", state=["completed"])]

    assert await anyio.to_thread.run_sync(every_echo) == ids[::-1]
    async with sdk.AsyncClient(stack.url, "tok_acme") as c:
        page1 = await c.list_runs(limit=1, created_after=listed.runs[-1].created_at)
        assert page1.runs[0].id == ids[-1] and page1.next_cursor
        with pytest.raises(sdk.JetrunError) as err:
            await c.list_runs(limit=1000)
        assert err.value.status == 422


def test_a_run_is_placed_by_its_first_event_and_active_until_its_end() -> None:
    """The listing hears a run's first event and its end, not every event between: a run read
    from its submission is placed and active until it ends; a run first read from its
    restatement is active but left for its history entry to place; a run that ends with
    its first event (refused at once) is never active."""
    index = RunIndex()
    listing = RunListing(index)
    feed(index, submit("s1", 10.0))
    restated = restate(
        RunRecord(id="r1", state=RunState.queued, team="t", pipeline="a/b:v1", created_at=5.0),
        of_seq=1,
        at=11.0,
        ticket=None,
    )
    feed(index, [restated])
    refused = RunRecord(id="n1", state=RunState.cancelled, team="t", pipeline="a/b:v1")
    feed(index, [restate(refused, of_seq=1, at=12.0, ticket=None)])
    assert [listing.placed(i) for i in ("s1", "r1", "n1")] == [True, False, False]
    assert [r.id for r in listing.active("t")] == ["s1", "r1"]
    feed(index, [RunCancelled(run_id="s1", at=13.0)])
    assert [r.id for r in listing.active("t")] == ["r1"]
    feed(index, [RunCancelled(run_id="r1", at=14.0)])
    assert listing.active("t") == [] and listing.active(None) == []
    assert [r.id for r in listing.page_held("t", ListQuery())[0]] == ["s1"]
