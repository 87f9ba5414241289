"""A NATS connection's messages parsed where its bytes arrive, not one loop step later.

nats-py's reader is a task (``Client._read_loop``): it awaits ``StreamReader.read``, then
parses. Bytes arrive in the protocol's ``data_received`` (``StreamReader.feed_data``), which
only wakes that task: the messages are parsed and handled once the loop comes round to it,
behind every other callback that is ready. A sync run crosses three such hand-offs (the agent
receiving ``dispatched``, ``jetrun up`` receiving the ack of ``submitted`` and the run's end).

``install`` makes the client's reader hand what it is fed to the parser at once
(``natsparse.FastParser.parse_now``), in ``data_received``, as long as it meets messages the
connection's raw receivers take (``runtime.infra.ordered``: the tails, the publishers'
acks). Whatever else comes (``INFO``, ``PING``, ``PONG``, ``+OK``, ``-ERR``, a message of
another subscription: anything whose handling nats-py awaits) goes nats-py's way from there
on: into the reader's buffer, for the read loop, which parses it from the parser's state as
it stands. The same bytes are parsed once, in order, whichever way they go: the fast way is
taken only while the read loop is not parsing and the reader's buffer is empty (nothing fed
earlier is still waiting for the loop), and only while the client is connected or draining
(nats-py's read loop stops reading on close and on a reconnect).

Reconnects, TLS (``connect_tls`` makes a new reader) and everything else are nats-py's:
each time nats-py starts a read loop (after every connect and reconnect) the reader the
transport then has is the one made to parse at once. A websocket transport is left as it is.

nats-py internals relied on (pinned in constraints.txt; tests/test_natsread.py checks them):
``Client._read_loop`` (looked up on the instance when nats-py starts it), ``Client._transport``,
``TcpTransport._io_reader`` (an ``asyncio.StreamReader``, fed by its protocol's
``data_received``), ``Client._status`` and its values, ``Client._ps``; from asyncio,
``StreamReader._buffer``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from nats.aio.client import Client
from nats.aio.transport import TcpTransport

from runtime.infra.natsparse import FastParser

_READING = frozenset({Client.CONNECTED, Client.DRAINING_SUBS, Client.DRAINING_PUBS})


class EagerReader(asyncio.StreamReader):
    """A client's ``StreamReader`` whose ``feed_data`` parses what it can at once."""

    nc: Client
    broken = False  # a parse here raised: the connection is left (a reconnect is begun)

    def feed_data(self, data: bytes) -> None:  # type: ignore[override]
        if self.broken:
            return  # the connection is being left: what it still brings is dropped
        nc = self.nc
        parser = nc._ps
        if (
            not self._buffer  # type: ignore[attr-defined]
            and type(parser) is FastParser
            and not parser.parsing
            and nc._status in _READING
            and getattr(nc._transport, "_io_reader", None) is self
        ):
            try:
                data = parser.parse_now(data)
            except Exception as err:  # a receiver raised: where the parse stood is unknown
                self._give_up(err)
                return
            if not data:
                return
        super().feed_data(data)

    def _give_up(self, err: Exception) -> None:
        """Leave the connection as nats-py leaves one whose protocol it cannot read
        (``_process_op_err``: a reconnect, whose parser starts afresh), and report ``err``.
        What this reader is fed from now on is dropped, and never reaches the read loop."""
        self.broken = True
        nc = self.nc
        task = asyncio.get_running_loop().create_task(_report(nc, err))
        _reporting.add(task)
        task.add_done_callback(_reporting.discard)


_reporting: set[asyncio.Task[None]] = set()


async def _report(nc: Client, err: Exception) -> None:
    try:
        await nc._process_op_err(err)
    finally:
        await nc._error_cb(err)


def install(nc: Client) -> None:
    """From ``nc``'s next read loop on (call it before ``connect``), its reader parses at once."""
    loop: Callable[[], Coroutine[Any, Any, None]] = nc._read_loop

    async def read_loop() -> None:
        transport = nc._transport
        if isinstance(transport, TcpTransport):
            reader = transport._io_reader
            if type(reader) is asyncio.StreamReader:
                reader.__class__ = EagerReader
                reader.nc = nc  # type: ignore[attr-defined]
        await loop()

    nc._read_loop = read_loop  # type: ignore[method-assign]
