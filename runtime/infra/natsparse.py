"""nats-py's protocol parser with a shorter way through the messages a service receives.

nats-py's ``Parser.parse`` tries its regular expressions in turn on each control line: for
a JetStream delivery (an ``HMSG``: events carry headers) first ``MSG_RE``, which fails, then
``HMSG_RE``; then it copies the payload twice (a ``bytearray`` slice, then ``bytes``) and
creates and awaits a coroutine (``Client._process_msg``) per message. Every process here
receives several messages per run (its tail's events, its publishes' acks), so ``Parser``
becomes ``FastParser`` (``install``): a message's line of the form the server writes (single
spaces, decimal numbers) is split instead, the payload is copied once, and a message the
connection's raw receivers take (``runtime.infra.ordered``: the tails and the publishers'
acks) is handed to them with a plain call (``dispatch``). Every other line (``PING``,
``PONG``, ``INFO``, ``+OK``, ``-ERR``) goes through nats-py's parser, one line at a time,
and every message nobody takes raw through ``Client._process_msg``: same results, same
errors. ``parse_now`` is the same without a coroutine, for the messages ``dispatch`` takes
(``runtime.infra.natsread`` calls it in the protocol's ``data_received``): it stops before
anything else and leaves it, and the parser's state, to ``parse``.

nats-py internals relied on (pinned in constraints.txt; tests/test_natsparse.py checks them):
``Client._ps`` (made once per client, reset in place on reconnects: ``reset`` gives it a new
``buf``, and a ``parse`` under way stops at its next line or message), ``Parser.buf``,
``state``, ``needed``, ``header_needed``, ``msg_arg``, the states ``AWAITING_CONTROL_LINE``
and ``AWAITING_MSG_PAYLOAD``, and ``Client._process_msg(sid, subject, reply, payload,
headers)``.
"""

from __future__ import annotations

from collections.abc import Callable

from nats.aio.client import Client
from nats.protocol.parser import (
    AWAITING_CONTROL_LINE,
    AWAITING_MSG_PAYLOAD,
    MAX_CONTROL_LINE_SIZE,
    Parser,
)

# (sid, subject, reply, payload, raw headers or b"") -> whether it was taken
Dispatch = Callable[[int, bytes, bytes, bytes, bytes], bool]

_CRLF = b"\r\n"


