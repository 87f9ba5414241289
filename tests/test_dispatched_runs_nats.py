"""``dispatched_runs`` on a real nats-server, with a real agent: a batch reaches the agent and
each of its runs runs once; a run of a batch cancelled later in the log does not finish; the
fence refuses a fenced scheduler's batch and the same batch is stored once; an agent killed
holding runs a scheduler dispatched to it in one batch has them requeued and run once
elsewhere; a pass whose batch append failed decides nothing until its index read the log to
its end; readers of one run's own subjects (``EventLog.load``, the webhook outbox) see it
through; a client watching one run hears its ``dispatched``."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import pytest
from nats.aio.client import Client
from nats.js.errors import NotFoundError

from contracts import RunState, RunSubmitted
from contracts.agents import (
    Accelerator,
    AgentHeartbeat,
    LoadedPipeline,
    PipelineInfo,
    PipelineStatus,
    SchedulerHeartbeat,
)
from contracts.events import (
    ENDED_RUNS_ID,
    AdmissionGrant,
    AnyEvent,
    RunCancelled,
    RunCompleted,
    RunDispatched,
    RunsDispatched,
    RunsEnded,
    dispatched_runs,
)
from contracts.run import RunRecord
from contracts.values import from_python
from runtime.clients.client import RunEvents
from runtime.control import applier
from runtime.control.passes import packed
from runtime.control.readiness import SCHEDULER_HEARTBEAT_SUBJECT
from runtime.control.scheduler import Scheduler
from runtime.control.webhook_delivery import pending_subject
from runtime.control.webhooks import OUTBOX, WebhookService
from runtime.infra.config import parse
from runtime.infra.eventlog import Appended, EventLog, kind_subjects
from runtime.infra.fence import Fence, Fenced, append_all
from runtime.infra.natsserver import NatsServer
from runtime.infra.projection import RunIndex
from runtime.infra.streams import EVENTS_STREAM, WEBHOOKS_STREAM
from runtime.node.agent import Agent
from tests import harness
from tests.fakes import FakeClock
from tests.harness import FIXTURES, Stack, open_gate, wait_replicas, wait_state

pytestmark = pytest.mark.anyio

QUEUE = str(FIXTURES / "queue_pipelines.py")
RETRY = str(FIXTURES / "queue_retry_pipelines.py")
PIPELINE = "test/queue-cancel:v1"


def submitted(run_id: str, gate: Path, at: float) -> RunSubmitted:
    return RunSubmitted(
        run_id=run_id,
        at=at,
        team="acme",
        pipeline=PIPELINE,
        inputs=[from_python(str(gate))],
        admission=AdmissionGrant(tier="startup"),
    )


def dispatch(run_id: str, gate: Path, agent_id: str, at: float) -> RunDispatched:
    return RunDispatched(
        run_id=run_id,
        at=at,
        attempt=1,
        agent_id=agent_id,
        team="acme",
        pipeline=PIPELINE,
        inputs=[from_python(str(gate))],
    )


def executions(gate: Path) -> int:
    runs = gate.with_name(gate.name + ".runs")
    return len(runs.read_text().splitlines()) if runs.exists() else 0


async def count(log: EventLog, subject: str) -> int:
    info = await log.js.stream_info(EVENTS_STREAM, subjects_filter=subject)
    return sum((info.state.subjects or {}).values())


async def whole_log(log: EventLog) -> RunIndex:
    index = RunIndex()
    for stored in await log.read_subject("jetrun.ev.>"):
        index.apply(stored.seq, stored.event)
    return index


@pytest.fixture
async def agent(nc: Client) -> AsyncIterator[Agent]:
    agent = Agent(nc, modules=[QUEUE], cpu_slots=2, cpu_queue=2, heartbeat_interval_s=0.2)
    async with anyio.create_task_group() as tg:
        await tg.start(agent.run)
        yield agent
        tg.cancel_scope.cancel()


async def test_a_batch_reaches_the_agent_and_each_of_its_runs_runs_once(
    nc: Client, agent: Agent, tmp_path: Path
) -> None:
    """Three runs in one ``dispatched_runs`` on the agent's subject: each runs once and
    completes; the whole log and each run's own subjects (no batch there) agree."""
    log = EventLog(nc)
    now = time.time()
    gates = {f"b{i}": tmp_path / f"gate-{i}" for i in range(3)}
    for run_id, gate in gates.items():
        open_gate(gate, run_id)
        await log.append(submitted(run_id, gate, now))
    batch = dispatched_runs([dispatch(r, g, agent.agent_id, now) for r, g in gates.items()], now)
    stored = await log.append(batch)
    assert await count(log, kind_subjects(RunsDispatched.kind)) == 1
    with anyio.fail_after(30):
        while [(await log.load(r)).state for r in gates] != [RunState.completed] * 3:
            await anyio.sleep(0.05)
    assert [executions(g) for g in gates.values()] == [1, 1, 1]
    assert agent.seen_seq >= stored.seq
    index = await whole_log(log)
    for run_id in gates:
        own = await log.load(run_id)  # the run's own subjects: no dispatch among them
        whole = index.get(run_id)
        assert whole is not None and whole.agent_id == agent.agent_id
        assert (own.state, own.outputs, own.attempt) == (whole.state, whole.outputs, whole.attempt)


