"""natsread: a connection's messages that its raw receivers take are parsed and handled in the
protocol's ``data_received``; everything else goes nats-py's way, in the same order. Against a
fake client (however the bytes are cut) and a real nats-server (many messages in one read, a
large one, a permissions violation, a restart after SIGKILL, TLS, a receiver that raises)."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.transport import TcpTransport
from nats.protocol.parser import Parser

from runtime.infra import certs, natsread, ordered
from runtime.infra.natsparse import FastParser
from runtime.infra.natsread import EagerReader
from runtime.infra.natsserver import NatsServer, ServerTls
from tests.test_natsparse import WIRE, Recorder, chunked, msg

pytestmark = pytest.mark.anyio

TAKEN = {1, 3, 6, 22}  # WIRE's messages of these subscriptions go to the dispatcher


def test_nats_py_internals_it_relies_on() -> None:
    pinned = "2.16.0"  # constraints.txt: a new version needs the checks below, and a look
    assert version("nats-py") == pinned, "runtime.infra.natsread relies on nats-py's internals"
    assert "self._reading_task = asyncio.get_running_loop().create_task(self._read_loop())" in (
        inspect.getsource(Client._process_connect_init)
    )
    loop = inspect.getsource(Client._read_loop)
    assert "b = await self._transport.read(DEFAULT_BUFFER_SIZE)" in loop
    assert "await self._ps.parse(b)" in loop and "self.is_reconnecting" in loop
    assert "self._io_reader.read(buffer_size)" in inspect.getsource(TcpTransport.read)
    assert "self._ps.reset()" in inspect.getsource(Client._process_op_err)
    assert "self._buffer" in inspect.getsource(asyncio.StreamReader.feed_data)
    assert {Client.CONNECTED, Client.DRAINING_SUBS, Client.DRAINING_PUBS} == natsread._READING


class Slow(Recorder):
    """A client whose handling of a message suspends (nats-py's ``_process_msg`` may) before
    it is recorded: whatever is fed meanwhile must wait behind it."""

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        await asyncio.sleep(0)
        await super()._process_msg(sid, subject, reply, data, headers)


class Fake:
    """A client as the reader sees it, with a read loop as nats-py's (read, then parse), and
    a record of every message and line in the order they were handled, whichever way."""

    def __init__(self) -> None:
        self.recorder = Slow()
        self.seen = self.recorder.seen
        self.parser = FastParser(self.recorder)
        self.parser.dispatch = self.dispatch
        self.parser.takes = TAKEN.__contains__
        self.now = 0  # messages handled in feed_data (not in the read loop's task)
        self.reader = asyncio.StreamReader()
        self.reader.__class__ = EagerReader
        self.nc = SimpleNamespace(
            _ps=self.parser,
            _status=Client.CONNECTED,
            _transport=SimpleNamespace(_io_reader=self.reader),
        )
        self.reader.nc = self.nc  # type: ignore[attr-defined]

    def dispatch(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> bool:
        if sid not in TAKEN:
            return False
        self.now += asyncio.current_task() is None or not self.parser.parsing
        self.seen.append(("msg", sid, subject, reply, data, headers or None))
        return True

    async def read_loop(self) -> None:
        while True:
            data = await self.reader.read(32768)
            if not data:
                return
            await self.parser.parse(data)


@settings(max_examples=60, deadline=None)
@given(
    cuts=st.lists(st.integers(min_value=0, max_value=len(WIRE)), max_size=40),
    pauses=st.lists(st.booleans(), max_size=41),
)
async def test_the_same_messages_in_the_same_order_however_cut_and_timed(
    cuts: list[int], pauses: list[bool]
) -> None:
    """Chunks fed with or without a loop step between them (the read loop parsing, or not,
    when the next one comes): every message and line once, in nats-py's order."""
    chunks = chunked(WIRE, cuts)
    expected = Recorder()
    slow = Parser(expected)
    for chunk in chunks:
        await slow.parse(chunk)
    fake = Fake()
    reading = asyncio.get_running_loop().create_task(fake.read_loop())
    for i, chunk in enumerate(chunks):
        fake.reader.feed_data(chunk)
        if i < len(pauses) and pauses[i]:
            await asyncio.sleep(0)
    fake.reader.feed_eof()
    with anyio.fail_after(5):
        await reading
    assert fake.seen == expected.seen
    assert len(fake.seen) == 12 and not fake.parser.buf


async def test_many_messages_in_one_read_are_handled_before_the_loop_turns() -> None:
    fake = Fake()
    wire = b"".join(msg("jetrun.a", 1, f"r.{i}", str(i).encode()) for i in range(300))
    fake.reader.feed_data(wire)
    assert fake.now == 300 and [s[3] for s in fake.seen] == [f"r.{i}".encode() for i in range(300)]
    assert not fake.parser.buf and not fake.reader._buffer  # type: ignore[attr-defined]


async def test_a_message_split_across_reads_is_handled_when_its_last_byte_comes() -> None:
    fake = Fake()
    first = msg("jetrun.a", 3, "", b"x" * 100_000)
    wire = first + msg("jetrun.b", 1, "", b"y")
    cut = len(first) - 10
    for at in range(0, cut, 4096):
        fake.reader.feed_data(wire[at : min(at + 4096, cut)])
    assert fake.seen == [] and fake.now == 0
    fake.reader.feed_data(wire[cut:])
    assert [(s[1], len(s[4])) for s in fake.seen] == [(3, 100_000), (1, 1)] and fake.now == 2


async def test_what_follows_another_line_waits_for_the_read_loop() -> None:
    """A PING (nats-py's way: awaited) and an untaken message hold back what comes after
    them, which the read loop then handles in order."""
    fake = Fake()
    fake.reader.feed_data(msg("a", 1, "", b"1") + b"PING\r\n" + msg("b", 1, "", b"2"))
    fake.reader.feed_data(msg("c", 1, "", b"3"))  # the loop has not read the rest yet
    assert [s[4] for s in fake.seen] == [b"1"]
    reading = asyncio.get_running_loop().create_task(fake.read_loop())
    with anyio.fail_after(5):
        while len(fake.seen) < 4:
            await asyncio.sleep(0)
    fake.reader.feed_data(msg("d", 9, "", b"4") + msg("e", 1, "", b"5"))
    fake.reader.feed_eof()
    with anyio.fail_after(5):
        await reading
    assert [s[0] if s[0] != "msg" else s[4] for s in fake.seen] == [
        b"1",
        "ping",
        b"2",
        b"3",
        b"4",
        b"5",
    ]
    assert fake.now == 1


async def test_what_comes_while_the_read_loop_is_handling_a_message_waits_behind_it() -> None:
    fake = Fake()
    handling, go = asyncio.Event(), asyncio.Event()

    async def process_msg(*args: Any) -> None:
        handling.set()
        await go.wait()  # nats-py's handling of a message may suspend
        fake.seen.append(("msg", args[0]))

    fake.recorder._process_msg = process_msg  # type: ignore[method-assign]
    reading = asyncio.get_running_loop().create_task(fake.read_loop())
    fake.reader.feed_data(msg("a", 9, "", b"1") + msg("b", 1, "", b"2"))
    with anyio.fail_after(5):
        await handling.wait()
    fake.reader.feed_data(msg("c", 1, "", b"3"))
    assert fake.seen == []
    go.set()
    fake.reader.feed_eof()
    with anyio.fail_after(5):
        await reading
    assert [s[1] if s[1] == 9 else s[4] for s in fake.seen] == [9, b"2", b"3"]


async def test_a_reset_while_a_message_is_handled_here_drops_what_the_old_buffer_held() -> None:
    """A handler that begins a reconnect (the parser reset, as ``_process_op_err`` does): what
    came after it on the connection being left is dropped, as nats-py's parse drops it."""
    fake = Fake()
    taken = fake.dispatch

    def dispatch(sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> bool:
        if data == b"reset":
            fake.parser.reset()
        return taken(sid, subject, reply, data, headers)

    fake.parser.dispatch = dispatch
    fake.reader.feed_data(msg("a", 1, "", b"reset") + msg("b", 1, "", b"old") + b"PING\r\n")
    assert [s[4] for s in fake.seen] == [b"reset"]
    assert not fake.parser.buf and not fake.reader._buffer  # type: ignore[attr-defined]


@pytest.mark.parametrize("status", [Client.RECONNECTING, Client.CLOSED, Client.CONNECTING])
async def test_nothing_is_parsed_here_unless_connected(status: int) -> None:
    fake = Fake()
    fake.nc._status = status
    fake.reader.feed_data(msg("a", 1, "", b"1"))
    assert fake.seen == [] and bytes(fake.reader._buffer)  # type: ignore[attr-defined]


async def test_a_reader_the_client_left_parses_nothing() -> None:
    fake = Fake()
    fake.nc._transport = SimpleNamespace(_io_reader=asyncio.StreamReader())
    fake.reader.feed_data(msg("a", 1, "", b"1"))
    assert fake.seen == []


# --- against a real nats-server -----------------------------------------------------------


class Receiver:
    """A raw receiver on ``nc`` (as runtime.infra.jspub's acks are): what it got, and whether
    each came in ``data_received`` (no task running) or in nats-py's read loop."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self.got: list[bytes] = []
        self.in_read_loop = 0
        self.changed = asyncio.Event()
        self.raising: Exception | None = None

    async def subscribe(self, subject: str) -> None:
        sub = await self.nc.subscribe(subject, future=asyncio.Future())
        ordered.Connection.of(self.nc).receivers[sub._id] = self.receive

    def receive(self, subject: bytes, data: bytes, headers: bytes) -> None:
        if self.raising is not None:
            err, self.raising = self.raising, None
            raise err
        self.got.append(data)
        self.in_read_loop += asyncio.current_task() is not None
        self.changed.set()

    async def until(self, count: int, timeout: float = 10.0) -> None:
        with anyio.fail_after(timeout):
            while len(self.got) < count:
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    async with NatsServer(store_dir=tmp_path / "nats") as server:
        yield server


def collect(into: list[bytes]) -> Callable[[Msg], Awaitable[None]]:
    async def cb(message: Msg) -> None:
        into.append(message.data)

    return cb


async def publish_all(nc: Client, subject: str, payloads: list[bytes]) -> None:
    for payload in payloads:
        await nc.publish(subject, payload)
    await nc.flush(timeout=10)


async def test_a_receivers_messages_are_handled_where_they_arrive(server: NatsServer) -> None:
    """Many small messages (several to a read) and one near the server's max_payload (many
    reads): all in order, each in ``data_received``. Then a plain subscription's messages
    between them: the receiver's still in order (behind a plain one, through the read loop),
    the plain ones through nats-py's queue."""
    nc, sender = await server.connect(), await server.connect()
    try:
        assert isinstance(nc._transport, TcpTransport)
        assert type(nc._transport._io_reader) is EagerReader
        receiver = Receiver(nc)
        await receiver.subscribe("t.raw")
        plain: list[bytes] = []
        await nc.subscribe("t.plain", cb=collect(plain))
        await nc.flush()
        big = bytes(range(256)) * 3500  # ~900 kB
        payloads = [str(i).encode() for i in range(500)]
        for i, payload in enumerate(payloads):
            await sender.publish("t.raw", payload)
            if i == 250:
                await sender.publish("t.raw", big)
        await sender.flush(timeout=10)
        await receiver.until(501)
        assert receiver.got == [*payloads[:251], big, *payloads[251:]]
        assert receiver.in_read_loop == 0
        for i, payload in enumerate(payloads):
            await sender.publish("t.raw", payload)
            if i % 50 == 0:
                await sender.publish("t.plain", payload)
        await sender.flush(timeout=10)
        await receiver.until(1001)
        with anyio.fail_after(10):
            while len(plain) < 10:
                await asyncio.sleep(0.01)
        assert receiver.got[501:] == payloads and plain == payloads[::50]
    finally:
        await sender.close()
        await nc.close()


async def test_a_permissions_violation_is_still_reported(server: NatsServer) -> None:
    nc, sender = await server.connect("gateway"), await server.connect()
    errors: list[str] = []
    report = nc._error_cb

    async def error_cb(err: Exception) -> None:
        errors.append(str(err))
        await report(err)

    nc._error_cb = error_cb
    try:
        receiver = Receiver(nc)
        inbox = nc.new_inbox()
        await receiver.subscribe(inbox)
        await nc.flush()
        await publish_all(sender, inbox, [b"1", b"2"])
        await receiver.until(2)
        await nc.publish("t.forbidden", b"x")  # the gateway may not publish there
        await nc.flush()
        with anyio.fail_after(10):
            while not any("permissions violation" in e.lower() for e in errors):
                await asyncio.sleep(0.01)
        await publish_all(sender, inbox, [b"3"])
        await receiver.until(3)
        assert receiver.got == [b"1", b"2", b"3"] and nc.is_connected
    finally:
        await sender.close()
        await nc.close()


async def test_subscriptions_resume_after_the_server_is_killed_and_restarted(
    tmp_path: Path,
) -> None:
    server = NatsServer(store_dir=tmp_path / "nats")
    await server.start()
    nc = await server.connect()
    restarted: NatsServer | None = None
    try:
        receiver = Receiver(nc)
        await receiver.subscribe("t.raw")
        plain: list[bytes] = []
        await nc.subscribe("t.plain", cb=collect(plain))
        sender = await server.connect()
        await publish_all(sender, "t.raw", [b"before"])
        await receiver.until(1)
        await sender.close()
        first = nc._transport._io_reader  # type: ignore[union-attr]
        server.kill()
        restarted = NatsServer(store_dir=tmp_path / "nats", port=server.port)
        await restarted.start()
        with anyio.fail_after(20):
            while not (nc.is_connected and nc.stats["reconnects"]):
                await asyncio.sleep(0.05)
        await nc.flush(timeout=10)  # the subscriptions were sent again before this PING
        sender = await restarted.connect()
        await publish_all(sender, "t.plain", [b"plain"])
        await publish_all(sender, "t.raw", [str(i).encode() for i in range(100)])
        await sender.close()
        await receiver.until(101)
        with anyio.fail_after(10):
            while not plain:
                await asyncio.sleep(0.01)
        reader = nc._transport._io_reader  # type: ignore[union-attr]
        assert type(reader) is EagerReader and reader is not first
        assert receiver.got == [b"before", *(str(i).encode() for i in range(100))]
        assert receiver.in_read_loop == 0 and plain == [b"plain"]
    finally:
        await nc.close()
        if restarted is not None:
            await restarted.stop()
        server.kill()


async def test_a_receiver_that_raises_leaves_the_connection_which_reconnects(
    server: NatsServer,
) -> None:
    """Where the parse stood when a receiver raised in ``data_received`` is unknown: the error
    is reported and the client reconnects, as nats-py does on a protocol error."""
    nc, sender = await server.connect(), await server.connect()
    errors: list[BaseException] = []
    report = nc._error_cb

    async def error_cb(err: Exception) -> None:
        errors.append(err)
        await report(err)

    nc._error_cb = error_cb
    try:
        receiver = Receiver(nc)
        await receiver.subscribe("t.raw")
        await nc.flush()
        receiver.raising = ValueError("boom")
        await publish_all(sender, "t.raw", [b"lost"])
        with anyio.fail_after(20):
            while not (nc.is_connected and nc.stats["reconnects"]):
                await asyncio.sleep(0.05)
        await nc.flush(timeout=10)
        await publish_all(sender, "t.raw", [b"after"])
        await receiver.until(1)
        assert receiver.got == [b"after"] and receiver.in_read_loop == 0
        assert any(isinstance(e, ValueError) and str(e) == "boom" for e in errors)
    finally:
        await sender.close()
        await nc.close()


async def test_over_tls_too(tmp_path: Path) -> None:
    made = certs.create(tmp_path / "certs", ["127.0.0.1", "localhost"])
    tls = ServerTls(
        cert_file=str(tmp_path / "certs" / "server.pem"),
        key_file=str(tmp_path / "certs" / "server-key.pem"),
        ca_file=str(made.ca_file),
    )
    async with NatsServer(store_dir=tmp_path / "nats", tls=tls) as server:
        nc, sender = await server.connect(), await server.connect()
        try:
            reader = nc._transport._io_reader  # type: ignore[union-attr]
            assert type(reader) is EagerReader
            writer = nc._transport._io_writer  # type: ignore[union-attr]
            assert writer.transport.get_extra_info("ssl_object") is not None
            receiver = Receiver(nc)
            await receiver.subscribe("t.raw")
            await nc.flush()
            payloads = [str(i).encode() * 100 for i in range(200)]
            await publish_all(sender, "t.raw", payloads)
            await receiver.until(200)
            assert receiver.got == payloads and receiver.in_read_loop == 0
        finally:
            await sender.close()
            await nc.close()
