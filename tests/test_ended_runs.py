"""``ended_runs`` without NATS: how the agent batches the ends ready in one turn of its loop
(``runtime.node.ends``), and how readers apply a batch (the state machine's rule 11, the
``RunIndex`` and its listeners, the subject check, the permissions)."""

from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest

from contracts.errors import ErrorType, RunError
from contracts.events import (
    ENDED_RUNS_ID,
    AdmissionGrant,
    AnyEvent,
    Event,
    RunCompleted,
    RunDispatched,
    RunFailed,
    RunsEnded,
    RunSubmitted,
    decode_event,
    dispatched_runs,
    encode_event,
)
from contracts.machine import Verdict, evolve, judge
from contracts.run import RunRecord
from contracts.states import RunState
from contracts.values import from_python
from runtime.infra.event_subjects import ended_subject, on_its_subject, subject_of
from runtime.infra.nats_auth import agent_permissions
from runtime.infra.projection import RunIndex
from runtime.node.ends import Ends

pytestmark = pytest.mark.anyio


class Recorder:
    """A stand-in for ``Reporter``: records what was appended, and its encoding."""

    def __init__(self) -> None:
        self.appended: list[tuple[Event, bytes | None]] = []
        self.gate: anyio.Event | None = None  # set: an append waits for it
        self.entered = anyio.Event()  # an append began

    async def report(self, event: Event, payload: bytes | None = None) -> None:
        self.entered.set()
        if self.gate is not None:  # an append under way outlives a cancellation, as there
            with anyio.CancelScope(shield=True):
                await self.gate.wait()
        self.appended.append((event, payload))
        await anyio.lowlevel.checkpoint()  # then a cancellation goes on, as there


def done(run_id: str, attempt: int = 1, at: float = 5.0) -> RunCompleted:
    return RunCompleted(run_id=run_id, at=at, attempt=attempt, outputs=[from_python(run_id)])


def ends(recorder: Recorder, running: int = 4, limit: int = 1 << 20) -> Ends:
    return Ends(recorder, "ag", lambda: limit, lambda: running)


async def test_a_lone_end_is_appended_at_once_as_itself() -> None:
    recorder = Recorder()
    end = done("r1")
    await ends(recorder, running=1).report(end, encode_event(end))
    assert recorder.appended == [(end, encode_event(end))]


async def test_ends_reported_in_one_turn_are_one_batch_encoded_as_the_event_is() -> None:
    recorder = Recorder()
    batcher = ends(recorder)
    sent = [done("r1"), done("r2", attempt=2), done("r3")]
    async with anyio.create_task_group() as tg:
        for end in sent:
            tg.start_soon(batcher.report, end, encode_event(end))
    [(event, payload)] = recorder.appended
    assert isinstance(event, RunsEnded)
    assert (event.run_id, event.agent_id, event.ends) == (ENDED_RUNS_ID, "ag", sent)
    assert payload is not None and decode_event(payload) == event
    assert payload == encode_event(event)


async def test_an_end_too_large_for_the_batch_goes_alone_and_a_batch_of_one_is_plain() -> None:
    recorder = Recorder()
    batcher = ends(recorder, limit=700)
    big = RunCompleted(run_id="big", at=5.0, attempt=1, outputs=[from_python("x" * 600)])
    async with anyio.create_task_group() as tg:
        for end in (done("r1"), big):
            tg.start_soon(batcher.report, end, encode_event(end))
    assert sorted(e.run_id for e, _ in recorder.appended) == ["big", "r1"]
    assert not any(isinstance(e, RunsEnded) for e, _ in recorder.appended)


async def test_a_batch_holds_at_most_its_bytes() -> None:
    recorder = Recorder()
    one = len(encode_event(done("r0")))
    batcher = ends(recorder, limit=256 + 4 + 2 * (one + 1))  # room for two entries
    sent = [done(f"r{i}") for i in range(3)]
    async with anyio.create_task_group() as tg:
        for end in sent:
            tg.start_soon(batcher.report, end, encode_event(end))
    [batch] = [e for e, _ in recorder.appended if isinstance(e, RunsEnded)]
    [alone] = [e for e, _ in recorder.appended if not isinstance(e, RunsEnded)]
    assert isinstance(batch, RunsEnded) and [e.run_id for e in batch.ends] == ["r0", "r1"]
    assert alone == sent[2]
    for _, payload in recorder.appended:
        assert payload is not None and len(payload) <= 256 + 4 + 2 * (one + 1)


async def test_an_attempt_cancelled_while_its_batch_is_appended_waits_for_it_then_stops() -> None:
    """As a lone end's report does: the append goes on (shielded), the task then stops."""
    recorder = Recorder()
    recorder.gate = anyio.Event()
    batcher = ends(recorder)
    returned: list[str] = []

    async def attempt(end: RunCompleted) -> None:
        await batcher.report(end, encode_event(end))
        returned.append(end.run_id)

    scope = anyio.CancelScope()

    async def attempts() -> None:
        with scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(attempt, done("r1"))
                tg.start_soon(attempt, done("r2"))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(attempts)
            try:
                await recorder.entered.wait()  # the batch's append is under way
                scope.cancel()  # both: the leader appending, the follower waiting
                await anyio.sleep(0.05)
                assert not recorder.appended and not scope.cancelled_caught  # still waiting
            finally:
                recorder.gate.set()
    assert scope.cancelled_caught
    [(event, _)] = recorder.appended
    assert isinstance(event, RunsEnded) and [e.run_id for e in event.ends] == ["r1", "r2"]
    assert returned == []  # cancelled, each after its batch's append returned