async def test_a_run_of_a_batch_cancelled_later_in_the_log_never_finishes(
    nc: Client, agent: Agent, tmp_path: Path
) -> None:
    """A batch of two runs, then the second's ``cancelled``: the first completes; the second,
    whether the agent heard the cancellation first (never started) or second (killed), leaves
    the agent and reports nothing, even once its gate opens."""
    log = EventLog(nc)
    now = time.time()
    done, gone = tmp_path / "done", tmp_path / "gone"
    open_gate(done, "done")
    for run_id, gate in (("c-done", done), ("c-gone", gone)):
        await log.append(submitted(run_id, gate, now))
    sent = [
        dispatch("c-done", done, agent.agent_id, now),
        dispatch("c-gone", gone, agent.agent_id, now),
    ]
    await log.append(dispatched_runs(sent, now))
    await log.append(RunCancelled(run_id="c-gone", at=now + 0.001))
    with anyio.fail_after(30):
        while (await log.load("c-done")).state is not RunState.completed:
            await anyio.sleep(0.05)
        while "c-gone" in agent.attempts:
            await anyio.sleep(0.05)
    open_gate(gone, "too late")
    assert executions(done) == 1 and executions(gone) <= 1
    ends = await log.read("c-gone")
    assert [s.event.kind for s in ends] == ["submitted", "cancelled"]
    assert (await whole_log(log)).get("c-gone").state is RunState.cancelled  # type: ignore[union-attr]


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
            sent = [
                RunDispatched(run_id=f"d{i}", at=1.0, attempt=1, agent_id="ag") for i in range(3)
            ]
            batch = dispatched_runs(sent, 1.0)
            [first] = await append_all(a.log, a, [batch])
            assert isinstance(first, Appended) and not first.duplicate
            [again] = await append_all(a.log, a, [dispatched_runs(sent, 1.5)])  # restamped
            assert isinstance(again, Appended) and again.duplicate and again.seq == first.seq
            await b.establish(term=2)
            later = [
                RunDispatched(run_id=f"l{i}", at=2.0, attempt=1, agent_id="ag") for i in range(3)
            ]
            [refused] = await append_all(a.log, a, [dispatched_runs(later, 2.0)])
            assert isinstance(refused, Fenced)
            assert await count(a.log, kind_subjects(RunsDispatched.kind)) == 1
    finally:
        await a_nc.close()
        await b_nc.close()


NODE_LOSS_S = 2.0


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """nats-server, a scheduler, a gateway; agents are started by the test."""
    tmp = tmp_path_factory.mktemp("dbatch")
    async with Stack(tmp, node_loss_timeout_s=NODE_LOSS_S) as stack:
        await stack.start_nats()
        stack.start_scheduler()
        await stack.start_gateway()
        yield stack


async def submit(c: httpx.AsyncClient, gate: Path, pointer: str) -> str:
    body = {
        "pipeline": pointer,
        "async_run": True,
        "wait_for_resources": True,
        "inputs": [{"type": "string", "value": str(gate)}],
    }
    response = await c.post("/v4/runs", json=body)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


