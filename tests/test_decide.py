"""The scheduler's decisions as pure functions: no NATS, no clock, no tasks."""

from __future__ import annotations

from collections import Counter

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

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
    AnyEvent,
    QueueWaitChanged,
    RunAdmitted,
    RunCancelRequested,
    RunCompleted,
    RunDispatched,
    RunFailed,
    RunPreempted,
    RunQueued,
    RunRequeued,
    RunStarted,
    RunSubmitted,
    queue_id,
)
from contracts.run import RunRecord
from contracts.states import RunState, WaitingFor
from contracts.values import IOType, RunIO
from runtime.control.decide import (
    INLINE_INPUTS_BYTES,
    Decisions,
    Now,
    Pass,
    Worklist,
    decide,
    dispatched,
)
from runtime.infra.config import Config, parse
from runtime.infra.fleet import NODE_LOST, NODE_RECALLED, Fleet
from runtime.infra.projection import RunIndex

CONFIG = parse(
    {
        "teams": {
            "t": {"tier": "basic", "tokens": ["tok_t"]},
            "big": {"tier": "startup", "tokens": ["tok_big"]},
        },
        "settings": {"node_loss_timeout_s": 10, "resource_wait_timeout_s": 60},
    }
)
T0 = 1_000_000.0
CATALOGUE = {
    "t/p:v1": PipelineInfo(pointer="t/p:v1"),
    "t/q:v1": PipelineInfo(pointer="t/q:v1"),
    "t/retry:v1": PipelineInfo(pointer="t/retry:v1", max_retries=1),
    "t/gpu:v1": PipelineInfo(pointer="t/gpu:v1", accelerator="gpu"),
}


def beat(
    agent_id: str,
    *pointers: str,
    slots: int = 1,
    status: PipelineStatus = PipelineStatus.ready,
    draining: bool = False,
    gpus: int = 0,
) -> AgentHeartbeat:
    accelerators = [Accelerator(kind="cpu", slots=slots)]
    if gpus:
        accelerators.append(Accelerator(kind="gpu", slots=gpus))
    return AgentHeartbeat(
        agent_id=agent_id,
        at=0.0,
        started_at=0.0,
        accelerators=accelerators,
        pipelines=[LoadedPipeline(pointer=p, status=status) for p in pointers],
        draining=draining,
    )


class World:
    """A run index and a fleet fed by hand; ``decide`` applies each pass's events at once."""

    def __init__(self, config: Config = CONFIG) -> None:
        self.config = config
        self.mono = 0.0
        self.wall = T0
        self.index = RunIndex()
        self.work = Worklist()
        self.index.listen(lambda seq, e, before, run: self.work.observe(seq, e, run, self.mono))
        self.index.listen_queue(lambda seq, e, queued: self.work.observe_queue(e, queued))
        self.fleet = Fleet(lambda: self.mono, CONFIG.settings.node_loss_timeout_s)
        self.seq = 0

    def append(self, *events: AnyEvent) -> None:
        for event in events:
            self.seq += 1
            self.index.apply(self.seq, event)

    def submit(self, run_id: str, pointer: str = "t/p:v1", wait: bool = True) -> None:
        self.append(
            RunSubmitted(
                run_id=run_id,
                at=self.wall,
                team="t",
                pipeline=pointer,
                inputs=[],
                wait_for_resources=wait,
            ),
            RunAdmitted(run_id=run_id, at=self.wall, tier="startup"),
        )

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds

    def decide(self, *, timed: bool = False, booting: frozenset[str] = frozenset()) -> Decisions:
        view = Pass(
            self.index,
            self.work,
            self.fleet.view(),
            CATALOGUE,
            self.config,
            Now(self.wall, self.mono),
            booting,
        )
        d = decide(view, timed=timed)
        self.append(*d.events)  # type: ignore[arg-type]
        self.work.announced.update(d.announced)
        for agent_id in d.lost:
            self.fleet.forget(agent_id)
        return d

    def settle(self, *, timed: bool = False) -> None:
        while self.decide(timed=timed):
            pass

    def state(self, run_id: str) -> RunState:
        return self.index.records[run_id].state

    def run(self, run_id: str) -> RunRecord:
        return self.index.records[run_id]


