"""``ended_runs`` on a real nats-server: the ends an agent reports in one turn of its loop are
stored as one batch that every whole-log reader applies; a batch stored twice is stored once; a
batch on another agent's subject is refused by the permissions, and one on a forger's own
subject ends no run that was not dispatched to it; a cancelled run's end in a batch changes
nothing; a real agent's runs all complete once; a run ended by batches reads as ended from its
own subjects (``EventLog.load``, what a GET answers before the run's view is stored)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path

import anyio
import nats.errors
import pytest
from nats.aio.client import Client

from contracts import RunState, RunSubmitted
from contracts.events import (
    AdmissionGrant,
    RunCancelled,
    RunCancelRequested,
    RunCompleted,
    RunDispatched,
    RunsEnded,
    dispatched_runs,
    encode_event,
)
from contracts.values import from_python
from runtime.clients.client import RunEvents
from runtime.control.views import RunViews, find_run
from runtime.infra.event_subjects import ended_subject
from runtime.infra.eventlog import EventLog, kind_subjects
from runtime.infra.natsserver import NatsServer
from runtime.infra.projection import RunIndex
from runtime.infra.streams import EVENTS_STREAM
from runtime.node.agent import Agent
from runtime.node.attempts import Reporter
from runtime.node.ends import Ends
from tests.harness import FIXTURES, open_gate

pytestmark = pytest.mark.anyio

QUEUE = str(FIXTURES / "queue_pipelines.py")
PIPELINE = "test/queue-cancel:v1"


def submitted(run_id: str, at: float, gate: str = "/nonexistent") -> RunSubmitted:
    return RunSubmitted(
        run_id=run_id,
        at=at,
        team="acme",
        pipeline=PIPELINE,
        inputs=[from_python(gate)],
        admission=AdmissionGrant(tier="startup"),
    )


def completed(run_id: str, at: float) -> RunCompleted:
    return RunCompleted(run_id=run_id, at=at, attempt=1, outputs=[from_python(run_id)])


async def count(log: EventLog, subject: str) -> int:
    info = await log.js.stream_info(EVENTS_STREAM, subjects_filter=subject)
    return sum((info.state.subjects or {}).values())


async def whole_log(log: EventLog) -> RunIndex:
    index = RunIndex()
    for stored in await log.read_subject("jetrun.ev.>"):
        index.apply(stored.seq, stored.event)
    return index


async def dispatched_to(log: EventLog, agent_id: str, run_ids: list[str], at: float) -> None:
    for run_id in run_ids:
        await log.append(submitted(run_id, at))
    sent = [RunDispatched(run_id=r, at=at, attempt=1, agent_id=agent_id) for r in run_ids]
    await log.append(dispatched_runs(sent, at))


async def test_ends_reported_in_one_turn_are_one_batch_every_reader_applies(nc: Client) -> None:
    """Three ends reported by three attempts in the same turn: one ``ended_runs`` message, no
    plain end; the whole log's index and each run's own ``load`` (which reads the batches too)
    say completed, with the outputs."""
    log = EventLog(nc)
    now = time.time()
    runs = ["e1", "e2", "e3"]
    await dispatched_to(log, "ag", runs, now)
    ends = Ends(Reporter(log), "ag", lambda: 1 << 20, lambda: 3)
    async with anyio.create_task_group() as tg:
        for run_id in runs:
            end = completed(run_id, now + 0.01)
            tg.start_soon(ends.report, end, encode_event(end))
    assert await count(log, kind_subjects(RunsEnded.kind)) == 1
    assert await count(log, "jetrun.ev.*.completed") == 0
    index = await whole_log(log)
    for run_id in runs:
        whole, own = index.get(run_id), await log.load(run_id)
        assert whole is not None and whole.state is RunState.completed
        assert own.state is RunState.completed
        assert [o.value for o in whole.outputs] == [o.value for o in own.outputs] == [run_id]


async def test_a_lone_end_and_an_end_too_large_for_a_batch_go_alone(nc: Client) -> None:
    """No other attempt runs: the end is a plain event at once. A batch limit smaller than an
    end: that end goes alone, the others still together."""
    log = EventLog(nc)
    now = time.time()
    await dispatched_to(log, "ag", ["l1", "b1", "b2", "big"], now)
    lone = Ends(Reporter(log), "ag", lambda: 1 << 20, lambda: 1)
    await lone.report(completed("l1", now), encode_event(completed("l1", now)))
    assert await count(log, "jetrun.ev.l1.completed") == 1
    small = Ends(Reporter(log), "ag", lambda: 900, lambda: 3)
    big = RunCompleted(run_id="big", at=now, attempt=1, outputs=[from_python("x" * 800)])
    async with anyio.create_task_group() as tg:
        for end in (completed("b1", now), big, completed("b2", now)):
            tg.start_soon(small.report, end, encode_event(end))
    assert await count(log, "jetrun.ev.big.completed") == 1
    assert await count(log, kind_subjects(RunsEnded.kind)) == 1
    index = await whole_log(log)
    assert {index.get(r).state for r in ("l1", "b1", "b2", "big")} == {RunState.completed}  # type: ignore[union-attr]


async def test_a_batch_appended_twice_is_stored_once(nc: Client) -> None:
    log = EventLog(nc)
    batch = RunsEnded(
        run_id="_ended", at=1.0, agent_id="ag", ends=[completed("d1", 1.0), completed("d2", 1.0)]
    )
    first = await log.append(batch)
    again = await log.append(RunsEnded(run_id="_ended", at=2.0, agent_id="ag", ends=batch.ends))
    assert not first.duplicate and again.duplicate and again.seq == first.seq
    assert await count(log, kind_subjects(RunsEnded.kind)) == 1


async def test_a_forged_batch_is_refused_or_ignored(nats_server: NatsServer, nc: Client) -> None:
    """Agent ``evil`` may not publish on agent ``good``'s batch subject (the server refuses);
    a batch on its own subject naming runs dispatched to ``good`` is stored but no reader ends
    them with it."""
    log = EventLog(nc)
    now = time.time()
    await dispatched_to(log, "good", ["f1", "f2"], now)
    nats_server.add_agent("evil")
    evil = await nats_server.connect("agent:evil")
    try:
        forged = RunsEnded(run_id="_ended", at=now, agent_id="good", ends=[completed("f1", now)])
        with pytest.raises((TimeoutError, nats.errors.Error)):
            await evil.jetstream().publish(ended_subject("good"), encode_event(forged), timeout=1.0)
        assert await count(log, kind_subjects(RunsEnded.kind)) == 0
        own = RunsEnded(
            run_id="_ended",
            at=now,
            agent_id="evil",
            ends=[completed("f1", now), completed("f2", now)],
        )
        await evil.jetstream().publish(ended_subject("evil"), encode_event(own), timeout=5.0)
        assert await count(log, kind_subjects(RunsEnded.kind)) == 1
    finally:
        await evil.close()
    index = await whole_log(log)
    for run_id in ("f1", "f2"):
        assert index.get(run_id).state is RunState.running  # type: ignore[union-attr]
        assert not (await log.load(run_id)).state.is_terminal


async def test_a_cancelled_runs_end_in_a_batch_changes_nothing(nc: Client) -> None:
    log = EventLog(nc)
    now = time.time()
    await dispatched_to(log, "ag", ["c1", "c2"], now)
    await log.append(RunCancelled(run_id="c2", at=now + 0.001))
    ends = [completed("c1", now + 0.002), completed("c2", now + 0.002)]
    await log.append(RunsEnded(run_id="_ended", at=now + 0.002, agent_id="ag", ends=ends))
    index = await whole_log(log)
    assert index.get("c1").state is RunState.completed  # type: ignore[union-attr]
    assert index.get("c2").state is RunState.cancelled  # type: ignore[union-attr]
    assert (await log.load("c2")).state is RunState.cancelled


@pytest.fixture
async def agent(nc: Client) -> AsyncIterator[Agent]:
    agent = Agent(nc, modules=[QUEUE], cpu_slots=4, cpu_queue=8, heartbeat_interval_s=0.2)
    async with anyio.create_task_group() as tg:
        await tg.start(agent.run)
        yield agent
        tg.cancel_scope.cancel()


async def test_a_real_agents_runs_all_complete_once(
    nc: Client, agent: Agent, tmp_path: Path
) -> None:
    """Twelve runs dispatched to a real agent with four slots, gates open: each runs once and
    completes in the whole log (batched or not), exactly one end each."""
    log = EventLog(nc)
    now = time.time()
    gates = {f"r{i}": tmp_path / f"gate-{i}" for i in range(12)}
    for run_id, gate in gates.items():
        open_gate(gate, run_id)
        await log.append(submitted(run_id, now, str(gate)))
    sent = [
        RunDispatched(
            run_id=r,
            at=now,
            attempt=1,
            agent_id=agent.agent_id,
            team="acme",
            pipeline=PIPELINE,
            inputs=[from_python(str(g))],
        )
        for r, g in gates.items()
    ]
    await log.append(dispatched_runs(sent, now))
    with anyio.fail_after(30):
        while True:
            index = await whole_log(log)
            if all(index.get(r).state is RunState.completed for r in gates):  # type: ignore[union-attr]
                break
            await anyio.sleep(0.1)
    ends: dict[str, int] = {}
    for stored in await log.read_subject("jetrun.ev.>"):
        event = stored.event
        for one in event.ends if isinstance(event, RunsEnded) else [event]:
            if one.kind == "completed":
                ends[one.run_id] = ends.get(one.run_id, 0) + 1
    assert ends == dict.fromkeys(gates, 1)
    for run_id in gates:
        assert (await log.load(run_id)).state is RunState.completed


async def test_a_get_before_the_view_is_stored_answers_the_batched_end(nc: Client) -> None:
    """``find_run`` with no view stored (a GET through a gateway whose index lacks the run):
    a run dispatched and ended by batches is completed, not left ``routing``; also when a
    cancel request of its own came between its batched dispatch and its batched end (the
    agent then known only from the dispatch batch, before that request). ``jetrun events``
    (``history``) shows the dispatch and end as the run's own."""
    log = EventLog(nc)
    views = RunViews(log.js)
    await views.ensure()
    now = time.time()
    await dispatched_to(log, "ag", ["g1", "g2"], now)
    assert (await find_run(log, views, "g1")).state is RunState.running  # type: ignore[union-attr]
    await log.append(RunCancelRequested(run_id="g2", at=now + 0.001))
    ends = [completed("g1", now + 0.002), completed("g2", now + 0.002)]
    await log.append(RunsEnded(run_id="_ended", at=now + 0.002, agent_id="ag", ends=ends))
    for run_id in ("g1", "g2"):
        found = await find_run(log, views, run_id)
        assert found is not None and found.state is RunState.completed
        assert [o.value for o in found.outputs] == [run_id]
    kinds = [s.event.kind for s in await log.history("g2")]
    assert kinds == ["submitted", "dispatched", "cancel_requested", "completed"]
    forged = RunsEnded(run_id="_ended", at=now, agent_id="other", ends=[completed("g3", now)])
    await dispatched_to(log, "ag", ["g3"], now)
    await log.append(forged)
    assert (await find_run(log, views, "g3")).state is RunState.running  # type: ignore[union-attr]


async def test_a_client_watching_one_run_hears_its_batched_end_only_from_its_agent(
    nc: Client,
) -> None:
    log = EventLog(nc)
    now = time.time()
    await dispatched_to(log, "ag", ["w1", "w2"], now)
    forged = RunsEnded(run_id="_ended", at=now, agent_id="other", ends=[completed("w1", now)])
    await log.append(forged)
    ends = [completed("w2", now + 0.001), completed("w1", now + 0.001)]
    await log.append(RunsEnded(run_id="_ended", at=now + 0.001, agent_id="ag", ends=ends))
    seen: list[tuple[str, RunState]] = []
    with anyio.fail_after(10):
        async with aclosing(RunEvents(nc).watch(run_id="w1")) as changes:  # type: ignore[type-var]
            async for change in changes:
                seen.append((change.event.kind, change.run.state))
                if change.run.state.is_terminal:
                    break
    assert seen == [
        ("submitted", RunState.routing),
        ("dispatched", RunState.running),
        ("completed", RunState.completed),
    ]
