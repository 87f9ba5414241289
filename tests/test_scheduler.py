"""The scheduler's decisions, driven step by step with a fake clock, on a real nats-server."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

import anyio
import msgspec
import pytest
from nats.aio.client import Client

from contracts import RunAdmitted, RunCancelRequested, RunState, RunSubmitted, WaitingFor
from contracts.agents import (
    Accelerator,
    AgentHeartbeat,
    LoadedPipeline,
    PipelineInfo,
    PipelineStatus,
)
from contracts.errors import ErrorType
from contracts.events import (
    AdmissionGrant,
    AdmissionSlot,
    Event,
    RunCompleted,
    RunOutputProduced,
    RunsDispatched,
    RunStarted,
)
from contracts.run import RunRecord
from contracts.values import from_python
from runtime.control.scheduler import Scheduler
from runtime.infra.catalog import Catalog
from runtime.infra.config import parse
from runtime.infra.eventlog import kind_subjects
from runtime.infra.fleet import HEARTBEAT_SUBJECT, NODE_RECALLED, drain_subject
from tests.fakes import FakeClock

pytestmark = pytest.mark.anyio

CONFIG = parse({"settings": {"node_loss_timeout_s": 10, "resource_wait_timeout_s": 60}})


def beat(
    agent_id: str, pointer: str, slots: int = 1, status: PipelineStatus = PipelineStatus.ready
) -> AgentHeartbeat:
    return AgentHeartbeat(
        agent_id=agent_id,
        at=0.0,
        started_at=0.0,
        accelerators=[Accelerator(kind="cpu", slots=slots)],
        pipelines=[LoadedPipeline(pointer=pointer, status=status)],
    )


class Harness:
    def __init__(self, scheduler: Scheduler, clock: FakeClock) -> None:
        self.scheduler, self.clock = scheduler, clock
        self.log = scheduler.log

    async def settle(self) -> None:
        """Decide until nothing changes; the index has every event the decisions appended."""
        for _ in range(20):
            before = self.scheduler.index.last_seq
            await self.scheduler.decide()
            await self.scheduler.index.wait_for_seq(await self.log.last_seq(), timeout=5)
            if self.scheduler.index.last_seq == before:
                return
        raise AssertionError("decisions did not settle")

    async def submit(self, run_id: str, pointer: str = "t/p:v1", wait: bool = True) -> None:
        now = self.clock.now()
        await self.log.append(
            RunSubmitted(
                run_id=run_id,
                at=now,
                team="t",
                pipeline=pointer,
                inputs=[],
                wait_for_resources=wait,
            )
        )
        await self.log.append(RunAdmitted(run_id=run_id, at=now, tier="startup"))
        await self.settle()

    def run(self, run_id: str) -> RunRecord:
        run = self.scheduler.index.get(run_id)
        assert run is not None
        return run


@pytest.fixture
async def h(nc: Client) -> AsyncIterator[Harness]:
    clock = FakeClock()
    scheduler = Scheduler(nc, CONFIG, clock=clock)
    await scheduler.ensure()
    await scheduler.catalog.register(PipelineInfo(pointer="t/p:v1", max_retries=0))
    await scheduler.catalog.register(PipelineInfo(pointer="t/retry:v1", max_retries=1))
    async with scheduler.following():
        yield Harness(scheduler, clock)


async def test_dispatches_to_a_ready_agent_with_a_free_slot_in_fifo_order(h: Harness) -> None:
    h.scheduler.fleet.observe(beat("a1", "t/p:v1", slots=1))
    for run_id in ("r1", "r2", "r3"):
        await h.submit(run_id)
    assert h.run("r1").state is RunState.running and h.run("r1").agent_id == "a1"
    assert h.run("r2").state is RunState.queued
    assert h.run("r2").waiting_for is WaitingFor.capacity
    assert h.scheduler.index.queue_position("r3") == 1
    await h.log.append(RunCompleted(run_id="r1", at=h.clock.now(), attempt=1, outputs=[]))
    await h.settle()
    assert h.run("r2").state is RunState.running
    assert h.scheduler.index.queue_position("r3") == 0
    stats = h.scheduler.statistics()
    assert stats.caught_up and stats.live_agents == 1 and stats.pending_decisions == 0


async def test_no_replica_and_no_waiting_ends_at_once(h: Harness) -> None:
    await h.submit("r1", wait=False)
    run = h.run("r1")
    assert run.state is RunState.no_resources_available


async def test_waiting_runs_give_up_after_the_resource_wait_timeout(h: Harness) -> None:
    await h.submit("r1")
    assert h.run("r1").waiting_for is WaitingFor.resources
    h.clock.advance(59)
    await h.scheduler.tick()
    await h.settle()
    assert h.run("r1").state is RunState.queued
    h.clock.advance(2)
    await h.scheduler.tick()
    await h.settle()
    assert h.run("r1").state is RunState.no_resources_available


async def test_a_loading_replica_means_cold_start_then_dispatch(h: Harness) -> None:
    h.scheduler.fleet.observe(beat("a1", "t/p:v1", status=PipelineStatus.loading))
    await h.submit("r1")
    assert h.run("r1").waiting_for is WaitingFor.cold_start
    h.scheduler.fleet.observe(beat("a1", "t/p:v1"))
    await h.settle()
    assert h.run("r1").state is RunState.running


async def test_a_lost_agent_preempts_its_runs(h: Harness) -> None:
    h.scheduler.fleet.observe(beat("a1", "t/p:v1"))
    await h.submit("r1")
    await h.log.append(RunStarted(run_id="r1", at=h.clock.now(), attempt=1, agent_id="a1"))
    h.clock.advance(5)
    await h.scheduler.tick()
    await h.settle()
    assert h.run("r1").state is RunState.running
    h.clock.advance(6)
    await h.scheduler.tick()
    await h.settle()
    assert h.run("r1").state is RunState.node_preempted
    # a heartbeat from the lost agent does not bring it back
    h.scheduler.fleet.observe(beat("a1", "t/p:v1"))
    assert h.scheduler.fleet.live() == []


async def test_a_lost_agent_requeues_runs_with_retries_left(h: Harness) -> None:
    h.scheduler.fleet.observe(beat("a1", "t/retry:v1"))
    await h.submit("r1", "t/retry:v1")
    h.clock.advance(11)
    h.scheduler.fleet.observe(beat("a2", "t/retry:v1"))
    await h.scheduler.tick()
    await h.settle()
    run = h.run("r1")
    assert run.state is RunState.running and run.attempt == 2 and run.agent_id == "a2"
    # the stale attempt's completion changes nothing
    await h.log.append(RunCompleted(run_id="r1", at=h.clock.now(), attempt=1, outputs=[]))
    await h.settle()
    assert h.run("r1").state is RunState.running
    # a second loss: no retries left
    h.clock.advance(11)
    await h.scheduler.tick()
    await h.settle()
    assert h.run("r1").state is RunState.node_preempted


async def test_cancel_requests_are_honoured(h: Harness) -> None:
    await h.submit("r1")
    await h.log.append(RunCancelRequested(run_id="r1", at=h.clock.now()))
    await h.settle()
    assert h.run("r1").state is RunState.cancelled


async def test_a_restarted_scheduler_carries_on_from_the_log(nc: Client) -> None:
    clock = FakeClock()
    first = Scheduler(nc, CONFIG, clock=clock)
    await first.ensure()
    await first.catalog.register(PipelineInfo(pointer="t/p:v1"))
    async with first.following():
        h = Harness(first, clock)
        first.fleet.observe(beat("a1", "t/p:v1"))
        await h.submit("r1")
        await h.submit("r2")
    second = Scheduler(nc, CONFIG, clock=clock)
    async with second.following():
        h2 = Harness(second, clock)
        assert h2.run("r1").state is RunState.running
        assert second.index.queue_position("r2") == 0
        # the agent it never heard from is lost after the timeout
        await second.tick()
        clock.advance(11)
        await second.tick()
        await h2.settle()
        assert h2.run("r1").state is RunState.node_preempted


async def test_an_attempt_its_live_agent_no_longer_runs_is_recovered(h: Harness) -> None:
    h.scheduler.fleet.observe(beat("a1", "t/retry:v1", slots=2))
    await h.submit("kept", "t/retry:v1")
    await h.submit("lost", "t/retry:v1")
    h.clock.advance(6)
    listing = msgspec.structs.replace(beat("a1", "t/retry:v1", slots=2), running=["kept"])
    # the agent has not processed the dispatch of "lost" yet (its consumer is being
    # recreated, say): that is no loss
    h.scheduler.fleet.observe(listing)
    await h.scheduler.tick()
    await h.settle()
    assert h.run("lost").attempt == 1 and h.run("lost").state is RunState.running
    # it has processed everything and does not run "lost": the attempt was lost
    seen = msgspec.structs.replace(listing, seen_seq=await h.log.last_seq())
    h.scheduler.fleet.observe(seen)
    await h.scheduler.tick()
    await h.settle()
    assert h.run("kept").state is RunState.running and h.run("kept").attempt == 1
    lost = h.run("lost")
    assert lost.attempt == 2 and lost.state is RunState.running  # requeued and dispatched again


async def test_a_run_its_gateway_never_admitted_is_admitted_with_its_permit(nc: Client) -> None:
    clock = FakeClock()
    config = parse(
        {"teams": {"acme": {"tier": "basic", "tokens": ["t"]}}, "settings": {"release_grace_s": 30}}
    )
    scheduler = Scheduler(nc, config, clock=clock)
    await scheduler.ensure()
    await scheduler.catalog.register(PipelineInfo(pointer="t/p:v1"))
    async with scheduler.following():
        h = Harness(scheduler, clock)
        scheduler.fleet.observe(beat("a1", "t/p:v1"))
        slot = await scheduler.admission.try_admit(
            team="acme", tier="basic", limit=3, run_id="r1", now=clock.now()
        )
        # the gateway died right after recording the submission
        await h.log.append(
            RunSubmitted(run_id="r1", at=clock.now(), team="acme", pipeline="t/p:v1", inputs=[])
        )
        await h.settle()
        await scheduler.tick()
        assert h.run("r1").state is RunState.created
        clock.advance(31)
        scheduler.fleet.observe(beat("a1", "t/p:v1"))  # the agent is still there
        await scheduler.tick()
        await h.settle()
        run = h.run("r1")
        assert run.state is RunState.running and run.slot == slot and run.tier == "basic"


async def test_queued_runs_say_what_they_wait_for_as_the_fleet_changes(h: Harness) -> None:
    await h.submit("r1")
    assert h.run("r1").waiting_for is WaitingFor.resources
    h.scheduler.fleet.observe(beat("a1", "t/p:v1", status=PipelineStatus.loading))
    await h.scheduler.tick()
    await h.settle()
    assert h.run("r1").state is RunState.queued
    assert h.run("r1").waiting_for is WaitingFor.cold_start
    h.scheduler.fleet.observe(beat("a1", "t/p:v1"))
    await h.scheduler.tick()
    await h.settle()
    assert h.run("r1").state is RunState.running


async def test_runs_admitted_together_are_queued_in_admission_order(h: Harness) -> None:
    ids = [f"r{i}" for i in range(30)]
    for run_id in ids:  # all admitted before the scheduler decides anything
        await h.log.append(
            RunSubmitted(
                run_id=run_id,
                at=h.clock.now(),
                team="t",
                pipeline="t/p:v1",
                inputs=[],
                wait_for_resources=True,
            )
        )
        await h.log.append(RunAdmitted(run_id=run_id, at=h.clock.now(), tier="startup"))
    await h.scheduler.index.wait_for_seq(await h.log.last_seq(), timeout=5)
    await h.settle()
    assert [h.scheduler.index.queue_position(r) for r in ids] == list(range(30))


async def test_a_draining_agent_is_never_dispatched_new_runs(nc: Client) -> None:
    """An agent asks to drain while the scheduler is handing a long queue out: no run is
    dispatched to it after its notice, and every run it had is handled (preempted as recalled)
    before the answer, so none ends later as a lost node's run that never started."""
    config = parse({"settings": {"node_loss_timeout_s": 30}})
    scheduler = Scheduler(nc, config, tick_s=0.05)
    await scheduler.ensure()
    await scheduler.catalog.register(PipelineInfo(pointer="t/p:v1"))
    log = scheduler.log
    ids = [f"d{i}" for i in range(80)]

    async def submit(run_id: str) -> None:
        at = time.time()
        await log.append(
            RunSubmitted(
                run_id=run_id,
                at=at,
                team="t",
                pipeline="t/p:v1",
                inputs=[],
                wait_for_resources=True,
            )
        )
        await log.append(RunAdmitted(run_id=run_id, at=at, tier="startup"))

    def settled() -> bool:
        runs = [scheduler.index.get(r) for r in ids]
        return all(
            r is not None and r.state not in (RunState.created, RunState.routing) for r in runs
        )

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            await tg.start(scheduler.run)
            async with anyio.create_task_group() as load:
                for run_id in ids:
                    load.start_soon(submit, run_id)
            await _until(settled)  # all queued, waiting for a replica
            # the notice may be heard before or after the first pass hands runs to a1: a2 alone
            # can take the whole queue, so it empties whichever way they interleave
            for agent_id, slots in (("a1", 60), ("a2", len(ids))):
                data = msgspec.json.encode(beat(agent_id, "t/p:v1", slots=slots))
                await nc.publish(f"{HEARTBEAT_SUBJECT}.{agent_id}", data)
            await nc.flush()
            reply = await nc.request(drain_subject("a1"), b"a1", timeout=5)
            handled = int(reply.data)
            await _until(lambda: scheduler.index.queue_depth("t/p:v1") == 0)
            dispatched = await log.read_subject(kind_subjects("dispatched"))
            each = [  # a pass's dispatches to one agent are one dispatched_runs
                e
                for s in dispatched
                for e in (s.event.each() if isinstance(s.event, RunsDispatched) else [s.event])
            ]
            to_a1 = {e.run_id for e in each if getattr(e, "agent_id", "") == "a1"}
            preempted = await log.read_subject(kind_subjects("preempted"))
            reasons = {s.event.run_id: getattr(s.event, "reason", "") for s in preempted}
            assert set(reasons) == to_a1 and handled == len(to_a1)
            assert all(reason.startswith(NODE_RECALLED) for reason in reasons.values())
            assert not scheduler.index.on_agent.get("a1")
            tg.cancel_scope.cancel()