async def test_an_agent_killed_holding_a_batch_has_its_runs_requeued_and_run_once_elsewhere(
    stack: Stack, tmp_path: Path
) -> None:
    """Two runs wait in their queue while no agent serves their pipeline; the agent that
    comes up gets both in one ``dispatched_runs`` (its own NATS identity reads it), runs them,
    and is SIGKILLed: both are requeued (attempt 2) and complete on another agent, each run
    twice in all (killed mid-run, then again), never more."""
    pointer = "test/queue-retry:v1"
    first = stack.start_agent("agent-dr0", RETRY, slots=1)  # registers the pipeline
    await wait_replicas(stack.url, "tok_big", pointer)
    assert first.stop() is not None
    gates = [tmp_path / "g0", tmp_path / "g1"]
    async with harness.client(stack, "tok_big") as c:
        ids = [await submit(c, gate, pointer) for gate in gates]
        for run_id in ids:
            await wait_state(c, run_id, {"queued"}, timeout=15)
        victim = stack.start_agent("agent-dr1", RETRY, slots=2, queue_depth=0)
        with anyio.fail_after(30):
            while not all(executions(g) for g in gates):
                await anyio.sleep(0.05)
        nc = await stack.connect()
        try:
            log = EventLog(nc)
            batches = [
                s.event
                for s in await log.read_subject(kind_subjects(RunsDispatched.kind))
                if isinstance(s.event, RunsDispatched)
            ]
            assert [(b.agent_id, sorted(r.run_id for r in b.runs)) for b in batches] == [
                ("agent-dr1", sorted(ids))
            ]
        finally:
            await nc.close()
        rescuer = stack.start_agent("agent-dr2", RETRY, slots=2)
        try:
            await wait_replicas(stack.url, "tok_big", pointer, n=2)
            victim.kill()  # SIGKILL: the agent and its workers
            for i, gate in enumerate(gates):
                open_gate(gate, str(i))
            done = [await wait_state(c, r, {"completed", "node_preempted"}, 30) for r in ids]
        finally:
            rescuer.stop()
    assert [(d["state"], d["attempt"]) for d in done] == [("completed", 2), ("completed", 2)]
    assert [executions(g) for g in gates] == [2, 2]


CONFIG = parse(
    {
        "teams": {"acme": {"tier": "startup", "tokens": ["tok_acme"]}},
        "settings": {"checkpoint_every_s": 0, "replay_deadline_s": 5},
    }
)


def beat(
    agent_id: str, status: PipelineStatus = PipelineStatus.ready, batches: bool = True
) -> AgentHeartbeat:
    return AgentHeartbeat(
        agent_id=agent_id,
        at=0.0,
        started_at=0.0,
        accelerators=[Accelerator(kind="cpu", slots=2)],
        pipelines=[LoadedPipeline(pointer=PIPELINE, status=status)],
        batches=batches,
    )


async def test_no_batched_dispatch_while_a_scheduler_of_a_release_before_batches_is_heard(
    nc: Client,
) -> None:
    """A scheduler of a release before ``dispatched_runs`` skips a batch: a run it dispatched
    reads ``routing`` to it, and if it led next it would dispatch that run again (run twice).
    While one is heard (a standby during a rolling upgrade: its heartbeat has no ``batches``),
    the leader dispatches each run alone; once it is gone, in batches again."""
    clock = FakeClock()
    scheduler = Scheduler(nc, CONFIG, clock=clock)
    await scheduler.ensure()
    await scheduler.catalog.register(PipelineInfo(pointer=PIPELINE))
    async with scheduler.following():
        scheduler.fleet.observe(beat("a1"))
        older = SchedulerHeartbeat(scheduler_id="scheduler-older", at=0.0, started_at=0.0)
        await nc.publish(SCHEDULER_HEARTBEAT_SUBJECT, msgspec.json.encode(older))
        await nc.flush()
        with anyio.fail_after(10):
            while not scheduler.peers.older_heard():
                await anyio.sleep(0.01)
        for run_id in ("p1", "p2"):
            await scheduler.log.append(submitted(run_id, Path("/nonexistent"), time.time()))
        await scheduler.index.wait_for_seq(await scheduler.log.last_seq(), timeout=5)
        with anyio.fail_after(20):
            await scheduler.decide()
        assert await count(scheduler.log, kind_subjects(RunsDispatched.kind)) == 0
        assert await count(scheduler.log, "jetrun.ev.*.dispatched.a1") == 2
        own = scheduler.heartbeat()  # its own heartbeat says it reads batches: not an older one
        assert own.batches
        await nc.publish(SCHEDULER_HEARTBEAT_SUBJECT, msgspec.json.encode(own))
        await nc.flush()
        await anyio.sleep(0.05)
        assert scheduler.peers.older_heard()  # its own heartbeat changes nothing
        clock.advance(scheduler.peers.timeout_s + 1)  # the older one is gone
        assert not scheduler.peers.older_heard()
        scheduler.fleet.observe(beat("a2"))  # a1's two slots are taken
        for run_id in ("p3", "p4"):
            await scheduler.log.append(submitted(run_id, Path("/nonexistent"), time.time()))
        await scheduler.index.wait_for_seq(await scheduler.log.last_seq(), timeout=5)
        with anyio.fail_after(20):
            await scheduler.decide()
        assert await count(scheduler.log, kind_subjects(RunsDispatched.kind)) == 1


