"""Appends confirmed by the appender's own tail instead of an ack, against a real nats-server:
a batch is stored once with no ack message; a refused append is found by the next stored
append of its connection or by its deadline, then told by an acked retry (a fenced scheduler's
decision: ``Fenced``, and the scheduler stands by; a duplicate: where it was stored); a
refused ``submitted`` answers what it answers with acks."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import api
from nats.js.errors import APIError

from contracts.agents import PipelineInfo
from contracts.events import RunAdmitted, RunCancelled, RunSubmitted, encode_event
from runtime.control.gateway import Gateway
from runtime.control.scheduler import Scheduler
from runtime.infra.catalog import Catalog
from runtime.infra.config import parse
from runtime.infra.eventlog import Appended, EventLog, LogSettings, kind_subjects, subject_of
from runtime.infra.fence import Fence, Fenced, append, append_all
from runtime.infra.jspub import Pending
from runtime.infra.natsserver import NatsServer
from runtime.infra.streams import EVENTS_STREAM
from runtime.infra.tailconfirm import NotSeen, TailConfirm, Tailed
from runtime.provision import provision
from tests.fakes import FakeClock
from tests.test_scheduler import beat

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


@asynccontextmanager
async def tailing(server: NatsServer, within_s: float) -> AsyncIterator[TailConfirm]:
    """A tail of the whole log on a connection of its own, confirming appends."""
    nc = await server.connect("scheduler", "tail")
    log = EventLog(nc)
    confirm = TailConfirm(within_s)
    sub = await log.follow(
        lambda seq, event: None,
        lambda seq: None,
        from_seq=await log.last_seq() + 1,
        confirm=confirm,
    )
    confirm.start()
    try:
        yield confirm
    finally:
        confirm.stop()
        await sub.unsubscribe()
        await nc.close()


def cancel(run_id: str) -> RunCancelled:
    return RunCancelled(run_id=run_id, at=time.time())


async def test_a_batch_is_stored_once_with_no_ack_and_its_duplicates_are_told_by_an_ack(
    server: NatsServer,
) -> None:
    nc = await server.connect("scheduler", "a")
    try:
        log = EventLog(nc)
        fence = Fence(log, "a", slots=4)
        async with tailing(server, within_s=0.3) as confirm:
            with anyio.fail_after(20):
                await fence.establish(term=1)
                log.tail_confirm = confirm
                received = nc.stats["in_msgs"]
                events = [cancel(f"batch-{n}") for n in range(10)]
                results = await append_all(log, fence, events)
                # acked: only the last append before the acks are awaited (4 slots: 4, 4, 2)
                assert nc.stats["in_msgs"] - received == 3
                assert all(isinstance(r, Appended) and not r.duplicate for r in results)
                seqs = [r.seq for r in results if isinstance(r, Appended)]
                for event, seq in zip(events, seqs, strict=True):
                    assert [s.seq for s in await log.read(event.run_id)] == [seq]
                # the same decisions again: not stored, so not shown; an acked retry tells
                again = await append_all(log, fence, events[:3])
                assert [(r.seq, r.duplicate) for r in again if isinstance(r, Appended)] == [
                    (seq, True) for seq in seqs[:3]
                ]
                assert confirm.waiting() == 0
    finally:
        await nc.close()


async def test_a_refused_append_is_found_by_the_next_stored_one_of_its_connection(
    server: NatsServer,
) -> None:
    a_nc = await server.connect("scheduler", "a")
    b_nc = await server.connect("scheduler", "b")
    try:
        a, b = Fence(EventLog(a_nc), "a", slots=4), Fence(EventLog(b_nc), "b", slots=4)
        # a deadline far away: only the order of a's appends can tell what happened
        async with tailing(server, within_s=60.0) as confirm:
            with anyio.fail_after(10):
                await a.establish(term=1)
                await b.establish(term=2)  # a is fenced out
                a.log.tail_confirm = confirm
                slot, fencing = await a.take()
                refused = await a.log.send(cancel("decided-by-a"), fencing=fencing, last=False)
                later = await a.log.send(cancel("unfenced"))  # acked, stored
                stored_at = (await later.ack()).seq
                with pytest.raises(NotSeen):  # the tail showed the later one, not this
                    await refused.ack()
                with pytest.raises(Fenced):  # the acked retry tells why
                    await append(a.log, cancel("decided-by-a"), fencing)
                a.give(slot)
        assert await a.log.read("decided-by-a") == []
        assert [s.seq for s in await a.log.read("unfenced")] == [stored_at]
    finally:
        await a_nc.close()
        await b_nc.close()


async def stop(pid: int) -> None:
    """SIGSTOP ``pid`` and wait until it is stopped (the signal takes effect a little later)."""
    os.kill(pid, signal.SIGSTOP)
    with anyio.fail_after(5):
        while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
            await anyio.sleep(0.01)


async def settled(log: EventLog, sent: Pending | Tailed, event: RunCancelled) -> int:
    """Where ``event`` was stored: its tail's answer, else an acked retry's (a duplicate)."""
    try:
        return (await sent.ack()).seq
    except NatsTimeoutError:  # NotSeen, or the acked one's answer never came
        stored = await log.append(event)
        assert stored.duplicate
        return stored.seq


async def test_a_burst_whose_acked_last_append_is_refused_answers_every_one_at_once(
    server: NatsServer,
) -> None:
    a_nc = await server.connect("scheduler", "a")
    b_nc = await server.connect("scheduler", "b")
    try:
        a, b = Fence(EventLog(a_nc), "a", slots=4), Fence(EventLog(b_nc), "b", slots=4)
        async with tailing(server, within_s=60.0) as confirm:  # no deadline helps here
            with anyio.fail_after(10):
                await a.establish(term=1)
                await b.establish(term=2)
                a.log.tail_confirm = confirm
                events = [cancel(f"burst-{n}") for n in range(3)]
                sent = [await a.log.send(event, last=False) for event in events[:2]]
                _, fencing = await a.take()
                last = await a.log.send(events[2], fencing=fencing)  # acked, refused
                with pytest.raises(APIError):
                    await last.ack()
                seqs = [await settled(a.log, s, e) for s, e in zip(sent, events, strict=False)]
                for event, seq in zip(events, seqs, strict=False):
                    assert [s.seq for s in await a.log.read(event.run_id)] == [seq]
                assert confirm.waiting() == 0
                # a whole pass of a fenced scheduler: every decision Fenced, none stored
                late = [cancel(f"late-{n}") for n in range(6)]
                assert all(isinstance(r, Fenced) for r in await append_all(a.log, a, late))
        assert await a.log.read("burst-2") == []
        for n in range(6):
            assert await a.log.read(f"late-{n}") == []
    finally:
        await a_nc.close()
        await b_nc.close()


async def test_a_burst_whose_acked_last_append_goes_unanswered_answers_every_one(
    server: NatsServer,
) -> None:
    nc = await server.connect("scheduler", "a")
    try:
        log = EventLog(nc)
        assert server.pid is not None
        async with tailing(server, within_s=60.0) as confirm:
            log.tail_confirm = confirm
            events = [cancel(f"lost-{n}") for n in range(3)]
            await stop(server.pid)  # the server takes them, answers nothing
            try:
                sent: list[Pending | Tailed] = [
                    await log.send(event, last=False) for event in events[:2]
                ]
                headers = {"Nats-Msg-Id": events[2].message_id()}
                subject, data = subject_of(events[2]), encode_event(events[2])
                sent.append(await confirm.send_acked(nc, subject, data, headers, timeout=0.3))
                with anyio.fail_after(10), pytest.raises(NatsTimeoutError):
                    await sent[2].ack()
                # the acked one's timeout answered the ones before it (the deadline is 60 s)
                assert all(s.answered() for s in sent[:2] if isinstance(s, Tailed))
            finally:
                os.kill(server.pid, signal.SIGCONT)
            with anyio.fail_after(20):  # asked again the acked way, at once: all stored once
                seqs = [await settled(log, s, e) for s, e in zip(sent, events, strict=True)]
        for event, seq in zip(events, seqs, strict=True):
            assert [s.seq for s in await log.read(event.run_id)] == [seq]
    finally:
        await nc.close()


async def test_a_tail_that_stops_delivering_leaves_no_append_waiting(server: NatsServer) -> None:
    nc = await server.connect("scheduler", "a")
    tail_nc = await server.connect("scheduler", "tail")
    try:
        log, tail_log = EventLog(nc), EventLog(tail_nc)
        confirm = TailConfirm(within_s=0.3)
        sub = await tail_log.follow(lambda s, e: None, lambda s: None, confirm=confirm)
        confirm.start()
        log.tail_confirm = confirm
        await sub.unsubscribe()  # the tail delivers nothing more; nobody said so
        with anyio.fail_after(10):
            stored = await log.record(cancel("r1"))  # the acked retry stores it
        assert [s.seq for s in await log.read("r1")] == [stored.seq]
        assert confirm.waiting() == 0
    finally:
        await nc.close()
        await tail_nc.close()


SCHEDULING = parse({"settings": {"node_loss_timeout_s": 10, "resource_wait_timeout_s": 60}})


async def test_a_fenced_schedulers_reply_less_decision_is_refused_and_it_stands_by(
    server: NatsServer,
) -> None:
    nc = await server.connect("scheduler", "s")
    other = await server.connect("scheduler", "newer")
    admin = await server.connect("admin", "setup")
    try:
        clock = FakeClock()
        scheduler = Scheduler(nc, SCHEDULING, clock=clock)
        await provision(admin, SCHEDULING, LogSettings())
        await Catalog(admin.jetstream()).register(PipelineInfo(pointer="t/p:v1", max_retries=0))
        submit = EventLog(admin)  # what gateways append
        acked: list[str] = []
        send = scheduler.log._publisher.send

        async def counted(subject: str, *args: Any, **kw: Any) -> Any:
            acked.append(subject)
            return await send(subject, *args, **kw)

        scheduler.log._publisher.send = counted  # type: ignore[method-assign]
        async with scheduler.following():
            with anyio.fail_after(20):
                await scheduler.fence.establish(term=1)
                scheduler.fleet.observe(beat("a1", "t/p:v1", slots=1))
                for run_id in ("r1", "r2"):
                    now = clock.now()
                    await submit.append(
                        RunSubmitted(run_id=run_id, at=now, team="t", pipeline="t/p:v1", inputs=[])
                    )
                    await submit.append(RunAdmitted(run_id=run_id, at=now, tier="startup"))
                await scheduler.index.wait_for_seq(await scheduler.log.last_seq(), timeout=5)
                acked.clear()
                decisions = scheduler.statistics().decisions
                await scheduler.decide()  # leads: r1 dispatched, r2 queued: one ack asked for
                assert scheduler.statistics().decisions - decisions == 2
                assert len(acked) == 1
                assert [s.event.kind for s in await scheduler.log.read("r1")][-1] == "dispatched"
                assert not scheduler.fenced
                await Fence(EventLog(other), "newer").establish(term=2)
                await scheduler.index.wait_for_seq(await scheduler.log.last_seq(), timeout=5)
                scheduler.fleet.observe(beat("a1", "t/p:v1", slots=2))  # room for r2
                await scheduler.decide()
                assert scheduler.fenced  # refused by the server: it stands by
                assert acked  # found by the acked retry of what the tail did not show
        assert await EventLog(nc).read_subject(kind_subjects("dispatched")) != []
        kinds = [s.event.kind for s in await EventLog(nc).read("r2")]
        assert "dispatched" not in kinds, kinds
    finally:
        await nc.close()
        await other.close()
        await admin.close()


GATEWAY = parse(
    {
        "teams": {"acme": {"tier": "basic", "tokens": ["tok_acme"]}},
        "settings": {"request_deadline_s": 1, "settle_s": 0.1, "sync_wait_s": 1},
    }
)
BODY = {"pipeline": "t/p:v1", "inputs": [{"type": "string", "value": "x"}], "async_run": True}


async def test_a_refused_submission_answers_what_it_answers_with_acks(
    server: NatsServer,
) -> None:
    admin = await server.connect("admin", "setup")
    nc = await server.connect("gateway", "gateway")
    try:
        await provision(admin, GATEWAY, LogSettings())
        gateway = Gateway(nc, GATEWAY)
        async with anyio.create_task_group() as tg:
            await tg.start(gateway.run)
            await gateway.catalog.register(PipelineInfo(pointer="t/p:v1"))
            confirm = gateway.log.tail_confirm
            assert confirm is not None and confirm.active
            transport = httpx.ASGITransport(app=gateway.app())
            headers = {"Authorization": "Bearer tok_acme"}
            async with httpx.AsyncClient(
                transport=transport, base_url="http://gw", headers=headers
            ) as http:
                accepted = await http.post("/v4/runs", json=BODY)
                assert accepted.status_code == 202, accepted.text
                # the log now refuses every new message (a full stream that discards new)
                info = await admin.jetstream().stream_info(EVENTS_STREAM)
                config = info.config
                config.max_msgs = int(info.state.messages)
                config.discard = api.DiscardPolicy.NEW
                await admin.jetstream().update_stream(config)
                answers = []
                for tailed in (True, False):
                    gateway.log.tail_confirm = confirm if tailed else None
                    with anyio.fail_after(20):
                        key = f"k-{tailed}"
                        r = await http.post("/v4/runs", json=BODY, headers={"Idempotency-Key": key})
                    answers.append((r.status_code, r.json()["detail"]["code"]))
                assert answers[0] == answers[1], answers
                assert answers[0][0] == 503, answers
            tg.cancel_scope.cancel()
    finally:
        await nc.close()
        await admin.close()