async def _until(done: Callable[[], bool]) -> None:
    while not done():
        await anyio.sleep(0.02)


async def test_a_changed_retry_count_is_used_without_a_restart(h: Harness) -> None:
    h.scheduler.fleet.observe(beat("a1", "t/p:v1"))
    await h.submit("r1")
    assert h.run("r1").agent_id == "a1"
    # the pipeline's agents restart with one retry allowed
    changed = PipelineInfo(pointer="t/p:v1", max_retries=1)
    await Catalog(h.scheduler.log.js).register(changed)
    with anyio.fail_after(10):
        while h.scheduler.catalog.cached("t/p:v1") != changed:
            await anyio.sleep(0.01)
    h.clock.advance(11)
    h.scheduler.fleet.observe(beat("a2", "t/p:v1"))
    await h.scheduler.tick()
    await h.settle()
    run = h.run("r1")
    assert run.attempt == 2 and run.state is RunState.running and run.agent_id == "a2"


async def test_a_run_whose_permit_was_given_back_before_it_reached_the_log_never_runs(
    h: Harness,
) -> None:
    """A gateway cut off from NATS answered "outcome unknown"; the sweep gave the permit back;
    then the buffered submitted landed. Only a run whose team still holds its permit runs."""
    h.scheduler.fleet.observe(beat("a1", "t/p:v1", slots=2))
    admission = h.scheduler.admission
    late_at = h.clock.now() - 60
    slots = {}
    for run_id in ("held", "given-back"):
        slots[run_id] = await admission.try_admit(
            team="t", tier="basic", limit=3, run_id=run_id, now=late_at
        )
    assert slots["given-back"] is not None and await admission.release(slots["given-back"])
    for run_id, slot in slots.items():
        grant = AdmissionGrant(tier="basic", slot=slot)
        await h.log.append(
            RunSubmitted(
                run_id=run_id, at=late_at, team="t", pipeline="t/p:v1", inputs=[], admission=grant
            )
        )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (
        h.run("held").state is RunState.running and h.run("given-back").is_terminal
    ):
        await h.scheduler.decide()
        await anyio.sleep(0.05)
    assert h.run("held").state is RunState.running
    gone = h.run("given-back")
    assert gone.state is RunState.failed and gone.error is not None
    assert gone.error.type is ErrorType.unknown
    assert gone.error.message.startswith("not_admitted: ")
    assert "given back before the run reached the event log" in gone.error.message


