"""Bounded history: ended runs leave memory once their view is stored, services start from the
scheduler's checkpoint instead of sequence 1, and any gateway answers any run, however old."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import httpx
import pytest
from nats.aio.client import Client

from contracts import RunState, RunSubmitted
from contracts.agents import PipelineInfo
from contracts.events import (
    AdmissionGrant,
    AnyEvent,
    RunCompleted,
    RunDispatched,
    RunQueued,
    RunStarted,
)
from contracts.values import RunIO
from runtime.control.gateway import Gateway
from runtime.control.scheduler import Scheduler
from runtime.control.views import RunViews, find_run, start_position
from runtime.infra.config import parse
from runtime.infra.eventlog import EventLog, LogSettings
from runtime.infra.projection import RunIndex
from runtime.infra.streams import EVENTS_STREAM
from runtime.provision import provision
from tests.fakes import FakeClock

pytestmark = pytest.mark.anyio

T0 = 1_000_000.0
PIPELINE = "t/p:v1"
CONFIG = parse(
    {
        "teams": {
            "acme": {"tier": "startup", "tokens": ["tok_acme"]},
            "rival": {"tier": "startup", "tokens": ["tok_rival"]},
        },
        "settings": {"keep_ended_s": 60, "checkpoint_every_s": 0, "replay_deadline_s": 5},
    }
)


def submitted(run_id: str, at: float, team: str = "acme") -> RunSubmitted:
    return RunSubmitted(
        run_id=run_id,
        at=at,
        team=team,
        pipeline=PIPELINE,
        inputs=[RunIO(type="string", value="x")],
        admission=AdmissionGrant(tier="startup"),
    )


def completed_history(run_id: str, at: float, team: str = "acme") -> list[AnyEvent]:
    return [
        submitted(run_id, at, team),
        RunQueued(run_id=run_id, at=at, attempt=1),
        RunDispatched(run_id=run_id, at=at + 1, attempt=1, agent_id="a1"),
        RunStarted(run_id=run_id, at=at + 1, attempt=1, agent_id="a1"),
        RunCompleted(
            run_id=run_id, at=at + 2, attempt=1, outputs=[RunIO(type="string", value="y")]
        ),
    ]


def feed(index: RunIndex, events: list[AnyEvent]) -> None:
    for event in events:
        index.apply(index.last_seq + 1, event)


# --- the index, no NATS ------------------------------------------------------------------------


def test_ended_runs_are_forgotten_after_the_window_and_live_ones_kept() -> None:
    index = RunIndex()
    feed(index, completed_history("old", T0))
    feed(index, [submitted("live", T0 + 1), RunQueued(run_id="live", at=T0 + 1, attempt=1)])
    feed(index, completed_history("recent", T0 + 100))
    forgotten: list[str] = []
    index.on_forget(lambda run: forgotten.append(run.id))
    assert index.forget_ended(T0 + 50) == 1
    assert forgotten == ["old"]
    assert index.get("old") is None and index.get("recent") is not None
    assert index.queue_position("live") == 0
    assert index.replay_from() == 6  # the live run's first event: read from there on a restart


def test_a_run_whose_view_is_not_stored_stays_and_holds_the_replay_position() -> None:
    index = RunIndex()
    feed(index, completed_history("a", T0))
    feed(index, completed_history("b", T0))
    assert index.forget_ended(T0 + 50, may=lambda run_id: run_id != "a") == 0
    assert index.replay_from() == 1
    assert index.forget_ended(T0 + 50) == 2
    assert index.replay_from() == index.last_seq + 1 == 11


def test_a_replay_from_a_checkpoint_ignores_runs_that_began_before_it() -> None:
    index = RunIndex()
    index.start_at(3)  # the run's submitted (1), queued (2), dispatched (3) are before
    for seq, event in enumerate(completed_history("r", T0)[3:], start=4):
        index.apply(seq, event)
    assert index.get("r") is None and index.last_seq == 5


# --- on a real nats-server ---------------------------------------------------------------------


async def fill(log: EventLog, runs: int, at: float = T0, team: str = "acme") -> list[str]:
    ids = [f"done{i}" for i in range(runs)]
    for run_id in ids:
        for event in completed_history(run_id, at, team):
            await log.append(event)
    return ids


@pytest.fixture
async def log(nc: Client) -> AsyncIterator[EventLog]:
    """The admin step for CONFIG (its permit streams too): services only wait for streams."""
    await provision(nc, CONFIG, LogSettings())
    yield EventLog(nc)


async def test_the_scheduler_stores_views_forgets_ended_runs_and_a_restart_starts_late(
    nc: Client, log: EventLog
) -> None:
    ids = await fill(log, 20)
    await log.append(submitted("live", T0 + 10))
    first = Scheduler(nc, CONFIG)
    async with first.following():
        assert len(first.index.records) == 21
        await first.keeper.step(T0 + 1000, 0.0)  # past the window: views stored, then forgotten
        assert set(first.index.records) == {"live"}
    views = RunViews(log.js)
    await views.ensure()
    checkpoint = await views.checkpoint()
    assert checkpoint is not None and checkpoint.replay_from == 101  # "live" was appended at 101
    stored = await views.get(ids[0])
    assert stored is not None and stored.state is RunState.completed and stored.team == "acme"

    second = Scheduler(nc, CONFIG)
    async with second.following():  # reads from 101: 1 event, not 101
        assert set(second.index.records) == {"live"}
        live = second.index.get("live")
        assert live is not None and live.state is RunState.routing
        assert second.index.last_seq == 101
    assert await find_run(log, views, ids[-1]) == await views.get(ids[-1])


async def test_a_gateway_answers_old_runs_and_runs_another_gateway_just_made(
    nc: Client, log: EventLog
) -> None:
    ids = await fill(log, 3)
    scheduler = Scheduler(nc, CONFIG)
    async with scheduler.following():
        await scheduler.keeper.step(T0 + 1000, 0.0)
    await log.append(submitted("fresh", T0 + 2000))
    gateway = Gateway(nc, CONFIG)
    async with anyio.create_task_group() as tg:
        await tg.start(gateway.run)
        await gateway.catalog.register(PipelineInfo(pointer=PIPELINE))
        assert gateway.index.get(ids[0]) is None  # never held: started from the checkpoint
        gateway.index.records.pop("fresh")  # as if this gateway had not seen it yet
        transport = httpx.ASGITransport(app=gateway.app())
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
            acme = {"Authorization": "Bearer tok_acme"}
            rival = {"Authorization": "Bearer tok_rival"}
            old = await http.get(f"/v4/runs/{ids[0]}", headers=acme)
            assert old.status_code == 200 and old.json()["state"] == "completed"
            new = await http.get("/v4/runs/fresh", headers=acme)
            assert new.status_code == 200 and new.json()["id"] == "fresh"
            assert (await http.get(f"/v4/runs/{ids[0]}", headers=rival)).status_code == 404
            assert (await http.get("/v4/runs/nope", headers=acme)).status_code == 404
            assert (await http.get("/v4/runs/a.b", headers=acme)).status_code == 404
        tg.cancel_scope.cancel()


async def test_a_gateway_and_a_scheduler_sharing_one_index_apply_each_event_once(
    nc: Client, log: EventLog
) -> None:
    """``jetrun up``: one feed, one index. Each event is applied once; the gateway leaves
    forgetting to the scheduler, which forgets an ended run only once its view is stored."""
    ids = await fill(log, 3)
    index = RunIndex()
    applied: list[int] = []
    apply = index.apply

    def counted(seq: int, event: AnyEvent) -> object:
        applied.append(seq)
        return apply(seq, event)

    index.apply = counted  # type: ignore[method-assign]
    clock = FakeClock(T0 + 1000)  # every run ended long before: past keep_ended_s
    gateway = Gateway(nc, CONFIG, index=index, clock=clock)
    scheduler = Scheduler(nc, CONFIG, feed=gateway.feed, index=index, clock=clock)
    assert scheduler.index is gateway.index
    async with anyio.create_task_group() as tg:
        await tg.start(gateway.run)
        async with scheduler.following():
            await log.append(submitted("live", T0 + 10))
            assert await index.wait_for_seq(16, timeout=5)
            assert applied == sorted(set(applied)) and len(applied) == 16
            await anyio.sleep(0.1)  # the gateway's own forgetting would have run by now
            assert set(ids) <= set(index.records)  # views not stored: nothing forgotten
            await scheduler.keeper.step(T0 + 1000, 0.0)  # views stored, then forgotten
            assert set(index.records) == {"live"}
            assert gateway.index.get(ids[0]) is None
        tg.cancel_scope.cancel()


async def test_an_empty_or_fully_aged_out_stream_starts_at_once(nc: Client) -> None:
    settings = LogSettings(max_age_s=1.0, duplicate_window_s=1.0)
    await nc.jetstream().delete_stream(EVENTS_STREAM)  # remade by the admin step with 1 s
    await provision(nc, CONFIG, settings)
    log = EventLog(nc, settings)
    await fill(log, 2)
    with anyio.fail_after(10):
        while (await log.js.stream_info(EVENTS_STREAM)).state.messages:
            await anyio.sleep(0.2)
    views = RunViews(log.js)
    await views.ensure()
    assert await start_position(log.js, views) == (11, 10)
    scheduler = Scheduler(nc, CONFIG)
    with anyio.fail_after(3):  # before: waited for sequence 10, which never comes
        async with scheduler.following():
            assert scheduler.caught_up and scheduler.index.last_seq == 10


async def test_the_api_says_starting_until_the_gateway_has_caught_up(nc: Client) -> None:
    gateway = Gateway(nc, CONFIG)  # not run: still catching up
    transport = httpx.ASGITransport(app=gateway.app())
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
        answer = await http.get("/v4/runs/x", headers={"Authorization": "Bearer tok_acme"})
        assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
        assert answer.json()["detail"]["code"] == "starting"
        assert (await http.get("/healthz")).status_code == 200


async def test_a_run_whose_view_is_over_a_message_is_read_from_its_events(
    nc: Client, log: EventLog
) -> None:
    """A team's run with large inputs and outputs (each event fits; the view holding both
    does not): its view cannot be stored. The scheduler's keeper logs that and carries on
    (the put raised out of its step and ended the scheduler, for every team); the run is
    forgotten like any other and read back from its events."""
    half = "x" * (nc.max_payload * 5 // 8)
    big = RunSubmitted(
        run_id="run_big",
        at=T0,
        team="acme",
        pipeline=PIPELINE,
        inputs=[RunIO(type="string", value=half)],
        admission=AdmissionGrant(tier="startup"),
    )
    await log.append(big)
    await log.append(RunQueued(run_id="run_big", at=T0, attempt=1))
    await log.append(RunDispatched(run_id="run_big", at=T0, attempt=1, agent_id="a1"))
    outputs = [RunIO(type="string", value=half)]
    await log.append(RunCompleted(run_id="run_big", at=T0 + 1, attempt=1, outputs=outputs))
    ids = await fill(log, 2)
    scheduler = Scheduler(nc, CONFIG)
    async with scheduler.following():
        with anyio.fail_after(30):
            await scheduler.keeper.step(T0 + 1000, 0.0)
        assert not scheduler.keeper.unstored
        assert scheduler.index.get("run_big") is None and scheduler.index.get(ids[0]) is None
    views = RunViews(log.js)
    await views.ensure()
    assert await views.get("run_big") is None
    assert await views.get(ids[0]) is not None
    run = await find_run(log, views, "run_big")
    assert run is not None and run.state is RunState.completed and run.outputs == outputs


def ended(index: RunIndex, run_id: str) -> bool:
    run = index.get(run_id)
    return run is not None and run.is_terminal


class ParkedClock(FakeClock):
    """A clock whose sleeps never end: the keeper's loop makes one step and no other."""

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep_forever()


