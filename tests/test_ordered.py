"""Ordered consumers delivered from the reader (runtime.infra.ordered), against a real
nats-server: order, handlers that suspend, gaps, a server restart, flow control with a slow
handler, a handler that raises, and the nats-py internals the module relies on."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from importlib.metadata import version
from pathlib import Path

import anyio
import anyio.lowlevel
import nats
import pytest
from nats.aio.client import Client
from nats.js import api
from nats.protocol.parser import Parser

from contracts import RunSubmitted
from contracts.events import AnyEvent
from runtime.infra import ordered
from runtime.infra.eventlog import EventLog
from runtime.infra.natsserver import NatsServer
from runtime.infra.ordered import OrderedTail

pytestmark = pytest.mark.anyio

NAME = "ORDERED_T"
STREAM = api.StreamConfig(name=NAME, subjects=["ordered.t.>"])


@pytest.fixture
async def js(nc: Client) -> AsyncIterator[nats.js.JetStreamContext]:
    js = nc.jetstream()
    await js.add_stream(STREAM)
    yield js


async def fill(js: nats.js.JetStreamContext, count: int, size: int = 16) -> None:
    """``count`` messages on the test stream (sequences 1..count from an empty stream)."""
    nc = js._nc
    for i in range(count):
        await nc.publish(f"ordered.t.{i % 7}", str(i).encode().ljust(size, b"."))
        if i % 500 == 499:
            await nc.flush()
    await nc.flush()
    with anyio.fail_after(10):
        while (await js.stream_info(NAME)).state.messages < count:
            await anyio.sleep(0.01)


class Seen:
    """What a handler saw, and a way to wait for it."""

    def __init__(self) -> None:
        self.seqs: list[int] = []
        self.changed = anyio.Event()

    def add(self, seq: int) -> None:
        self.seqs.append(seq)
        self.changed.set()
        self.changed = anyio.Event()

    async def until(self, count: int, timeout: float = 10.0) -> None:
        with anyio.fail_after(timeout):
            while len(self.seqs) < count:
                await self.changed.wait()


def config(start: int = 1) -> api.ConsumerConfig:
    return api.ConsumerConfig(opt_start_seq=start, filter_subject="ordered.t.>")


async def test_nats_py_internals_it_relies_on(nc: Client) -> None:
    pinned = "2.16.0"  # constraints.txt: a new version needs the checks below, and a look
    assert version("nats-py") == pinned, "runtime.infra.ordered relies on nats-py's internals"
    assert "await self.nc._process_msg(sid, subject, reply, payload, hdr)" in inspect.getsource(
        Parser.parse
    )
    heartbeat = b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 7\r\n\r\n"
    headers = await nc._process_headers(heartbeat)
    assert headers == {"Status": "100", "Description": "Idle Heartbeat", "Nats-Last-Consumer": "7"}
    sub = await nc.subscribe("ordered.internals", future=asyncio.Future())
    assert nc._subs[sub._id] is sub
    await sub.unsubscribe()
    assert callable(nc._error_cb) and isinstance(nc.stats["in_msgs"], int)
    assert hasattr(asyncio.tasks, "_enter_task") and hasattr(asyncio.tasks, "_leave_task")
    assert ordered.ack_tokens(b"$JS.ACK.S.C.1.42.7.1700000000000000000.0") == (42, 7)
    assert ordered.ack_tokens(b"$JS.ACK.dom.hash.S.C.1.42.7.1700000000000000000.0.tok") == (42, 7)
    assert ordered.ack_tokens(b"_INBOX.x") is None


async def test_order_is_kept_across_many_messages(js: nats.js.JetStreamContext) -> None:
    await fill(js, 3000)
    seen = Seen()

    async def handler(seq: int, subject: bytes, data: bytes) -> None:
        assert data.startswith(str(seq - 1).encode())
        seen.add(seq)

    tail = await OrderedTail(js, NAME, config(), handler).start()
    await seen.until(3000)
    await fill_more(js, 3000, 500)
    await seen.until(3500)
    await tail.unsubscribe()
    assert seen.seqs == list(range(1, 3501))


async def fill_more(js: nats.js.JetStreamContext, start: int, count: int) -> None:
    for i in range(start, start + count):
        await js._nc.publish(f"ordered.t.{i % 7}", str(i).encode())
    await js._nc.flush()


async def test_a_handler_that_suspends_holds_back_later_messages(
    js: nats.js.JetStreamContext,
) -> None:
    await fill(js, 200)
    gate = anyio.Event()
    seen = Seen()
    tasks: dict[int, asyncio.Task[object] | None] = {}
    lock = anyio.Lock()

    async def handler(seq: int, subject: bytes, data: bytes) -> None:
        before = asyncio.current_task()
        async with lock:  # anyio checks the task that releases it is the one that acquired it
            if seq == 50:
                await gate.wait()
            elif seq % 10 == 0:
                await anyio.lowlevel.checkpoint()
        assert asyncio.current_task() is before
        tasks[seq] = before
        seen.add(seq)

    tail = await OrderedTail(js, NAME, config(), handler).start()
    await seen.until(49)
    with anyio.fail_after(10):
        while tail.last_seq < 200:  # everything has arrived meanwhile
            await anyio.sleep(0.01)
    assert seen.seqs == list(range(1, 50))
    gate.set()
    await seen.until(200)
    await tail.unsubscribe()
    assert seen.seqs == list(range(1, 201))
    assert {task for task in tasks.values()} == {tail._task}


async def test_a_gap_recreates_the_consumer_without_skipping_or_repeating(
    js: nats.js.JetStreamContext,
) -> None:
    await fill(js, 100)
    seen = Seen()

    async def handler(seq: int, subject: bytes, data: bytes) -> None:
        seen.add(seq)

    tail = await OrderedTail(js, NAME, config(), handler).start()
    await seen.until(100)
    # a delivery from this consumer with a consumer sequence that skips ahead: one was lost
    reply = f"$JS.ACK.{NAME}.{tail.consumer}.1.150.{100 + 5}.0.0".encode()
    await ordered.Connection.of(js._nc).process_msg(tail._sid, b"ordered.t.1", reply, b"x", b"")
    await fill_more(js, 100, 100)
    await seen.until(200)
    await tail.unsubscribe()
    assert tail.resets == 1
    assert seen.seqs == list(range(1, 201))


async def test_a_slow_handler_holds_back_the_server(js: nats.js.JetStreamContext) -> None:
    count, size = 20_000, 1024
    await fill(js, count, size)
    gate = anyio.Event()
    seen = Seen()

    async def handler(seq: int, subject: bytes, data: bytes) -> None:
        if seq == 1:
            await gate.wait()
        seen.add(seq)

    tail = await OrderedTail(js, NAME, config(), handler).start()
    with anyio.fail_after(10):  # what the server sends before it waits for a flow-control answer
        received = -1
        while tail._received == 0 or tail._received != received:
            received = tail._received
            await anyio.sleep(0.3)
    assert 0 < len(tail._waiting) < count // 4  # nats-py's cb= path would hold all of them
    gate.set()
    await seen.until(count, timeout=30)
    await tail.unsubscribe()
    assert seen.seqs == list(range(1, count + 1))


async def test_a_handler_that_raises_reports_and_goes_on(
    js: nats.js.JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    await fill(js, 30)
    errors: list[BaseException] = []

    async def error_cb(err: BaseException) -> None:
        errors.append(err)

    monkeypatch.setattr(js._nc, "_error_cb", error_cb)
    seen = Seen()

    async def handler(seq: int, subject: bytes, data: bytes) -> None:
        if seq == 20:
            await anyio.lowlevel.checkpoint()  # raises after a suspension, from the tail's task
        if seq in (10, 20):
            raise ValueError(f"bad {seq}")
        seen.add(seq)

    tail = await OrderedTail(js, NAME, config(), handler).start()
    await seen.until(28)
    with anyio.fail_after(5):
        while len(errors) < 2:
            await anyio.sleep(0.01)
    await tail.unsubscribe()
    assert seen.seqs == [s for s in range(1, 31) if s not in (10, 20)]
    assert [str(e) for e in errors] == ["bad 10", "bad 20"]


async def test_a_plain_function_handler_is_called_in_order_and_may_raise(
    js: nats.js.JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A handler that is a plain function (an index's apply) is called from the reader, in
    log order, with no coroutine; one that raises is reported and the next message handled."""
    await fill(js, 300)
    errors: list[BaseException] = []

    async def error_cb(err: BaseException) -> None:
        errors.append(err)

    monkeypatch.setattr(js._nc, "_error_cb", error_cb)
    seen = Seen()
    reader = None

    def handler(seq: int, subject: bytes, data: bytes) -> None:
        nonlocal reader
        reader = asyncio.current_task()
        assert data.startswith(str(seq - 1).encode())
        if seq == 100:
            raise ValueError("bad 100")
        seen.add(seq)

    tail = await OrderedTail(js, NAME, config(), handler).start()
    await seen.until(299)
    await fill_more(js, 300, 50)
    await seen.until(349)
    with anyio.fail_after(5):
        while not errors:
            await anyio.sleep(0.01)
    await tail.unsubscribe()
    assert seen.seqs == [s for s in range(1, 351) if s != 100]
    assert [str(e) for e in errors] == ["bad 100"]
    assert reader is not tail._task  # called from the connection's reader, not the tail's task
    assert tail._handled == 350 and not tail._busy