def test_a_recalled_agent_gets_no_new_run_and_its_runs_are_handled_in_the_same_pass() -> None:
    w = World()
    w.fleet.observe(beat("a1", "t/p:v1", slots=4))
    w.fleet.observe(beat("a2", "t/p:v1", slots=1))
    w.submit("r1")
    w.settle()
    on_a1 = w.index.records["r1"].agent_id
    for run_id in ("r2", "r3", "r4"):
        w.submit(run_id)
    w.fleet.recall("a1")  # before their first pass: not one of them may go to a1
    d = w.decide()
    dispatched = [e for e in d.events if isinstance(e, RunDispatched)]
    assert dispatched and all(e.agent_id == "a2" for e in dispatched)
    if on_a1 == "a1":
        assert d.lost == {"a1": ["r1"]}
        assert any(isinstance(e, RunPreempted) and e.run_id == "r1" for e in d.events)
        assert d.lost_reasons["a1"].startswith(NODE_RECALLED)
    w.settle()
    assert all(r.agent_id != "a1" for r in w.index.records.values() if r.state is RunState.running)


def test_an_agent_announcing_a_drain_in_its_heartbeat_gets_no_new_run() -> None:
    w = World()
    w.fleet.observe(beat("a1", "t/p:v1", slots=2, draining=True))
    w.submit("r1")
    w.settle()
    assert w.state("r1") is RunState.queued
    assert w.index.records["r1"].waiting_for is WaitingFor.resources


def test_slots_taken_in_one_pass_count_across_pipelines() -> None:
    w = World()
    w.submit("p1")
    w.submit("q1", "t/q:v1")
    w.decide()
    w.fleet.observe(beat("a1", "t/p:v1", "t/q:v1", slots=1))
    d = w.decide()
    assert len([e for e in d.events if isinstance(e, RunDispatched)]) == 1


def test_a_run_needs_a_free_slot_of_its_accelerator_kind() -> None:
    w = World()
    w.fleet.observe(beat("cpu-only", "t/gpu:v1", slots=8))
    w.submit("g1", "t/gpu:v1")
    w.settle()
    assert w.state("g1") is RunState.queued
    w.fleet.observe(beat("gpu", "t/gpu:v1", slots=8, gpus=1))
    w.settle()
    run = w.index.records["g1"]
    assert run.state is RunState.running and run.agent_id == "gpu"


def test_silence_is_judged_only_on_timed_passes() -> None:
    w = World()
    w.fleet.observe(beat("a1", "t/retry:v1"))
    w.submit("r1", "t/retry:v1")
    w.settle()
    w.append(RunStarted(run_id="r1", at=w.wall, attempt=1, agent_id="a1"))
    w.advance(11)
    assert not w.decide().lost
    d = w.decide(timed=True)
    assert d.lost == {"a1": ["r1"]} and d.lost_reasons["a1"].startswith(NODE_LOST)
    assert isinstance(d.events[0], RunRequeued)


def test_one_decision_per_run_per_pass_cancel_first() -> None:
    w = World()
    w.fleet.observe(beat("a1", "t/p:v1"))
    w.submit("r1")
    w.settle()
    w.append(RunCancelRequested(run_id="r1", at=w.wall))
    w.fleet.recall("a1")
    d = w.decide()
    assert [e.kind for e in d.events] == ["cancelled"]
    assert d.lost == {"a1": []}


def test_a_run_left_created_past_the_grace_is_admitted_or_fails_not_admitted() -> None:
    w = World()
    for run_id, team in [("r1", "t"), ("r2", "nobody"), ("r3", "big")]:
        w.append(RunSubmitted(run_id=run_id, at=w.wall, team=team, pipeline="t/p:v1", inputs=[]))
    assert not w.decide(timed=True)
    w.advance(CONFIG.settings.release_grace_s)
    d = w.decide(timed=True)
    # a limited tier: the applier admits it with the permit an older gateway took, if any
    assert [a.run_id for a in d.admissions] == ["r1"]
    # a team not in the config, or an unlimited tier (no permit to find): never admitted
    failed = {e.run_id: e for e in d.events if isinstance(e, RunFailed)}
    assert set(failed) == {"r2", "r3"} and len(d.events) == 2
    assert all(e.error.type is ErrorType.unknown for e in failed.values())
    assert all(e.error.message.startswith("not_admitted: ") for e in failed.values())
    assert "'nobody' is not in the config" in failed["r2"].error.message
    assert w.index.records["r3"].state is RunState.failed


AGENTS = st.lists(
    st.tuples(
        st.sampled_from(["a1", "a2", "a3"]),
        st.sets(st.sampled_from(["t/p:v1", "t/q:v1", "t/gpu:v1"]), max_size=3),
        st.integers(0, 3),  # cpu slots
        st.integers(0, 2),  # gpu slots
        st.sampled_from(list(PipelineStatus)),
        st.booleans(),  # recalled
    ),
    max_size=4,
)
STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("submit"), st.sampled_from(["t/p:v1", "t/q:v1", "t/gpu:v1"])),
        st.tuples(st.just("pass"), st.booleans()),
        st.tuples(st.just("time"), st.floats(0, 20)),
    ),
    max_size=25,
)