async def test_an_agent_hears_a_scheduler_of_a_release_before_batches(
    nc: Client, agent: Agent
) -> None:
    """An agent ends attempts alone while it hears one (``Ends``: each end as itself), and
    its own scheduler's heartbeats (``batches``) change nothing."""
    assert not agent.peers.older_heard()
    current = SchedulerHeartbeat(scheduler_id="scheduler-new", at=0.0, started_at=0.0, batches=True)
    await nc.publish(SCHEDULER_HEARTBEAT_SUBJECT, msgspec.json.encode(current))
    older = SchedulerHeartbeat(scheduler_id="scheduler-older", at=0.0, started_at=0.0)
    await nc.publish(SCHEDULER_HEARTBEAT_SUBJECT, msgspec.json.encode(older))
    await nc.flush()
    with anyio.fail_after(10):
        while not agent.peers.older_heard():
            await anyio.sleep(0.01)


async def test_an_agent_of_a_release_before_batches_gets_each_dispatch_alone(
    nc: Client,
) -> None:
    """During a rolling upgrade an agent of a release before ``dispatched_runs`` skips a batch
    as an unknown kind and would never run its runs: the scheduler batches a pass's
    dispatches only to an agent whose heartbeat says it takes batches."""
    scheduler = Scheduler(nc, CONFIG, clock=FakeClock())
    await scheduler.ensure()
    await scheduler.catalog.register(PipelineInfo(pointer=PIPELINE))
    async with scheduler.following():
        scheduler.fleet.observe(beat("old", batches=False))  # no ``batches`` in its heartbeat
        for run_id in ("o1", "o2"):
            await scheduler.log.append(submitted(run_id, Path("/nonexistent"), time.time()))
        await scheduler.index.wait_for_seq(await scheduler.log.last_seq(), timeout=5)
        with anyio.fail_after(20):
            await scheduler.decide()
        assert await count(scheduler.log, kind_subjects(RunsDispatched.kind)) == 0
        assert await count(scheduler.log, "jetrun.ev.*.dispatched.old") == 2
        for run_id in ("o1", "o2"):
            run = scheduler.index.get(run_id)
            assert run is not None and (run.state, run.agent_id) == (RunState.running, "old")