async def test_unsubscribe_stops_delivery(js: nats.js.JetStreamContext) -> None:
    seen = Seen()

    async def handler(seq: int, subject: bytes, data: bytes) -> None:
        seen.add(seq)

    tail = await OrderedTail(js, NAME, config(), handler).start()
    await fill_more(js, 0, 5)
    await seen.until(5)
    await tail.unsubscribe()
    await fill_more(js, 5, 5)
    await anyio.sleep(0.3)
    assert seen.seqs == [1, 2, 3, 4, 5]
    assert tail._sid not in ordered.Connection.of(js._nc).tails


def submitted(run_id: str) -> RunSubmitted:
    return RunSubmitted(run_id=run_id, at=1.0, team="t", pipeline="a/b:v1", inputs=[])


async def test_the_event_tail_resumes_after_a_server_restart(tmp_path: Path) -> None:
    server = NatsServer(store_dir=tmp_path / "nats")
    await server.start()
    nc = await server.connect()
    try:
        log = EventLog(nc)
        await log.ensure()
        seen = Seen()
        runs: list[str] = []

        async def handler(seq: int, event: AnyEvent) -> None:
            runs.append(event.run_id)
            seen.add(seq)

        tail = await log.tail(handler)
        for i in range(20):
            await log.append(submitted(f"run-{i}"))
        await seen.until(20)
        server.kill()
        restarted = NatsServer(store_dir=tmp_path / "nats", port=server.port)
        await restarted.start()
        try:
            for i in range(20, 40):  # retried through the reconnect
                await log.append(submitted(f"run-{i}"))
            await seen.until(40, timeout=20)  # the consumer is recreated after ~2 heartbeats
            await tail.unsubscribe()
            assert seen.seqs == list(range(1, 41))
            assert runs == [f"run-{i}" for i in range(40)]
            assert tail.resets >= 1
        finally:
            await restarted.stop()
    finally:
        await nc.close()
        server.kill()
