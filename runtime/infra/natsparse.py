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
errors.

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
from nats.protocol.parser import AWAITING_CONTROL_LINE, AWAITING_MSG_PAYLOAD, Parser

# (sid, subject, reply, payload, raw headers or b"") -> whether it was taken
Dispatch = Callable[[int, bytes, bytes, bytes, bytes], bool]

_CRLF = b"\r\n"


class FastParser(Parser):
    """``Parser`` with the fast way for messages; ``dispatch`` (or None) is asked first."""

    dispatch: Dispatch | None = None

    async def parse(self, data: bytes = b"") -> None:
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
            line = bytes(buf[:end])
            tokens = line.split(b" ")
            count = len(tokens)
            first = tokens[0]
            if first == b"HMSG":
                plain = 5  # HMSG subject sid [reply] header-size total-size
            elif first == b"MSG":
                plain = 4  # MSG subject sid [reply] size
            else:
                plain = 0
            sid = tokens[2] if count > 2 else b""
            if (
                (count == plain or count == plain + 1)
                and len(line.split()) == count  # no other whitespace, no runs of it
                and sid.isdigit()
                and tokens[-1].isdigit()
                and (plain == 4 or tokens[-2].isdigit())
            ):
                arg = self.msg_arg
                arg["subject"] = tokens[1]
                arg["sid"] = int(sid)
                arg["reply"] = tokens[3] if count > plain else b""
                self.needed = int(tokens[-1])
                if plain == 5:
                    self.header_needed = int(tokens[-2])
                self.state = AWAITING_MSG_PAYLOAD
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


def install(nc: Client, dispatch: Dispatch | None) -> None:
    """Make ``nc``'s parser a ``FastParser`` (in place: the object, its buffer and its state
    stay, so a parse in progress goes on) that asks ``dispatch`` first."""
    parser = nc._ps
    if type(parser) is Parser:
        parser.__class__ = FastParser
    if isinstance(parser, FastParser):
        parser.dispatch = dispatch
