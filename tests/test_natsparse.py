"""natsparse.FastParser reads the server's protocol exactly as nats-py's Parser does (the same
messages, in the same order, whatever the chunking), and hands the messages a dispatcher takes
to it with a plain call."""

from __future__ import annotations

import asyncio
import itertools
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats import errors
from nats.aio.client import Client
from nats.protocol.parser import AWAITING_CONTROL_LINE, AWAITING_MSG_PAYLOAD, Parser

from runtime.infra.natsparse import FastParser, install
from runtime.infra.natsserver import find_binary, free_port


class Recorder:
    """The parts of ``Client`` the parser calls, recording what it was told."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, ...]] = []

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        self.seen.append(("msg", sid, subject, reply, data, headers))

    async def _process_ping(self) -> None:
        self.seen.append(("ping",))

    async def _process_pong(self) -> None:
        self.seen.append(("pong",))

    async def _process_info(self, info: dict[str, Any]) -> None:
        self.seen.append(("info", info))

    async def _process_err(self, err: str) -> None:
        self.seen.append(("err", err))


def msg(subject: str, sid: int, reply: str, payload: bytes, sep: str = " ") -> bytes:
    head = sep.join(["MSG", subject, str(sid), *([reply] if reply else []), str(len(payload))])
    return f"{head}\r\n".encode() + payload + b"\r\n"


def hmsg(subject: str, sid: int, reply: str, headers: bytes, payload: bytes) -> bytes:
    sizes = [str(len(headers)), str(len(headers) + len(payload))]
    head = " ".join(["HMSG", subject, str(sid), *([reply] if reply else []), *sizes])
    return f"{head}\r\n".encode() + headers + payload + b"\r\n"


WIRE = b"".join(
    [
        b'INFO {"server_id":"x","max_payload":1048576}\r\n',
        msg("jetrun.a", 1, "", b"hello"),
        b"+OK\r\n",
        msg("jetrun.b", 22, "_INBOX.up.7", b""),
        hmsg("jetrun.ev.run_1.submitted", 3, "$JS.ACK.S.c.1.5.5.1.0", b"NATS/1.0\r\n\r\n", b"hi"),
        b"PING\r\n",
        hmsg("_INBOX.x.1", 4, "", b"NATS/1.0 100 Idle Heartbeat\r\n\r\n", b""),
        b"PONG\r\n",
        msg("jetrun.c", 9, "", b"abc", sep="  "),  # runs of spaces: nats-py's way
        msg("jetrun.d", 9, "", b"xyz", sep="\t"),  # tabs
        hmsg("jetrun.e", 5, "reply.e", b"NATS/1.0\r\n\r\n", b"ok"),
        msg("jetrun.f", 6, "", b"p" * 12345),
        b"-ERR 'Stale Connection'\r\n",
    ]
)


async def parse_all(parser: Parser, chunks: list[bytes]) -> None:
    for chunk in chunks:
        await parser.parse(chunk)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@pytest.mark.anyio
@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=len(WIRE)), max_size=40))
async def test_the_same_messages_as_nats_py_however_chunked(cuts: list[int]) -> None:
    chunks = chunked(WIRE, cuts)
    slow, fast = Recorder(), Recorder()
    await parse_all(Parser(slow), chunks)
    fast_parser = FastParser(fast)
    await parse_all(fast_parser, chunks)
    assert fast.seen == slow.seen
    assert len(fast.seen) == 12 and fast_parser.state == AWAITING_CONTROL_LINE
    assert not fast_parser.buf


@pytest.mark.anyio
async def test_malformed_lines_raise_as_in_nats_py() -> None:
    for wire in (b"MSG a b 5\r\nhello\r\n", b"MSG a 1 x\r\n", b"FOO bar\r\n"):
        for parser in (Parser(Recorder()), FastParser(Recorder())):
            with pytest.raises(errors.ProtocolError):
                await parser.parse(wire)


@pytest.mark.anyio
async def test_a_dispatcher_takes_its_messages_and_leaves_the_rest() -> None:
    taken: list[tuple[Any, ...]] = []

    def dispatch(sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> bool:
        if sid != 3:
            return False
        taken.append((subject, reply, data, headers))
        return True

    recorder = Recorder()
    parser = FastParser(recorder)
    parser.dispatch = dispatch
    await parser.parse(WIRE)
    assert taken == [
        (
            b"jetrun.ev.run_1.submitted",
            b"$JS.ACK.S.c.1.5.5.1.0",
            b"hi",
            b"NATS/1.0\r\n\r\n",
        )
    ]
    assert len(recorder.seen) == 11 and all(s[1] != 3 for s in recorder.seen if s[0] == "msg")


@pytest.mark.anyio
async def test_install_keeps_the_parser_and_its_state() -> None:
    """Installed on a client whose parser is mid-message: the same object and buffer, now
    parsing the fast way (the nats-py internals this relies on are as named)."""
    nc = Client()
    parser = nc._ps
    assert type(parser) is Parser
    await parser.parse(b"MSG jetrun.a 1 5\r\nhel")
    assert parser.state == AWAITING_MSG_PAYLOAD
    assert parser.msg_arg == {"subject": b"jetrun.a", "sid": 1, "reply": b""}
    seen: list[bytes] = []
    install(nc, lambda sid, subject, reply, data, headers: seen.append(data) is None)
    assert nc._ps is parser and isinstance(parser, FastParser)
    await parser.parse(b"lo\r\n")
    assert seen == [b"hello"] and parser.state == AWAITING_CONTROL_LINE


@pytest.mark.anyio
async def test_a_line_nats_py_leaves_waiting_waits_here_too() -> None:
    """An unknown line over nats-py's control-line limit: nats-py waits for more (it does
    not raise); so does this parser, without looping on it."""
    wire = b"X" * 5000 + b"\r\n"
    for parser in (Parser(Recorder()), FastParser(Recorder())):
        with anyio.fail_after(5):
            await parser.parse(wire)
        assert bytes(parser.buf) == wire


class Resetting(Recorder):
    """A client whose ``_process_err`` resets its parser on a stale connection, as nats-py's
    ``Client._process_err`` does (through ``_process_op_err``, a reconnect beginning)."""

    def __init__(self) -> None:
        super().__init__()
        self.parser: Parser | None = None

    async def _process_err(self, err: str) -> None:
        await super()._process_err(err)
        if "stale connection" in err and self.parser is not None:
            self.parser.reset()


def finishes(main: Callable[[], Coroutine[Any, Any, None]], within: float = 5.0) -> bool:
    """Whether ``main`` (run on an event loop of its own, in a thread) returns in time: a parser
    looping without a suspension would stall the test's own loop, and any deadline on it."""
    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    thread.join(within)
    return not thread.is_alive()


