"""``queued_runs`` on a real nats-server: a decision pass that queues several runs stores one
message for them; the fence refuses a fenced scheduler's batch; a run a batch queued is
restated behind its own last event and keeps its place for a reader that starts after its
events aged out; a client watching one run hears its ``queued``; a reader of the run's own
subjects sees it ``routing`` until it is dispatched."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing

import anyio
import pytest
from nats.aio.client import Client

from contracts import RunState, RunSubmitted, WaitingFor
from contracts.agents import PipelineInfo
from contracts.events import (
    AdmissionGrant,
    RunDispatched,
    RunQueued,
    RunRestated,
    RunsQueued,
    queued_runs,
)
from runtime.clients.client import RunEvents
from runtime.control.scheduler import Scheduler
from runtime.control.views import RunViews, find_run
from runtime.infra.config import parse
from runtime.infra.eventlog import Appended, EventLog, LogSettings, kind_subjects
from runtime.infra.fence import Fence, Fenced, append_all
from runtime.infra.natsserver import NatsServer
from runtime.infra.streams import EVENTS_STREAM
from runtime.provision import provision
from tests.fakes import FakeClock

pytestmark = pytest.mark.anyio

PIPELINE = "t/p:v1"
CONFIG = parse(
    {
        "teams": {"acme": {"tier": "startup", "tokens": ["tok_acme"]}},
        "settings": {"keep_ended_s": 1, "checkpoint_every_s": 0, "replay_deadline_s": 5},
    }
)


def submitted(run_id: str, at: float) -> RunSubmitted:
    return RunSubmitted(
        run_id=run_id,
        at=at,
        team="acme",
        pipeline=PIPELINE,
        inputs=[],
        wait_for_resources=True,
        admission=AdmissionGrant(tier="startup"),
    )


async def count(log: EventLog, subject: str) -> int:
    info = await log.js.stream_info(EVENTS_STREAM, subjects_filter=subject)
    return sum((info.state.subjects or {}).values())


async def test_a_pass_that_queues_several_runs_stores_one_message(nc: Client) -> None:
    """30 runs routed in one pass with no replica anywhere: one ``queued_runs`` message, no
    ``queued`` one, and the queue in admission order with every run waiting for a replica."""
    clock = FakeClock()
    scheduler = Scheduler(nc, CONFIG, clock=clock)
    await scheduler.ensure()
    await scheduler.catalog.register(PipelineInfo(pointer=PIPELINE))
    ids = [f"run-{i:02}" for i in range(30)]
    async with scheduler.following():
        for run_id in ids:
            await scheduler.log.append(submitted(run_id, clock.now()))
        await scheduler.index.wait_for_seq(await scheduler.log.last_seq(), timeout=5)
        with anyio.fail_after(10):
            await scheduler.decide()
        assert scheduler.index.queued(PIPELINE) == ids
        assert {scheduler.index.get(r).waiting_for for r in ids} == {WaitingFor.resources}  # type: ignore[union-attr]
        assert await count(scheduler.log, kind_subjects(RunsQueued.kind)) == 1
        assert await count(scheduler.log, kind_subjects(RunQueued.kind)) == 0
        assert scheduler.statistics().decisions == 30


async def test_a_fenced_schedulers_batch_is_refused_and_a_repeated_one_is_stored_once(
    nats_server: NatsServer, nc: Client
) -> None:
    del nc  # the log's streams, as the admin step makes them
    a_nc = await nats_server.connect("scheduler", "a")
    b_nc = await nats_server.connect("scheduler", "b")
    try:
        a, b = Fence(EventLog(a_nc), "a", slots=4), Fence(EventLog(b_nc), "b", slots=4)
        with anyio.fail_after(20):
            await a.establish(term=1)
            batch = queued_runs(
                [RunQueued(run_id=f"q{i}", at=1.0, attempt=1) for i in range(3)], 1.0
            )
            [first] = await append_all(a.log, a, [batch])
            assert isinstance(first, Appended) and not first.duplicate
            [again] = await append_all(a.log, a, [batch])  # the same decision: stored once
            assert isinstance(again, Appended) and again.duplicate and again.seq == first.seq
            await b.establish(term=2)
            later = queued_runs(
                [RunQueued(run_id=f"l{i}", at=2.0, attempt=1) for i in range(3)], 2.0
            )
            [refused] = await append_all(a.log, a, [later])
            assert isinstance(refused, Fenced)
            assert await count(a.log, kind_subjects(RunsQueued.kind)) == 1
    finally:
        await a_nc.close()
        await b_nc.close()


MAX_AGE_S = 3.0


@pytest.fixture
async def short_log(nc: Client) -> AsyncIterator[EventLog]:
    settings = LogSettings(max_age_s=MAX_AGE_S, duplicate_window_s=MAX_AGE_S)
    await nc.jetstream().delete_stream(EVENTS_STREAM)  # remade by the admin step with 3 s
    await provision(nc, CONFIG, settings)
    yield EventLog(nc, settings)


async def test_runs_a_batch_queued_are_restated_and_keep_their_places_after_aging_out(
    nc: Client, short_log: EventLog
) -> None:
    """The restatement of a run a batch queued expects the run's own last event (the batch is
    not on its subjects: expecting the batch's sequence there would be refused for ever, and
    the run lost once its events age out). A scheduler that starts after they aged out holds
    the runs, queued in the batch's order."""
    log = short_log
    now = time.time()
    ids = ["b-first", "b-second", "b-third"]
    for run_id in ids:
        await log.append(submitted(run_id, now))
    batch = queued_runs([RunQueued(run_id=r, at=now, attempt=1) for r in ids[::-1]], now)
    await log.append(batch)
    views = RunViews(log.js)
    await views.ensure()
    scheduler = Scheduler(nc, CONFIG)
    async with scheduler.following(), anyio.create_task_group() as tg:
        assert scheduler.index.queued(PIPELINE) == ids[::-1]
        # as the leading scheduler does: every half max_age, while the runs are live
        tg.start_soon(scheduler.restater.run, scheduler.clock, lambda: True, 0.2)
        with anyio.fail_after(10):
            while len(stored := await log.read_subject("jetrun.ev.*.restated")) < 3:
                await anyio.sleep(0.1)
        first = sorted(s.event.of_seq for s in stored if isinstance(s.event, RunRestated))
        assert first[:3] == [1, 2, 3]  # each run's submitted: its last event on its subjects
        with anyio.fail_after(15):
            while await count(log, kind_subjects(RunsQueued.kind)):  # the batch aged out
                await anyio.sleep(0.2)
        await scheduler.keeper.step(time.time(), 0.0)  # the checkpoint moves past them
        again = Scheduler(nc, CONFIG)
        async with again.following():
            assert again.index.replay_from() > 4
            assert again.index.queued(PIPELINE) == ids[::-1]
            assert [again.index.queue_position(r) for r in ids[::-1]] == [0, 1, 2]
        tg.cancel_scope.cancel()