@settings(max_examples=150, deadline=None)
@given(agents=AGENTS, steps=STEPS)
def test_passes_never_overbook_nor_dispatch_to_agents_that_cannot_take_work(
    agents: list[tuple[str, set[str], int, int, PipelineStatus, bool]],
    steps: list[tuple[str, object]],
) -> None:
    w = World()
    for agent_id, pointers, cpus, gpus, status, recalled in agents:
        w.fleet.observe(beat(agent_id, *sorted(pointers), slots=cpus, gpus=gpus, status=status))
        if recalled:
            w.fleet.recall(agent_id)
    for n, (step, arg) in enumerate(steps):
        if step == "submit":
            w.submit(f"r{n}", str(arg))
        elif step == "time":
            w.advance(float(arg))  # type: ignore[arg-type]
        else:
            view = w.fleet.view()
            takers = {b.agent_id: b for b in view.live()}
            d = w.decide(timed=bool(arg))
            ids = [e.run_id for e in d.events]
            assert len(ids) == len(set(ids))  # one decision per run
            for e in d.events:
                if isinstance(e, RunDispatched):
                    agent = takers[e.agent_id]  # live, not draining, not recalled
                    assert agent.ready(w.index.records[e.run_id].pipeline)
                    assert e.slot == CATALOGUE[w.index.records[e.run_id].pipeline].accelerator
        used = Counter(
            (r.agent_id, CATALOGUE[r.pipeline].accelerator)
            for r in w.index.records.values()
            if r.state is RunState.running
        )
        for (agent_id, kind), n_used in used.items():
            beat_ = w.fleet.get(str(agent_id))
            if beat_ is not None:
                assert n_used <= beat_.slots(kind)
        on_agent = {  # what a pass counts as in use: the index's runs on each agent
            a: Counter(w.index.records[r].pipeline for r in runs)
            for a, runs in w.index.on_agent.items()
            if runs
        }
        assert w.work.agent_load == on_agent
    queued = [r for r in w.index.records.values() if r.state is RunState.queued]
    assert all(isinstance(r.waiting_for, WaitingFor) for r in queued)


def test_a_replica_still_starting_up_is_not_alive_for_a_run_that_may_not_wait() -> None:
    w = World()
    w.fleet.observe(beat("a1", "t/p:v1", status=PipelineStatus.loading))
    w.submit("r1", wait=False)
    d = w.decide()
    assert [e.kind for e in d.events] == ["no_resources"]
    run = w.index.records["r1"]
    assert run.state is RunState.no_resources_available and run.error is not None
    assert run.error.type is ErrorType.unknown
    assert run.error.message == (
        "no_resources_available: no replica of t/p:v1 is ready (1 still starting up)"
    )
    w.submit("r2", wait=True)  # one that may wait waits for the cold start
    w.settle()
    assert w.index.records["r2"].waiting_for is WaitingFor.cold_start


def test_a_pipeline_whose_startup_raised_says_so_on_the_run() -> None:
    w = World()
    failed = LoadedPipeline(
        pointer="t/p:v1", status=PipelineStatus.failed, error="RuntimeError: no weights"
    )
    w.fleet.observe(msgspec.structs.replace(beat("a1"), pipelines=[failed]))
    w.submit("r1", wait=False)
    w.settle()
    error = w.index.records["r1"].error
    assert error is not None and error.type is ErrorType.startup_error
    assert error.message == (
        "startup_error: the startup step of t/p:v1 raised on agent a1: RuntimeError: no weights"
    )


def test_a_preempted_run_carries_the_reason_as_its_error() -> None:
    w = World()
    w.fleet.observe(beat("a1", "t/p:v1"))
    w.submit("r1")
    w.settle()
    w.fleet.recall("a1")
    w.settle()
    run = w.index.records["r1"]
    assert run.state is RunState.node_preempted and run.error is not None
    assert run.error.message == "node_preempted: the node was recalled"


def test_a_requeued_run_starts_a_new_resource_wait() -> None:
    w = World()
    w.fleet.observe(beat("a1", "t/retry:v1"))
    w.submit("r1", "t/retry:v1")
    w.settle()
    w.advance(100)  # runs past the resource wait timeout (60 s) since it was created
    w.fleet.observe(beat("a1", "t/retry:v1"))
    w.advance(11)  # then its node goes silent: requeued, no replica left
    w.settle(timed=True)
    run = w.index.records["r1"]
    assert run.state is RunState.queued and run.attempt == 2
    assert run.waiting_for is WaitingFor.resources and run.resources_since == w.wall
    w.advance(59)
    w.settle(timed=True)
    assert w.state("r1") is RunState.queued
    w.advance(1)
    w.settle(timed=True)
    assert w.state("r1") is RunState.no_resources_available