class FastParser(Parser):
    """``Parser`` with the fast way for messages; ``dispatch`` (or None) is asked first."""

    dispatch: Dispatch | None = None
    takes: Callable[[int], bool] | None = None  # whether dispatch takes a subscription's messages
    parsing = False  # ``parse`` is under way (it may be suspended)

    async def parse(self, data: bytes = b"") -> None:
        self.parsing = True
        try:
            await self._parse(data)
        finally:
            self.parsing = False

    def parse_now(self, data: bytes) -> bytes:
        """What ``parse`` does with ``data``, here and now (no coroutine, for the reader's
        ``data_received``: ``runtime.infra.natsread``) as long as it meets messages ``dispatch``
        takes; it stops before anything else (a line other than a message's, a message of a
        subscription ``dispatch`` does not take) and returns the bytes from there on, for
        ``parse``, which goes on from the state this leaves. Only while ``parse`` is not under
        way."""
        buf = self.buf
        buf.extend(data)
        dispatch = self.dispatch
        while buf:
            if self.state == AWAITING_MSG_PAYLOAD:
                needed = self.needed
                if len(buf) < needed + 2:
                    return b""  # the rest of the payload is still to come
                split = self.header_needed
                with memoryview(buf) as view:
                    headers = view[:split].tobytes() if split > 0 else b""
                    payload = view[split:needed].tobytes()
                arg = self.msg_arg
                if dispatch is None or not dispatch(
                    arg["sid"], arg["subject"], arg["reply"], payload, headers
                ):
                    break  # not taken: ``parse`` takes it from here, as it is
                if self.buf is not buf:  # reset meanwhile: the old buffer's bytes are dropped
                    return b""
                del buf[: needed + 2]
                self.header_needed = 0
                self.state = AWAITING_CONTROL_LINE
                continue
            end = buf.find(_CRLF)
            if end < 0:
                if len(buf) < MAX_CONTROL_LINE_SIZE:
                    return b""  # the line is still to come
                break  # a line too long: ``parse`` raises
            line = bytes(buf[:end])
            found = _msg_line(line)
            takes = self.takes
            if found is None or takes is None or not takes(found[1]):
                break
            self._start_msg(found)
            del buf[: end + 2]
        rest = bytes(buf)
        buf.clear()
        return rest

    def _start_msg(self, found: tuple[bytes, int, bytes, int, int]) -> None:
        arg = self.msg_arg
        arg["subject"], arg["sid"], arg["reply"], self.needed, header_needed = found
        if header_needed >= 0:
            self.header_needed = header_needed
        self.state = AWAITING_MSG_PAYLOAD

    async def _parse(self, data: bytes) -> None:
        buf = self.buf
        buf.extend(data)
        while buf:
            if self.state == AWAITING_MSG_PAYLOAD:
                needed = self.needed
                if len(buf) < needed + 2:
                    return  # the rest of the payload is still to come
                split = self.header_needed
                with memoryview(buf) as view:  # one copy each, not a slice and then bytes
                    headers = view[:split].tobytes() if split > 0 else None
                    payload = view[split:needed].tobytes()
                del buf[: needed + 2]
                self.header_needed = 0
                self.state = AWAITING_CONTROL_LINE
                arg = self.msg_arg
                sid, subject, reply = arg["sid"], arg["subject"], arg["reply"]
                dispatch = self.dispatch
                if dispatch is None or not dispatch(sid, subject, reply, payload, headers or b""):
                    await self.nc._process_msg(sid, subject, reply, payload, headers)
                    if self.buf is not buf:  # reset meanwhile (a reconnect began): stop here
                        return
                continue
            # a message's line of the form the server writes (single spaces, decimal numbers)
            # is split; nats-py matches regular expressions (MSG_RE first, which an HMSG, a
            # JetStream delivery, fails): three times the instructions
            end = buf.find(_CRLF)
            if end < 0:
                return  # the line is still to come (nats-py waits for it too)
            found = _msg_line(bytes(buf[:end]))
            if found is not None:
                self._start_msg(found)
                del buf[: end + 2]
            elif not await self._slowly(end + 2):  # any other line: nats-py's way, alone
                return  # a line nats-py leaves waiting (as it does, until more comes)

    async def _slowly(self, size: int) -> bool:
        """nats-py's ``parse`` of the first ``size`` bytes (one line) alone; whether it read
        anything and the parser was not reset meanwhile. A reset (``Client._process_op_err``
        on ``-ERR 'Stale Connection'``, a reconnect begun by another task) gives the parser a
        new buffer: what the old one still holds came on the connection being left, and is
        dropped, as nats-py's ``parse`` (which reads ``self.buf`` anew) drops it."""
        buf = self.buf
        rest = buf[size:]
        del buf[size:]
        try:
            await Parser.parse(self)
        finally:
            left = len(buf)
            buf.extend(rest)
        return self.buf is buf and (left < size or self.state != AWAITING_CONTROL_LINE)


def _msg_line(line: bytes) -> tuple[bytes, int, bytes, int, int] | None:
    """``(subject, sid, reply, size, header size or -1)`` of a message's line of the form the
    server writes (single spaces, decimal numbers); None for any other line (nats-py's way)."""
    tokens = line.split(b" ")
    count = len(tokens)
    first = tokens[0]
    if first == b"HMSG":
        plain = 5  # HMSG subject sid [reply] header-size total-size
    elif first == b"MSG":
        plain = 4  # MSG subject sid [reply] size
    else:
        return None
    sid = tokens[2] if count > 2 else b""
    if (
        (count == plain or count == plain + 1)
        and len(line.split()) == count  # no other whitespace, no runs of it
        and sid.isdigit()
        and tokens[-1].isdigit()
        and (plain == 4 or tokens[-2].isdigit())
    ):
        reply = tokens[3] if count > plain else b""
        return tokens[1], int(sid), reply, int(tokens[-1]), int(tokens[-2]) if plain == 5 else -1
    return None


def install(
    nc: Client, dispatch: Dispatch | None, takes: Callable[[int], bool] | None = None
) -> None:
    """Make ``nc``'s parser a ``FastParser`` (in place: the object, its buffer and its state
    stay, so a parse in progress goes on) that asks ``dispatch`` first; ``takes(sid)``: whether
    ``dispatch`` takes that subscription's messages (``parse_now`` parses only those)."""
    parser = nc._ps
    if type(parser) is Parser:
        parser.__class__ = FastParser
    if isinstance(parser, FastParser):
        parser.dispatch = dispatch
        parser.takes = takes
