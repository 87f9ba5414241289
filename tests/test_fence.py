"""The fence on the log: once a newer scheduler fenced it, the server refuses every decision of
the older one (whatever the older one's clock says), and nothing of it is stored."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from nats.errors import TimeoutError as NatsTimeoutError

from contracts.events import RunCancelled, SchedulerElected
from runtime.infra.eventlog import Appended, EventLog
from runtime.infra.fence import Fence, Fenced, append, append_all, slot_id
from runtime.infra.natsserver import NatsServer
from runtime.infra.streams import EVENTS_STREAM

pytestmark = pytest.mark.anyio


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    async with NatsServer(store_dir=tmp_path / "nats") as server:
        admin = await server.connect("admin", "setup")
        try:
            await EventLog(admin).ensure()
        finally:
            await admin.close()
        yield server


async def last_seq(log: EventLog) -> int:
    info = await log.js.stream_info(EVENTS_STREAM)
    return int(info.state.last_seq)


async def test_a_fenced_out_scheduler_can_append_nothing(server: NatsServer) -> None:
    a_nc = await server.connect("scheduler", "a")
    b_nc = await server.connect("scheduler", "b")
    try:
        a, b = Fence(EventLog(a_nc), "a", slots=4), Fence(EventLog(b_nc), "b", slots=4)
        with anyio.fail_after(20):
            await a.establish(term=1)
            async with a.slot() as fencing:  # a leads: its decisions are stored
                assert fencing is not None
                await append(a.log, RunCancelled(run_id="run-1", at=time.time()), fencing)
            fenced_at = await b.establish(term=2)
            assert fenced_at == await last_seq(b.log)
            for n in range(4):  # every slot of a's is refused, and nothing is stored
                async with a.slot() as fencing:
                    with pytest.raises(Fenced):
                        event = RunCancelled(run_id=f"run-{n + 2}", at=time.time())
                        await append(a.log, event, fencing)
            assert await last_seq(a.log) == fenced_at
            async with b.slot() as fencing:  # b decides
                await append(b.log, RunCancelled(run_id="run-9", at=time.time()), fencing)
            assert await last_seq(b.log) == fenced_at + 1
    finally:
        await a_nc.close()
        await b_nc.close()


async def test_the_markers_change_no_run_and_name_their_slot(server: NatsServer) -> None:
    nc = await server.connect("scheduler", "a")
    try:
        log = EventLog(nc)
        with anyio.fail_after(20):
            await Fence(log, "a", slots=2).establish(term=5)
            stored = await log.read(slot_id(1))
        assert [s.event for s in stored] == [
            SchedulerElected(run_id="_fence1", at=stored[0].event.at, holder="a", term=5)
        ]
        assert (await log.load(slot_id(1))).state == "unknown"
    finally:
        await nc.close()


async def test_a_leader_writes_its_markers_again_before_they_age_out(server: NatsServer) -> None:
    """A log with a max_age would drop the markers: the leader writes them again (new message
    ids, each expecting its own previous marker) and goes on deciding behind the new ones."""
    nc = await server.connect("scheduler", "a")
    try:
        a = Fence(EventLog(nc), "a", slots=2)
        with anyio.fail_after(20):
            first = await a.establish(term=1)
            assert not a.due(max_age_s=0.0) and not a.due(max_age_s=3600.0)
            a.established_at -= 2.0
            assert a.due(max_age_s=3.0)
            again = await a.establish(term=1)
            assert again == first + 2 and not a.due(max_age_s=3.0)
            async with a.slot() as fencing:
                await append(a.log, RunCancelled(run_id="run-1", at=time.time()), fencing)
            assert await last_seq(a.log) == again + 1
    finally:
        await nc.close()


async def test_each_append_in_flight_holds_its_own_slot_and_one_more_waits() -> None:
    fence = Fence(EventLog.__new__(EventLog), "a", slots=3)
    fence.markers = [11, 12, 13]
    held: list[str] = []
    release = anyio.Event()
    waited = anyio.Event()

    async def hold() -> None:
        async with fence.slot() as fencing:
            assert fencing is not None
            held.append(fencing.subject)
            assert fencing.seq == 11 + int(fencing.subject.split("._fence")[1].split(".")[0])
            await release.wait()

    async def fourth() -> None:
        async with fence.slot() as fencing:
            assert fencing is not None
            waited.set()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(hold)
            await anyio.wait_all_tasks_blocked()
            assert len(set(held)) == 3  # three slots, each its own subject
            tg.start_soon(fourth)
            await anyio.wait_all_tasks_blocked()
            assert not waited.is_set()  # every slot is taken: the fourth waits
            release.set()
            await waited.wait()
    async with fence.slot() as fencing:  # every slot given back
        assert fencing is not None
    fence.drop()
    async with fence.slot() as fencing:
        assert fencing is None  # not established: unfenced


async def test_a_batch_appends_more_events_than_slots_and_a_fenced_one_appends_none(
    server: NatsServer,
) -> None:
    a_nc = await server.connect("scheduler", "a")
    b_nc = await server.connect("scheduler", "b")
    try:
        a, b = Fence(EventLog(a_nc), "a", slots=4), Fence(EventLog(b_nc), "b", slots=4)
        with anyio.fail_after(20):
            await a.establish(term=1)
            events = [RunCancelled(run_id=f"batch-{n}", at=time.time()) for n in range(10)]
            results = await append_all(a.log, a, events)
            seqs = [r.seq for r in results if isinstance(r, Appended)]
            assert len(seqs) == 10 and len(set(seqs)) == 10
            for event, seq in zip(events, seqs, strict=True):
                assert [s.seq for s in await a.log.read(event.run_id)] == [seq]
            again = await append_all(a.log, a, events[:3])  # the same decisions: stored once
            assert all(isinstance(r, Appended) and r.duplicate for r in again)
            fenced_at = await b.establish(term=2)
            late = [RunCancelled(run_id=f"late-{n}", at=time.time()) for n in range(6)]
            assert all(isinstance(r, Fenced) for r in await append_all(a.log, a, late))
            assert await last_seq(a.log) == fenced_at
            assert a.has_free() and sorted(a._free) == [0, 1, 2, 3]  # every slot given back
    finally:
        await a_nc.close()
        await b_nc.close()


class FlakyLog:
    """A log whose first try of each append meets an outage; the patient one stores it."""

    def __init__(self, refuse: Exception) -> None:
        self.refuse = refuse
        self.sent: list[str] = []
        self.appended: list[str] = []
        self.callbacks: set[tuple[str, str]] = set()  # (how, run id) appended with callback

    async def send(
        self,
        event: RunCancelled,
        *,
        fencing: object = None,
        callback: bool = False,
        expiry: object = None,
        last: bool = True,
    ) -> object:
        self.sent.append(event.run_id)
        if callback:
            self.callbacks.add(("send", event.run_id))
        raise self.refuse

    async def append(
        self, event: RunCancelled, *, fencing: object = None, callback: bool = False
    ) -> Appended:
        self.appended.append(event.run_id)
        if callback:
            self.callbacks.add(("append", event.run_id))
        return Appended(len(self.appended), False)


@pytest.mark.parametrize("refuse", [NatsTimeoutError(), RuntimeError("a bug")])
async def test_a_batch_tries_again_what_met_an_outage_and_reports_a_final_error(
    refuse: Exception,
) -> None:
    flaky = FlakyLog(refuse)
    fence = Fence(EventLog.__new__(EventLog), "a", slots=2)
    events = [RunCancelled(run_id=f"r{n}", at=1.0) for n in range(5)]
    with anyio.fail_after(5):
        results = await append_all(flaky, fence, events, "r1".__eq__)  # type: ignore[arg-type]
    assert flaky.sent == [e.run_id for e in events]
    if isinstance(refuse, NatsTimeoutError):  # an outage: made again, the patient way
        assert sorted(flaky.appended) == sorted(flaky.sent)
        # r1 has a callback URL: each try says so (its end goes where the outbox reads it)
        assert flaky.callbacks == {("send", "r1"), ("append", "r1")}
        assert all(isinstance(r, Appended) for r in results)
    else:  # a final answer: reported, not retried
        assert flaky.appended == [] and results == [refuse] * 5
    assert sorted(fence._free) == [0, 1]