async def applied(h: Harness, event: Event) -> None:
    seq = (await h.log.append(event)).seq
    await h.scheduler.index.wait_for_seq(seq, timeout=5)


async def test_a_start_an_output_or_an_end_that_frees_nothing_wakes_no_pass(h: Harness) -> None:
    h.scheduler.fleet.observe(beat("a1", "t/p:v1", slots=1))
    await h.submit("r1")  # an unlimited tier: no permit to give back
    assert h.run("r1").state is RunState.running and h.run("r1").slot is None
    h.scheduler._kick = anyio.Event()  # what woke the passes so far is done
    now = h.clock.now()
    await applied(h, RunStarted(run_id="r1", at=now, attempt=1, agent_id="a1"))
    output = RunOutputProduced(run_id="r1", at=now, attempt=1, index=0, output=from_python(1))
    await applied(h, output)
    assert len(h.run("r1").outputs) == 1
    await applied(h, RunCompleted(run_id="r1", at=now, attempt=1, outputs=[]))
    assert h.run("r1").state is RunState.completed
    assert not h.scheduler._kick.is_set()  # no queue for its slot, no permit


async def test_an_end_wakes_a_pass_when_a_run_waits_in_a_queue(h: Harness) -> None:
    h.scheduler.fleet.observe(beat("a1", "t/p:v1", slots=1))
    await h.submit("r1")
    await h.submit("r2")
    assert h.run("r2").state is RunState.queued
    h.scheduler._kick = anyio.Event()
    await applied(h, RunCompleted(run_id="r1", at=h.clock.now(), attempt=1, outputs=[]))
    assert h.scheduler._kick.is_set()  # its slot may take the queued run
    await h.settle()
    assert h.run("r2").state is RunState.running