def test_resource_waits_expire_in_the_order_they_began_and_only_when_due() -> None:
    w = World()
    w.submit("r1", "t/ghost:v1")  # no replica anywhere: waits for resources from now
    w.settle()
    w.advance(30)
    w.submit("r2", "t/ghost:v1")
    w.settle()
    waits = w.work.resource_waits["t/ghost:v1"]
    assert [run_id for _, run_id in waits] == ["r1", "r2"]
    w.advance(30)  # r1 waited 60 s, r2 30 s
    w.settle(timed=True)
    assert w.state("r1") is RunState.no_resources_available
    assert w.state("r2") is RunState.queued
    assert [run_id for _, run_id in w.work.resource_waits["t/ghost:v1"]] == ["r2"]
    w.advance(30)
    w.settle(timed=True)
    assert w.state("r2") is RunState.no_resources_available
    assert "t/ghost:v1" not in w.work.resource_waits  # nothing left behind


def test_a_run_queued_behind_busy_replicas_waits_in_full_when_the_last_one_goes() -> None:
    w = World()
    w.fleet.observe(beat("a1", "t/p:v1"))
    w.submit("busy")
    w.submit("r1")
    w.settle()
    assert w.index.records["r1"].waiting_for is WaitingFor.capacity
    w.advance(100)
    w.fleet.observe(beat("a1", "t/p:v1"))  # the replica kept beating all along
    w.advance(11)  # then it blips away: the last one
    w.settle(timed=True)
    assert w.state("r1") is RunState.queued
    assert w.index.records["r1"].waiting_for is WaitingFor.resources
    w.advance(30)
    w.fleet.observe(beat("a2", "t/p:v1", status=PipelineStatus.loading))
    w.settle(timed=True)
    assert w.index.records["r1"].waiting_for is WaitingFor.cold_start  # the same wait goes on
    w.advance(30)
    w.fleet.observe(beat("a2", "t/p:v1", status=PipelineStatus.loading))
    w.settle(timed=True)
    assert w.state("r1") is RunState.no_resources_available


def test_runs_wait_for_a_node_while_one_boots_then_for_the_cold_start() -> None:
    w = World()
    w.submit("r1")
    w.decide(booting=frozenset({"t/p:v1"}))
    assert w.run("r1").waiting_for is WaitingFor.node
    w.fleet.observe(beat("node-1", "t/p:v1", status=PipelineStatus.loading))
    w.decide(timed=True, booting=frozenset({"t/p:v1"}))
    assert w.run("r1").waiting_for is WaitingFor.cold_start
    w.fleet.observe(beat("node-1", "t/p:v1"))
    w.decide()
    assert w.run("r1").state is RunState.running


def test_a_run_queued_between_two_timed_passes_is_told_when_the_fleet_flips_back() -> None:
    """Its queue was last told 'resources'; a replica came and went between two timed passes
    and the run was queued for capacity meanwhile: it is told 'resources' (and its resource
    wait starts) although the queue's wait looks unchanged."""
    w = World()
    w.submit("first")
    w.settle(timed=True)
    assert w.index.records["first"].waiting_for is WaitingFor.resources
    w.fleet.observe(beat("a1", "t/p:v1", slots=0))  # a replica, but no free slot
    w.submit("r1")
    w.settle()  # not timed: placed waiting for capacity
    assert w.index.records["r1"].waiting_for is WaitingFor.capacity
    w.advance(11)  # the replica goes away before the next timed pass
    w.settle(timed=True)
    run = w.index.records["r1"]
    assert run.waiting_for is WaitingFor.resources and run.resources_since == w.wall
    w.advance(60)
    w.settle(timed=True)
    assert w.state("r1") is RunState.no_resources_available


def test_a_run_that_reaches_the_log_long_after_its_permit_is_placed_only_once_confirmed() -> None:
    w = World()
    grant = AdmissionGrant(tier="basic", slot=AdmissionSlot(stream="JETRUN_ADMIT_3", seq=7))
    late = w.wall - CONFIG.settings.release_grace_s  # its gateway lost the log for a while
    for run_id, at in [("late", late), ("fresh", w.wall)]:
        w.append(
            RunSubmitted(
                run_id=run_id,
                at=at,
                team="t",
                pipeline="t/p:v1",
                inputs=[],
                wait_for_resources=True,
                admission=grant,
            )
        )
    d = w.decide()
    assert d.permit_checks == ["late"]  # the sweep may have given its permit back
    assert [e.run_id for e in d.events] == ["fresh"]
    w.work.permit_held.add("late")  # the applier found the permit
    assert [e.kind for e in w.decide().events] == ["queued"]
    assert w.index.records["late"].state is RunState.queued
    assert "late" not in w.work.permit_held  # forgotten once it left routing