async def test_a_leader_cancelled_before_its_batch_left_still_appends_it() -> None:
    recorder = Recorder()
    batcher = ends(recorder)
    with anyio.CancelScope() as scope:
        scope.cancel()
        await batcher.report(done("r1"), encode_event(done("r1")))
    assert [e for e, _ in recorder.appended] == [done("r1")]


# --- readers --------------------------------------------------------------------------------


def submitted(run_id: str) -> RunSubmitted:
    grant = AdmissionGrant(tier="pro")
    return RunSubmitted(run_id=run_id, at=1.0, team="t", pipeline="p", inputs=[], admission=grant)


def batch(agent_id: str, *end: RunCompleted | RunFailed) -> RunsEnded:
    return RunsEnded(run_id=ENDED_RUNS_ID, at=5.0, agent_id=agent_id, ends=list(end))


def test_an_end_applies_only_to_a_run_whose_attempt_went_to_the_batchs_agent() -> None:
    run = RunRecord(id="r1")
    for event in (submitted("r1"), RunDispatched(run_id="r1", at=2.0, attempt=1, agent_id="a")):
        run = evolve(run, event)
    assert judge(run, batch("b", done("r1"))) is Verdict.foreign
    assert evolve(run, batch("b", done("r1"))) is run
    assert judge(run, batch("a", done("r2"))) is Verdict.foreign
    assert judge(run, batch("a", done("r1"))) is Verdict.applied
    assert evolve(run, batch("a", done("r1"))).state is RunState.completed


def test_the_index_applies_each_end_of_its_agent_and_listeners_hear_it_as_the_runs_own() -> None:
    index = RunIndex()
    heard: list[tuple[int, AnyEvent]] = []
    index.listen(lambda seq, event, before, after: heard.append((seq, event)))
    for seq, run_id in enumerate(("r1", "r2", "r3"), start=1):
        index.apply(seq, submitted(run_id))
    sent = [RunDispatched(run_id=r, at=2.0, attempt=1, agent_id="a") for r in ("r1", "r2")]
    index.apply(4, dispatched_runs(sent, 2.0))
    index.apply(5, RunDispatched(run_id="r3", at=2.0, attempt=1, agent_id="b"))
    failed = RunFailed(
        run_id="r2", at=5.0, attempt=1, error=RunError(type=ErrorType.unknown, message="m")
    )
    heard.clear()
    end = RunCompleted(run_id="r1", at=5.0, attempt=1, outputs=[], ran_s=0.02)
    index.apply(6, batch("a", end, failed, done("r3"), done("nobody")))
    assert heard == [(6, end), (6, failed)]  # r3 went to b; "nobody" is no run
    assert [index.get(r).state for r in ("r1", "r2", "r3")] == [  # type: ignore[union-attr]
        RunState.completed,
        RunState.failed,
        RunState.running,
    ]
    assert index.last_seq == 6
    index.apply(7, batch("b", done("r3")))
    assert index.get("r3").state is RunState.completed  # type: ignore[union-attr]


def test_a_batch_belongs_on_its_agents_subject_only() -> None:
    event = batch("a", done("r1"))
    assert subject_of(event) == ended_subject("a") == "jetrun.ev._ended.ended_runs.a"
    assert on_its_subject(event, "jetrun.ev._ended.ended_runs.a")
    assert not on_its_subject(event, "jetrun.ev._ended.ended_runs.b")
    assert not on_its_subject(event, "jetrun.ev.r1.completed")
    elsewhere = RunsEnded(run_id="r1", at=5.0, agent_id="a", ends=[done("r1")])
    assert not on_its_subject(elsewhere, "jetrun.ev._ended.ended_runs.a")
    assert not on_its_subject(done("r1"), "jetrun.ev._ended.ended_runs.a")


def test_an_agent_may_append_its_own_batches_only() -> None:
    publish = agent_permissions("a").publish
    assert "jetrun.ev._ended.ended_runs.a" in publish
    assert not any(s.startswith("jetrun.ev._ended.ended_runs.") and s[-2:] != ".a" for s in publish)
    assert not any(s.endswith(">") and s.startswith("jetrun.ev") for s in publish)


def test_a_batchs_message_id_names_its_agent_runs_attempts_and_kinds() -> None:
    base = batch("a", done("r1"), done("r2"))
    assert base.message_id() == batch("a", done("r1", at=9.0), done("r2")).message_id()
    assert base.message_id() != batch("b", done("r1"), done("r2")).message_id()
    assert base.message_id() != batch("a", done("r1", attempt=2), done("r2")).message_id()
    failed = RunFailed(
        run_id="r2", at=5.0, attempt=1, error=RunError(type=ErrorType.unknown, message="m")
    )
    assert base.message_id() != batch("a", done("r1"), failed).message_id()


async def test_no_batch_while_a_scheduler_of_a_release_before_batches_is_heard() -> None:
    """Such a scheduler skips an ``ended_runs`` batch: to it the runs still run, and were it to
    lead it would declare them lost and run them again. While one is heard, each end goes
    alone, as itself."""
    recorder = Recorder()
    older_heard = True
    batcher = Ends(recorder, "ag", lambda: 1 << 20, lambda: 4, lambda: not older_heard)
    sent = [done("r1"), done("r2")]
    async with anyio.create_task_group() as tg:
        for end in sent:
            tg.start_soon(batcher.report, end, encode_event(end))
    assert sorted((e.run_id, type(e)) for e, _ in recorder.appended) == [
        ("r1", RunCompleted),
        ("r2", RunCompleted),
    ]
    older_heard = False  # gone: batched again
    async with anyio.create_task_group() as tg:
        for end in (done("r3"), done("r4")):
            tg.start_soon(batcher.report, end, encode_event(end))
    assert isinstance(recorder.appended[-1][0], RunsEnded)
