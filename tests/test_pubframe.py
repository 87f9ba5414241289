"""Publishes sent as prepared frames (runtime.infra.pubframe) and their acks read from the
reader (runtime.infra.jspub): the bytes are nats-py's own, and against a real nats-server
(auth on) headers and payload arrive exactly, dedupe and fencing hold, an append made while
the server restarts is stored once it is back, and the connection's refusals are nats-py's."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator
from importlib.metadata import version
from pathlib import Path

import anyio
import pytest
from nats import errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api
from nats.js.errors import APIError

from contracts import RunDispatched
from runtime.infra import pubframe
from runtime.infra.eventlog import EventLog, Fencing, subject_of
from runtime.infra.fence import WRONG_LAST_SEQUENCE
from runtime.infra.jspub import publisher
from runtime.infra.natsserver import NatsServer
from tests.harness import own_server, stop_until_disconnected

pytestmark = pytest.mark.anyio

STREAM = api.StreamConfig(name="PUBFRAME_T", subjects=["pubframe.t.>"], duplicate_window=60.0)
FENCED = {
    "Nats-Msg-Id": "run1.dispatched.1",
    "Nats-Expected-Last-Subject-Sequence": "0",
    "Nats-Expected-Last-Subject-Sequence-Subject": "pubframe.t.fence",
}
HEADERS: list[dict[str, str] | None] = [
    None,
    {},
    {"Nats-Msg-Id": "m1"},
    FENCED,
    {" Spaced ": "  value with spaces  ", "": "skipped", "Broken": "a\r\nPUB x 1\r\nb"},
]


def dispatched(run_id: str) -> RunDispatched:
    return RunDispatched(run_id=run_id, at=time.time(), attempt=1, agent_id="agent-1")


@pytest.fixture
async def js(nc: Client) -> AsyncIterator[object]:
    js = nc.jetstream(timeout=5.0)
    await js.add_stream(STREAM)
    yield js


async def test_nats_py_internals_it_relies_on(nc: Client) -> None:
    pinned = next(
        line.split("==")[1].strip()
        for line in (Path(__file__).parent.parent / "constraints.txt").read_text().splitlines()
        if line.startswith("nats-py==")
    )
    assert version("nats-py") == pinned, "runtime.infra.pubframe relies on nats-py's internals"
    publish = inspect.getsource(Client.publish)
    for check in (
        "if self.is_closed:\n            raise errors.ConnectionClosedError",
        "if self.is_draining_pubs:\n            raise errors.ConnectionDrainingError",
        "self._max_pending_size <= 0 or payload_size + self._pending_data_size > "
        "self._max_pending_size",
        "if payload_size > self._max_payload:\n            raise errors.MaxPayloadError",
    ):
        assert check in publish
    send = inspect.getsource(Client._send_publish)
    assert (
        'self.stats["out_msgs"] += 1' in send and 'self.stats["out_bytes"] += payload_size' in send
    )
    assert send.rstrip().endswith(
        "await self._send_command(pub_cmd)\n"
        "        if self._flush_queue is not None and self._flush_queue.empty():\n"
        "            await self._flush_pending()"
    )
    assert nc._status == Client.CONNECTED and nc.is_connected
    assert isinstance(nc._max_payload, int) and isinstance(nc._pending_data_size, int)
    assert isinstance(nc._max_pending_size, int)
    assert inspect.iscoroutinefunction(nc._send_command)
    assert inspect.iscoroutinefunction(nc._flush_pending)
    # a frame written at once goes where the flusher writes, and only with nothing pending
    assert isinstance(nc._pending, list) and not nc._pending
    assert isinstance(nc._transport._io_writer, asyncio.StreamWriter)
    flusher = inspect.getsource(Client._flusher)
    assert "self._transport.writelines(self._pending[:])\n" in flusher
    assert "self._pending = []\n" in flusher


async def test_frames_are_the_bytes_nats_py_sends(
    nc: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[bytes] = []

    async def record(command: bytes, priority: bool = False) -> None:
        sent.append(command)

    monkeypatch.setattr(nc, "_send_command", record)
    for headers in HEADERS:
        for reply in ("", "_INBOX.abc.7"):
            payload = b"\x00 payload \r\nHPUB y 1 2\r\n"
            await nc.publish("pubframe.t.a", payload, reply=reply, headers=headers)
            assert pubframe.frame("pubframe.t.a", reply, headers, payload) == sent.pop()
    for subject, reply, headers in (
        ("", "", None),
        ("a b", "", None),
        ("a\r\nPUB", "", None),
        ("a", "in box", None),
        ("a", "", {"Bad Name": "x"}),
        ("a", "", {"Bad:Name": "x"}),
    ):
        with pytest.raises(errors.Error) as theirs:
            await nc.publish(subject, b"", reply=reply, headers=headers)
        with pytest.raises(type(theirs.value)):
            pubframe.frame(subject, reply, headers, b"")
    assert not sent


async def test_a_lone_frame_leaves_at_once_and_a_burst_shares_the_flushers_write(
    nc: Client,
) -> None:
    """The first frame of a loop iteration on an idle connection is written to the socket
    before ``send`` returns (nothing pending, the flusher not woken); the frames after it in
    the same iteration wait in the pending buffer for the flusher; everything arrives once, in
    the order sent; an iteration later, a lone frame is written at once again."""
    got: list[bytes] = []

    async def receive(msg: Msg) -> None:
        got.append(msg.data)

    sub = await nc.subscribe("pubframe.t.order.>", cb=receive)
    await nc.flush()
    with anyio.fail_after(10):
        frames = [pubframe.frame(f"pubframe.t.order.{i}", "", None, b"%d" % i) for i in range(5)]
        await pubframe.send(nc, frames[0], 1)
        assert not nc._pending and nc._flush_queue.empty()  # on the socket already
        for command in frames[1:3]:  # the same iteration: queued for the flusher
            await pubframe.send(nc, command, 1)
        assert nc._pending == frames[1:3]
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        await pubframe.send(nc, frames[3], 1)  # a later iteration, the flusher done: at once
        assert not nc._pending
        await pubframe.send(nc, frames[4], 1)
        assert nc._pending == frames[4:]
        while len(got) < 5:
            await anyio.sleep(0.01)
    await anyio.sleep(0.05)
    assert got == [b"0", b"1", b"2", b"3", b"4"]
    await sub.unsubscribe()


async def test_a_frame_is_not_written_at_once_past_one_still_pending(nc: Client) -> None:
    """A frame another path left in the pending buffer (``Client.publish``, a ``SUB``) is
    still ahead of a frame sent after it, even as the first of a loop iteration: the later
    one waits behind it for the flusher, and they arrive in the order sent."""
    got: list[bytes] = []

    async def receive(msg: Msg) -> None:
        got.append(msg.data)

    sub = await nc.subscribe("pubframe.t.behind.>", cb=receive)
    await nc.flush()
    with anyio.fail_after(10):
        await asyncio.sleep(0)  # a fresh loop iteration: no frame written at once in it yet
        await nc.publish("pubframe.t.behind.0", b"0")  # pending, for the flusher
        assert nc._pending
        await pubframe.send(nc, pubframe.frame("pubframe.t.behind.1", "", None, b"1"), 1)
        assert len(nc._pending) == 2  # behind the pending one, not on the socket
        while len(got) < 2:
            await anyio.sleep(0.01)
    assert got == [b"0", b"1"]
    await sub.unsubscribe()


async def test_headers_and_payload_arrive_exactly(nc: Client, js: object) -> None:
    pub = publisher(nc)
    payload = bytes(range(256)) + b"\r\nPUB pubframe.t.x 1\r\n"
    with anyio.fail_after(10):
        for i, headers in enumerate(h for h in HEADERS if h):
            ack = await pub.publish(f"pubframe.t.{i}", payload, headers, 5.0)
            stored = await nc.jetstream().get_msg("PUBFRAME_T", ack.seq)
            assert stored.data == payload
            expected = {k.strip(): v.strip() for k, v in headers.items() if k.strip()}
            if "Broken" in expected:
                expected["Broken"] = "a  PUB x 1  b"  # line breaks become spaces, as nats-py does
            assert stored.headers == expected


async def test_an_append_sent_twice_is_stored_once_and_fencing_refuses(nc: Client) -> None:
    log = EventLog(nc)
    await log.ensure()
    event = dispatched("twice")
    with anyio.fail_after(10):
        first, second = await log.send(event), await log.send(event)
        assert not (await first.ack()).duplicate
        again = await second.ack()
        assert again.duplicate
        assert len(await log.read("twice")) == 1
        fence = Fencing(subject_of(event), again.seq)
        assert not (await log.append(dispatched("fenced"), fencing=fence)).duplicate
        with pytest.raises(APIError) as refused:  # the fence's subject moved on since
            await log.append(dispatched("fenced-2"), fencing=Fencing(fence.subject, again.seq - 1))
        assert refused.value.err_code == WRONG_LAST_SEQUENCE
        assert await log.read("fenced-2") == []


async def test_an_append_while_the_server_restarts_is_stored_once_it_is_back(
    tmp_path: Path,
) -> None:
    async with own_server(tmp_path) as (server, nc):
        log = EventLog(nc)
        await log.ensure()
        await log.append(dispatched("before"))
        await stop_until_disconnected(server, nc)
        appended: list[int] = []

        async def append() -> None:
            appended.append((await log.append(dispatched("during"))).seq)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(append)
                pending = await log.send(dispatched("buffered"))  # kept until reconnected
                await anyio.sleep(0.3)
                assert not appended
                await server.start()
            assert (await pending.ack()).seq > 0
            assert [len(await log.read(r)) for r in ("before", "during", "buffered")] == [1, 1, 1]
        assert len(appended) == 1


async def test_the_connections_refusals_are_nats_pys(nats_server: NatsServer) -> None:
    nc, closed = await nats_server.connect(), await nats_server.connect()
    pub = publisher(nc)
    with anyio.fail_after(20):
        too_big = b"x" * (nc._max_payload + 1)
        with pytest.raises(errors.MaxPayloadError):
            await pub.publish("pubframe.t.big", too_big, {"Nats-Msg-Id": "big"}, 5.0)
        with pytest.raises(errors.BadSubjectError):
            await pub.publish("pubframe.t.a\r\nPUB x 0", b"", None, 5.0)
        await closed.close()
        with pytest.raises(errors.ConnectionClosedError):
            await publisher(closed).send("pubframe.t.a", b"1", None, 5.0)
        await nats_server.stop()
        while nc.is_connected:
            await anyio.sleep(0.01)
        over_buffer = b"x" * (nc._max_pending_size + 1)
        with pytest.raises(errors.OutboundBufferLimitError):
            await pub.send("pubframe.t.a", over_buffer, None, 5.0)
        assert not pub._waiting  # nothing left waiting for an ack
        await nats_server.start()
        while not nc.is_connected:
            await anyio.sleep(0.01)
        await nc.close()