@pytest.mark.parametrize("leading", [True, False])
async def test_the_leader_stores_a_view_as_its_run_ends_not_at_its_next_step(
    nc: Client, log: EventLog, leading: bool
) -> None:
    """The leading scheduler stores a run's view once the run has ended, between its keeper's
    steps (a step every second stored a second's views at once and delayed the process's other
    work meanwhile); a standby stores none."""
    scheduler = Scheduler(nc, CONFIG)
    keeper = scheduler.keeper
    async with scheduler.following(), anyio.create_task_group() as tg:
        tg.start_soon(keeper.run, ParkedClock(T0), lambda: leading)
        await anyio.sleep(0.05)  # its one step is over
        ids = await fill(log, 3)
        with anyio.fail_after(10):
            while not all(ended(scheduler.index, run_id) for run_id in ids):
                await anyio.sleep(0.01)
            while leading and keeper.unstored:
                await anyio.sleep(0.01)
        await anyio.sleep(0.1)
        stored = [await keeper.views.get(run_id) for run_id in ids]
        tg.cancel_scope.cancel()
    if leading:
        assert all(run is not None and run.state is RunState.completed for run in stored)
        assert not keeper.unstored
    else:
        assert stored == [None, None, None] and len(keeper.unstored) == 3


async def test_views_of_runs_that_end_close_together_are_stored_together(
    nc: Client, log: EventLog
) -> None:
    """A run's view waits ``batch_s`` for the runs that end after it, then all are stored in
    one round (one write to the server for them all), not one put per run as each ends."""
    scheduler = Scheduler(nc, CONFIG)
    keeper = scheduler.keeper
    keeper.batch_s = 1.0
    rounds: list[set[str]] = []
    store = keeper._store_unstored

    async def counted() -> None:
        if pending := set(keeper.unstored) - keeper._storing:
            rounds.append(pending)
        await store()

    keeper._store_unstored = counted  # type: ignore[method-assign]
    async with scheduler.following(), anyio.create_task_group() as tg:
        tg.start_soon(keeper.run, ParkedClock(T0), lambda: True)
        await anyio.sleep(0.05)  # its one step is over
        first = await fill(log, 1)
        with anyio.fail_after(10):
            while not ended(scheduler.index, first[0]):
                await anyio.sleep(0.01)
        await anyio.sleep(0.2)
        assert first[0] in keeper.unstored and not rounds  # waiting for the runs after it
        ids = [*first, *[f"later{i}" for i in range(2)]]
        for run_id in ids[1:]:
            for event in completed_history(run_id, T0, "acme"):
                await log.append(event)
        with anyio.fail_after(10):
            while keeper.unstored or not rounds:
                await anyio.sleep(0.01)
        stored = [await keeper.views.get(run_id) for run_id in ids]
        tg.cancel_scope.cancel()
    assert rounds == [set(ids)]
    assert all(run is not None and run.state is RunState.completed for run in stored)