STALE = msg("jetrun.a", 1, "", b"hi") + b"-ERR 'Stale Connection'\r\n"
AFTER_STALE = msg("jetrun.b", 1, "", b"ho") + b"PING\r\n"


@pytest.mark.parametrize("rest", [b"", AFTER_STALE], ids=["last", "more after it"])
def test_a_stale_connection_resets_the_parser_as_in_nats_py(rest: bytes) -> None:
    """``-ERR 'Stale Connection'`` resets the parser (a reconnect begins): what came after it
    on the old connection is dropped, as nats-py drops it, and the parse returns."""
    seen: dict[type[Parser], Resetting] = {}
    for kind in (Parser, FastParser):
        client = seen[kind] = Resetting()
        parser = client.parser = kind(client)
        assert finishes(lambda parser=parser: parser.parse(STALE + rest)), kind.__name__
        assert not parser.buf and parser.state == AWAITING_CONTROL_LINE
    assert seen[FastParser].seen == seen[Parser].seen
    assert [s[0] for s in seen[Parser].seen] == ["msg", "err"]


class Suspending(Recorder):
    """A client whose first message's processing suspends until ``go`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.go = asyncio.Event()
        self.suspended = asyncio.Event()

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        await super()._process_msg(sid, subject, reply, data, headers)
        if len(self.seen) == 1:
            self.suspended.set()
            await self.go.wait()


def test_a_reset_while_a_message_is_processed_drops_the_old_bytes_as_in_nats_py() -> None:
    """Another task resets the parser (a reconnect begins) while a message's processing is
    suspended: the parse stops there, as nats-py's does, whatever the old buffer still held."""
    wire = msg("jetrun.a", 1, "", b"hi") + b"PING\r\n" + AFTER_STALE
    seen: dict[type[Parser], Suspending] = {}

    for kind in (Parser, FastParser):

        async def main(kind: type[Parser] = kind) -> None:
            client = seen[kind] = Suspending()
            parser = kind(client)
            parsing = asyncio.create_task(parser.parse(wire))
            await client.suspended.wait()
            parser.reset()
            client.go.set()
            await parsing
            assert not parser.buf and parser.state == AWAITING_CONTROL_LINE

        assert finishes(main), kind.__name__
    assert seen[FastParser].seen == seen[Parser].seen == [("msg", 1, b"jetrun.a", b"", b"hi", None)]


STALE_CLIENT = """
import asyncio, sys, time
from nats.aio.client import Client
from runtime.infra import natsread, ordered

def eager(nc: Client) -> bool:
    return type(nc._transport._io_reader).__name__ == "EagerReader"

async def main() -> None:
    nc = Client()
    if sys.argv[2] == "eager":
        natsread.install(nc)  # parsed in data_received, as every service's connection is
    await nc.connect(sys.argv[1], ping_interval=100, reconnect_time_wait=0.1)
    ordered.Connection.of(nc)  # the fast parser, as every service has it
    assert type(nc._ps).__name__ == "FastParser"
    await asyncio.sleep(0)  # the read loop starts
    assert eager(nc) == (sys.argv[2] == "eager")
    time.sleep(1.0)  # the loop blocked: the server's pings go unanswered
    while not nc.stats["reconnects"]:
        await asyncio.sleep(0.05)
    await nc.flush(timeout=5)
    assert eager(nc) == (sys.argv[2] == "eager")
    print("reconnected", flush=True)
    await nc.close()

asyncio.run(main())
"""


@pytest.mark.parametrize("reader", ["eager", "nats-py"])
def test_a_client_the_server_finds_stale_reconnects(tmp_path: Path, reader: str) -> None:
    """A real nats-server pinging every 200 ms closes a connection whose loop was blocked
    (``-ERR 'Stale Connection'``, which resets the parser as a reconnect begins): the client,
    parsing the fast way (in ``data_received`` too: ``natsread``), reconnects and is answered
    again. The client is a process of its own:
    a parse that looped on the old buffer would hang its event loop, and any deadline in it."""
    port = free_port()
    config = tmp_path / "nats.conf"
    config.write_text(f'listen: 127.0.0.1:{port}\nping_interval: "200ms"\nping_max: 1\n')
    server = subprocess.Popen(
        [find_binary(), "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while not _accepts(port):
            assert time.monotonic() < deadline and server.poll() is None, "no nats-server"
            time.sleep(0.05)
        done = subprocess.run(
            [sys.executable, "-c", STALE_CLIENT, f"nats://127.0.0.1:{port}", reader],
            cwd=Path(__file__).resolve().parent.parent,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert done.returncode == 0 and "reconnected" in done.stdout, done.stderr[-2000:]


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False