async def test_an_end_wakes_a_pass_when_its_permit_is_to_be_given_back(h: Harness) -> None:
    h.scheduler.fleet.observe(beat("a1", "t/p:v1", slots=1))
    now = h.clock.now()
    await h.log.append(RunSubmitted(run_id="r1", at=now, team="t", pipeline="t/p:v1", inputs=[]))
    slot = AdmissionSlot(stream="JETRUN_ADMIT_3", seq=1)
    await applied(h, RunAdmitted(run_id="r1", at=now, tier="basic", slot=slot))
    await h.settle()
    assert h.run("r1").state is RunState.running
    h.scheduler._kick = anyio.Event()
    await applied(h, RunCompleted(run_id="r1", at=now, attempt=1, outputs=[]))
    assert h.scheduler._kick.is_set()


async def test_the_pass_that_dispatches_a_run_leaves_no_pass_behind(h: Harness) -> None:
    h.scheduler.fleet.observe(beat("a1", "t/p:v1", slots=1))
    now = h.clock.now()
    await h.log.append(RunSubmitted(run_id="r1", at=now, team="t", pipeline="t/p:v1", inputs=[]))
    await applied(h, RunAdmitted(run_id="r1", at=now, tier="startup"))
    assert h.scheduler._kick.is_set()  # a routing run asks for a decision
    h.scheduler._kick = anyio.Event()
    await h.scheduler.decide()  # appends the dispatch and waits until the index holds it
    assert h.run("r1").state is RunState.running
    assert not h.scheduler._kick.is_set()