def test_a_run_goes_straight_to_a_free_slot_carrying_what_the_agent_needs() -> None:
    w = World()
    w.fleet.observe(beat("a1", "t/p:v1", slots=1))
    w.submit("r1")
    d = w.decide()
    assert [type(e) for e in d.events] == [RunDispatched]  # no queued step
    sent = d.events[0]
    assert isinstance(sent, RunDispatched)
    assert (sent.agent_id, sent.team, sent.pipeline, sent.inputs) == ("a1", "t", "t/p:v1", [])
    assert w.state("r1") is RunState.running


def test_a_new_run_never_overtakes_a_queued_one() -> None:
    w = World()
    w.fleet.observe(beat("a1", "t/p:v1", slots=1))
    for run_id in ("r1", "r2"):
        w.submit(run_id)
    w.decide()
    assert (w.state("r1"), w.state("r2")) == (RunState.running, RunState.queued)
    w.append(RunCompleted(run_id="r1", at=w.wall, attempt=1, outputs=[]))
    w.submit("r3")
    d = w.decide()  # one slot free: r2 (queued first) takes it, r3 queues behind it
    assert [(type(e), e.run_id) for e in d.events] == [(RunDispatched, "r2"), (RunQueued, "r3")]


def test_inputs_too_large_to_repeat_are_left_for_the_agent_to_read() -> None:
    big = [RunIO(type=IOType.string, value="x" * (INLINE_INPUTS_BYTES + 1))]
    run = RunRecord(id="r1", team="t", pipeline="t/p:v1", inputs=big, attempt=1)
    sent = dispatched(run, 1.0, "a1", "cpu")
    assert (sent.team, sent.pipeline, sent.inputs) == (None, None, None)


def test_a_fleet_change_under_ten_thousand_queued_runs_is_one_event() -> None:
    """What a queue waits for changes once for the whole queue: one ``queue_waiting`` event,
    not one per queued run; every queued run then waits for the new thing (its resource wait
    starting then), and runs queued later carry their own."""
    w = World()
    for n in range(10_000):
        w.submit(f"r{n}")
    w.settle(timed=True)  # no replica: every run queued waiting for resources
    assert w.index.queue_depth("t/p:v1") == 10_000
    w.advance(5)
    w.fleet.observe(beat("a1", "t/p:v1", slots=0, status=PipelineStatus.loading))
    d = w.decide(timed=True)
    assert [type(e) for e in d.events] == [QueueWaitChanged]
    assert d.events[0].run_id == queue_id("t/p:v1")
    assert all(w.run(f"r{n}").waiting_for is WaitingFor.cold_start for n in (0, 5_000, 9_999))
    assert not w.decide(timed=True)  # told: nothing more
    w.advance(11)  # the loading replica goes away: resources again, once
    d = w.decide(timed=True)
    assert [type(e) for e in d.events] == [QueueWaitChanged]
    assert w.run("r9999").waiting_for is WaitingFor.resources
    assert w.run("r9999").resources_since == T0  # the same wait for a replica goes on
    assert d.events[0].message_id() != decide_first_change_id(w)


def decide_first_change_id(w: World) -> str:
    """The message id of the first queue event: a later change of the same queue has its own
    (``follows`` names the event before it), so the log stores both."""
    first = QueueWaitChanged(
        run_id=queue_id("t/p:v1"),
        at=T0,
        pipeline="t/p:v1",
        waiting_for=WaitingFor.resources,
        follows=0,
    )
    return first.message_id()


def test_a_run_queued_after_the_queue_changed_keeps_its_own_wait() -> None:
    w = World()
    w.submit("old")
    w.settle(timed=True)
    w.fleet.observe(beat("a1", "t/p:v1", status=PipelineStatus.loading))
    w.settle(timed=True)
    assert w.run("old").waiting_for is WaitingFor.cold_start
    w.submit("new")
    w.settle()
    assert w.run("new").waiting_for is WaitingFor.cold_start
    w.append(  # a queue event of another pipeline changes nothing here
        QueueWaitChanged(
            run_id=queue_id("t/q:v1"), at=w.wall, pipeline="t/q:v1", waiting_for=WaitingFor.node
        )
    )
    assert w.run("old").waiting_for is WaitingFor.cold_start