async def test_runs_of_a_batch_whose_append_failed_are_decided_again_only_from_the_whole_log(
    nc: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch stored whose ack never came back (an outage, a timeout): its message id dedupes
    only that same batch, so the scheduler decides nothing more until its index has read the
    log to its end; then it finds the runs dispatched, and dispatches them nowhere else."""
    held: list[tuple[int, AnyEvent]] = []
    holding = False
    real_apply, real_append_all = RunIndex.apply, applier.append_all

    def apply(index: RunIndex, seq: int, event: AnyEvent, batched: int = -1) -> RunRecord | None:
        if holding and batched < 0:  # the index lags: what the tail delivers waits
            held.append((seq, event))
            return None
        return real_apply(index, seq, event, batched)

    async def reply_lost(*args: Any) -> list[Appended | Exception]:
        nonlocal holding
        holding = True
        results = await real_append_all(*args)
        return [TimeoutError("no ack") if isinstance(r, Appended) else r for r in results]

    monkeypatch.setattr(RunIndex, "apply", apply)
    monkeypatch.setattr(applier, "CATCH_UP_S", 0.3)
    scheduler = Scheduler(nc, CONFIG, clock=FakeClock())
    await scheduler.ensure()
    await scheduler.catalog.register(PipelineInfo(pointer=PIPELINE))
    async with scheduler.following():
        scheduler.fleet.observe(beat("a1"))
        for run_id in ("u1", "u2"):
            await scheduler.log.append(submitted(run_id, Path("/nonexistent"), time.time()))
        await scheduler.index.wait_for_seq(await scheduler.log.last_seq(), timeout=5)
        with anyio.fail_after(20):
            monkeypatch.setattr(applier, "append_all", reply_lost)
            await scheduler.decide()  # stored, but the scheduler does not know it
            monkeypatch.setattr(applier, "append_all", real_append_all)
            assert await count(scheduler.log, kind_subjects(RunsDispatched.kind)) == 1
            scheduler.fleet.observe(beat("a1", PipelineStatus.loading))
            scheduler.fleet.observe(beat("a2"))  # a picture without the batch: a2 is free
            await scheduler.decide()
            assert await count(scheduler.log, kind_subjects(RunsDispatched.kind)) == 1
            for seq, event in held:  # the index reads on
                real_apply(scheduler.index, seq, event)
            holding = False
            await scheduler.decide()
    assert await count(scheduler.log, kind_subjects("dispatched")) == 1
    for run_id in ("u1", "u2"):
        run = scheduler.index.get(run_id)
        assert run is not None and (run.state, run.agent_id) == (RunState.running, "a1")


async def test_a_client_watching_one_run_hears_its_dispatched_from_a_batch(nc: Client) -> None:
    """``RunEvents.watch(run_id=...)`` reads the batches' subject too: it yields the run's own
    ``dispatched`` (and nothing of the batch's other runs)."""
    log = EventLog(nc)
    now = time.time()
    for run_id in ("w-other", "w-mine"):
        await log.append(submitted(run_id, Path("/nonexistent"), now))
    seen: list[tuple[str, RunState, str | None]] = []
    with anyio.fail_after(10):
        async with aclosing(RunEvents(nc).watch(run_id="w-mine")) as changes:  # type: ignore[type-var]
            async for change in changes:
                seen.append((change.event.kind, change.run.state, change.run.agent_id))
                if change.event.kind == "submitted":
                    sent = [dispatch(r, Path("/g"), "agent-w", now) for r in ("w-other", "w-mine")]
                    await log.append(dispatched_runs(sent, now))
                if change.event.kind == "dispatched":
                    break
    assert seen == [
        ("submitted", RunState.routing, None),
        ("dispatched", RunState.running, "agent-w"),
    ]


async def test_a_watch_from_after_a_batched_dispatch_hears_the_batched_end(nc: Client) -> None:
    """A watch from a later sequence loads the run's earlier events, its entries of batches
    included: the agent a batch dispatched it to is known, so that agent's ``ended_runs``
    entry ends it (rule 11) and the watch yields it."""
    log = EventLog(nc)
    now = time.time()
    for run_id in ("l-other", "l-mine"):
        await log.append(submitted(run_id, Path("/nonexistent"), now))
    sent = [dispatch(r, Path("/g"), "agent-l", now) for r in ("l-other", "l-mine")]
    after = (await log.append(dispatched_runs(sent, now))).seq + 1
    ended = [RunCompleted(run_id=r, at=now + 1, attempt=1, outputs=[]) for r in ("l-mine", "l-x")]
    await log.append(RunsEnded(run_id=ENDED_RUNS_ID, at=now + 1, agent_id="agent-l", ends=ended))
    with anyio.fail_after(10):
        watch = RunEvents(nc).watch(run_id="l-mine", from_seq=after)
        async with aclosing(watch) as changes:  # type: ignore[type-var]
            change = await anext(changes)
    assert (change.event.kind, change.run.state, change.run.agent_id) == (
        "completed",
        RunState.completed,
        "agent-l",
    )


WEBHOOK_CONFIG = parse(
    {
        "teams": {
            "acme": {"tier": "startup", "tokens": ["tok"], "webhook_secret": "whsec_" + "a" * 24}
        }
    }
)


async def test_the_webhook_outbox_posts_the_end_of_a_run_with_a_callback(nc: Client) -> None:
    """The outbox folds the run's own subjects: a pass's dispatches of runs with a callback
    are not batched (``packed``), so it reads the dispatch there, then the end, and queues
    the callback, as completed."""
    service = WebhookService(nc, WEBHOOK_CONFIG)
    await service.ensure()
    log = EventLog(nc)
    now = time.time()
    hook = "http://127.0.0.1:9/hook"
    for run_id in ("h-other", "h-mine"):
        event = submitted(run_id, Path("/g"), now)
        await log.append(msgspec.structs.replace(event, callback_url=hook))
    sent = [
        msgspec.structs.replace(dispatch(r, Path("/g"), "agent-h", now), callback=True)
        for r in ("h-other", "h-mine")
    ]
    appended = packed(list(sent))
    assert appended == sent  # each alone, on its run's own subject
    for event in appended:
        await log.append(event)
    done = RunCompleted(run_id="h-mine", at=now + 1, attempt=1, outputs=[from_python("ok")])
    await log.append(done, callback=True)
    js = nc.jetstream()
    outbox = await js.pull_subscribe_bind(durable=OUTBOX, stream=EVENTS_STREAM)
    async with anyio.create_task_group() as tg:
        tg.start_soon(service._outbox_loop, outbox)
        with anyio.fail_after(20):
            while True:
                try:
                    msg = await js.get_last_msg(WEBHOOKS_STREAM, pending_subject("acme", "h-mine"))
                    break
                except NotFoundError:
                    await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    delivery = msgspec.json.decode(msg.data)
    assert delivery["run"]["state"] == "completed" and delivery["url"] == hook