async def test_one_runs_readers_hear_its_queued_or_see_it_routing(nc: Client) -> None:
    """A client watching one run hears the run's own ``queued`` from a batch (and nothing of
    the batch's other runs); a reader of the run's own subjects alone (``find_run`` when no
    view is stored) sees it ``routing`` until it is dispatched, then ``running``."""
    log = EventLog(nc)
    views = RunViews(log.js)
    await views.ensure()
    now = time.time()
    for run_id in ("w-other", "w-mine"):
        await log.append(submitted(run_id, now))
    events = RunEvents(nc)
    seen: list[tuple[str, RunState]] = []
    with anyio.fail_after(10):
        async with aclosing(events.watch(run_id="w-mine")) as changes:  # type: ignore[type-var]
            async for change in changes:
                seen.append((change.event.kind, change.run.state))
                if change.event.kind == "submitted":
                    batch = [RunQueued(run_id=r, at=now, attempt=1) for r in ("w-other", "w-mine")]
                    await log.append(queued_runs(batch, now))
                if change.event.kind == "queued":
                    break
    assert seen == [("submitted", RunState.routing), ("queued", RunState.queued)]
    found = await find_run(log, views, "w-mine")
    assert found is not None and found.state is RunState.routing
    await log.append(RunDispatched(run_id="w-mine", at=now + 1, attempt=1, agent_id="a1"))
    found = await find_run(log, views, "w-mine")
    assert found is not None and found.state is RunState.running
