"""Live runs outlive their events: a run still queued when its ``submitted`` event ages out of
the log is restated by the leading scheduler first, and every reader finds it there (a process
starting from the checkpoint, a gateway asked for it, webhooks, an agent)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import anyio
import pytest
from nats.aio.client import Client
from nats.js.errors import APIError, NotFoundError

from contracts import RunState, RunSubmitted
from contracts.agents import PipelineInfo
from contracts.events import (
    AdmissionGrant,
    AnyEvent,
    RunDispatched,
    RunOutputProduced,
    RunQueued,
    RunRestated,
)
from contracts.machine import restate
from contracts.values import IOType, RunIO
from runtime.control.restate import restate_before
from runtime.control.scheduler import Scheduler
from runtime.control.views import RunViews, find_run
from runtime.infra.catalog import Catalog
from runtime.infra.config import load, parse
from runtime.infra.eventlog import (
    EventLog,
    LogSettings,
    event_subject,
    last_event_of_kind,
    submission_of,
)
from runtime.infra.natsserver import free_port
from runtime.infra.projection import RunIndex
from runtime.infra.streams import EVENTS_STREAM
from runtime.provision import provision
from runtime.services import apply_retention_at
from tests.harness import Stack, client, wait_state
from tests.test_webhooks import Receiver, _handler, start_deliverer, write_config

pytestmark = pytest.mark.anyio

T0 = 1_000_000.0
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
        inputs=[RunIO(type=IOType.string, value=f"input of {run_id}")],
        admission=AdmissionGrant(tier="startup"),
        callback_url="https://hooks.example.com/h",
    )


def queued(run_id: str, at: float) -> list[AnyEvent]:
    return [submitted(run_id, at), RunQueued(run_id=run_id, at=at, attempt=1)]


def feed(index: RunIndex, events: list[AnyEvent]) -> None:
    for event in events:
        index.apply(index.last_seq + 1, event)


# --- the index and the rule, no NATS -----------------------------------------------------------


def test_nothing_is_restated_while_the_log_keeps_events_for_ever() -> None:
    assert restate_before(T0, 0.0) is None
    assert restate_before(T0, 100.0) == T0 - 50.0


def test_live_runs_are_due_oldest_first_and_a_restatement_moves_the_replay_position() -> None:
    index = RunIndex()
    feed(index, queued("a", T0))  # 1, 2
    feed(index, queued("b", T0 + 10))  # 3, 4
    feed(index, [submitted("c", T0 + 100)])  # 5
    assert [(run.id, seq) for run, seq in index.restatable(T0 + 50, 10)] == [("a", 2), ("b", 4)]
    assert [run.id for run, _ in index.restatable(T0 + 50, 1)] == ["a"]
    a = index.get("a")
    assert a is not None and index.ticket("a") == (1, 2, 0)
    index.apply(6, restate(a, 2, T0 + 60, index.ticket("a")))
    assert index.get("a") == a  # a known run: nothing changes
    assert index.replay_from() == 3  # "a" is held from its restatement on; "b" is now the oldest
    assert [run.id for run, _ in index.restatable(T0 + 50, 10)] == ["b"]
    assert index.queue_position("a") == 0 and index.queue_position("b") == 1


def test_a_reader_that_starts_after_the_old_events_keeps_the_queue_order() -> None:
    writer = RunIndex()
    feed(writer, queued("a", T0) + queued("b", T0 + 1))  # 1-4
    restated = []
    for run_id in ("b", "a"):  # in any order: each keeps its own place
        run = writer.get(run_id)
        assert run is not None
        restated.append(restate(run, writer._last_of[run_id], T0 + 60, writer.ticket(run_id)))
    reader = RunIndex()
    reader.start_at(4)  # the events of "a" and "b" aged out
    for seq, event in enumerate([*restated, *queued("c", T0 + 61)], start=5):
        reader.apply(seq, event)
    assert [reader.queue_position(r) for r in ("a", "b", "c")] == [0, 1, 2]
    a = reader.get("a")
    assert a is not None and a.inputs == [RunIO(type=IOType.string, value="input of a")]
    assert reader.queued(PIPELINE) == ["a", "b", "c"]


# --- on a real nats-server, a log that keeps events 3 s --------------------------------------

MAX_AGE_S = 3.0


@pytest.fixture
async def log(nc: Client) -> AsyncIterator[EventLog]:
    settings = LogSettings(max_age_s=MAX_AGE_S, duplicate_window_s=MAX_AGE_S)
    await nc.jetstream().delete_stream(EVENTS_STREAM)  # remade by the admin step with 3 s
    await provision(nc, CONFIG, settings)
    yield EventLog(nc, settings)


async def aged_out(log: EventLog, run_id: str, kind: str, timeout: float = 15.0) -> None:
    with anyio.fail_after(timeout):
        while True:
            try:
                await log.js.get_msg(EVENTS_STREAM, subject=event_subject(run_id, kind))
            except NotFoundError:
                return
            await anyio.sleep(0.2)


async def test_a_queued_run_is_restated_before_its_events_age_out_and_found_after(
    nc: Client, log: EventLog
) -> None:
    now = time.time()
    for event in queued("live", now):
        await log.append(event)
    views = RunViews(log.js)
    await views.ensure()
    scheduler = Scheduler(nc, CONFIG)
    async with scheduler.following(), anyio.create_task_group() as tg:
        assert await scheduler.restater.step(now + 0.5, 0.0) == 0  # not due yet
        # as the leading scheduler does: every half max_age, while the run is live
        tg.start_soon(scheduler.restater.run, scheduler.clock, lambda: True, 0.2)
        with anyio.fail_after(10):
            while (restated := await last_event_of_kind(log, "live", "restated")) is None:
                await anyio.sleep(0.1)
        assert isinstance(restated, RunRestated) and restated.of_seq == 2
        run = scheduler.index.get("live")
        assert run is not None
        stale = restate(run, 2, time.time(), None)  # made from an event that is not the last
        with pytest.raises(APIError):
            await log.append(stale, expect_last_seq=2)
        await aged_out(log, "live", "submitted")
        assert scheduler.index.replay_from() > 2  # held from a restatement on
        await scheduler.keeper.step(time.time(), 0.0)  # the checkpoint moves past 1 and 2

        found = await find_run(log, views, "live")
        assert found == run and found.state is RunState.queued
        submission = await submission_of(log, "live")  # what webhooks and an agent read
        assert submission is not None and submission.callback_url == "https://hooks.example.com/h"
        assert submission.inputs == run.inputs and submission.team == "acme"
        again = Scheduler(nc, CONFIG)
        async with again.following():  # from the checkpoint: a restatement, nothing older
            assert again.index.get("live") == run
            assert again.index.queued(PIPELINE) == ["live"]
        await log.append(RunDispatched(run_id="live", at=time.time(), attempt=1, agent_id="a1"))
        dispatched = await find_run(log, views, "live")
        assert dispatched is not None and dispatched.state is RunState.running
        tg.cancel_scope.cancel()


# --- real processes: a stack whose log keeps events 8 s --------------------------------------


@contextlib.contextmanager
def receiving() -> Iterator[Receiver]:
    """A local webhook receiver (as tests/test_webhooks.py's)."""
    box = Receiver(free_port())
    server = ThreadingHTTPServer(("127.0.0.1", box.port), _handler(box))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield box
    finally:
        server.shutdown()
        server.server_close()


async def test_a_run_queued_longer_than_the_log_keeps_events_completes_with_its_inputs(
    tmp_path: Path,
) -> None:
    """No replica until the run's first events aged out; the gateway and the scheduler are
    killed and started again in between; then a replica comes, the run completes with its
    inputs and its callback URL gets it."""
    async with Stack(tmp_path / "stack") as stack:
        stack.tmp.mkdir()
        await stack.start_nats()
        write_config(stack.config_path, attempts=3)  # a webhook secret for acme
        text = stack.config_path.read_text()
        assert "keep_ended_s = 300.0\n" in text
        # 8 s: the restatement made at about 4 s outlives the restart gap (a scheduler must
        # lead at least once in every half max_age)
        retention = "keep_ended_s = 1\nevents_max_age_s = 8\ncheckpoint_every_s = 0.5\n"
        stack.config_path.write_text(text.replace("keep_ended_s = 300.0\n", retention))
        settings = load(stack.config_path).settings
        assert await apply_retention_at(stack.nats_url, settings, stack.credentials("admin"))
        nc = await stack.connect()
        await Catalog(nc.jetstream()).register(PipelineInfo(pointer="demo/echo:v1"))
        log = EventLog(nc)
        stack.start_scheduler()
        await stack.start_gateway()
        start_deliverer(stack, "webhooks", stack.config_path)
        with receiving() as receiver:
            async with client(stack, "tok_acme") as http:
                answer = await http.post(
                    "/v4/runs",
                    json={
                        "pipeline": "demo/echo:v1",
                        "inputs": [
                            {"type": "string", "value": "kept"},
                            {"type": "integer", "value": 2},
                        ],
                        "async_run": True,
                        "callback_url": receiver.url("/ok"),
                    },
                )
                assert answer.status_code in (200, 201, 202), answer.text
                run_id = answer.json()["id"]
                await wait_state(http, run_id, {"queued"})
            await aged_out(log, run_id, "submitted")
            assert await last_event_of_kind(log, run_id, "restated") is not None
            for proc in [p for p in stack.procs if p.name.startswith(("gateway", "scheduler"))]:
                proc.kill()
                stack.procs.remove(proc)
            stack.gateway_urls.clear()
            stack.start_scheduler()
            await stack.start_gateway()
            async with client(stack, "tok_acme") as http:
                answer = await http.get(f"/v4/runs/{run_id}")
                assert answer.status_code == 200, answer.text
                run = answer.json()
                assert run["state"] == "queued", run
                assert [i["value"] for i in run["inputs"]] == ["kept", 2]
                stack.start_agent("agent-late", "runtime.node.demo")
                done = await wait_state(http, run_id, set(TERMINAL), timeout=60)
            assert done["state"] == "completed", done
            assert [o["value"] for o in done["outputs"]] == ["keptkept"]
            with anyio.fail_after(30):
                while not receiver.ok(run_id):
                    await anyio.sleep(0.05)
            assert receiver.ok(run_id)[0]["run"]["state"] == "completed"
        await nc.close()


TERMINAL = {"completed", "failed", "no_resources_available", "node_preempted", "cancelled"}


async def test_a_run_too_large_to_restate_is_logged_and_the_scheduler_carries_on(
    nc: Client, log: EventLog
) -> None:
    """A running run that streamed more output than one message holds (each output fits):
    its restatement cannot be appended. The restater logs that and carries on with the other
    runs (the MaxPayloadError ended the leading scheduler, for every team)."""
    now = time.time()
    half = "x" * (nc.max_payload * 5 // 8)
    for event in queued("big", now):
        await log.append(event)
    await log.append(RunDispatched(run_id="big", at=now, attempt=1, agent_id="a1"))
    for index in (0, 1):
        output = RunIO(type=IOType.string, value=half)
        await log.append(
            RunOutputProduced(run_id="big", at=now, attempt=1, index=index, output=output)
        )
    for event in queued("small", now):
        await log.append(event)
    scheduler = Scheduler(nc, CONFIG)
    async with scheduler.following():
        with anyio.fail_after(10):
            assert await scheduler.restater.step(now + MAX_AGE_S, 0.0) == 1
    restated = await last_event_of_kind(log, "small", "restated")
    assert isinstance(restated, RunRestated)
    assert await last_event_of_kind(log, "big", "restated") is None
