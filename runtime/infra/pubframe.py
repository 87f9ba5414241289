"""Publishing a message as one prepared protocol frame, at less CPU than ``Client.publish``.

``frame(subject, reply, headers, payload)`` builds the ``PUB``/``HPUB`` bytes nats-py's
``Client.publish`` would build, with the same checks (a subject with a space, tab or line
break is refused, ``BadSubjectError``; a header name outside the token characters,
``BadHeaderError``; line breaks in a header value become spaces; empty names are skipped);
``send(nc, frame, payload_size)`` hands it to the connection with the checks and bookkeeping
``publish`` makes before sending (closed: ``ConnectionClosedError``; draining:
``ConnectionDrainingError``; disconnected with the reconnect buffer full or off:
``OutboundBufferLimitError``; a payload over the server's limit: ``MaxPayloadError``;
``stats``) and the same path out: the connection's pending buffer, flushed by its flusher
task (kept while disconnected and sent after a reconnect), except that a frame on an idle
connection is written to the socket at once (``_write_now``: one loop iteration sooner; a
burst's later frames still share the flusher's write). What it saves, per publish: the
header block built a piece at a time (a regex match, a strip, a translate and two encodes per
header), the command's f-string plus three concatenations, the subject checks of a subject
already checked, the connection state read through four properties.

nats-py internals relied on (it is pinned in constraints.txt; tests/test_pubframe.py fails
if they change): ``Client._status`` and ``Client.CONNECTED``, ``Client._max_payload``,
``Client._max_pending_size``, ``Client._pending_data_size``, ``Client._flush_queue``,
``Client.stats``, ``Client._send_command(bytes)`` (appends to the pending buffer, flushes when
it is over its limit) and ``Client._flush_pending()`` (wakes the flusher), ``Client._pending``
(the frames the flusher has yet to write) and ``Client._transport._io_writer`` (the asyncio
``StreamWriter`` of nats-py's TCP transport, which the flusher writes to).
"""

from __future__ import annotations

import asyncio
import re
import weakref

from nats import errors
from nats.aio.client import Client

_SUBJECT_INVALID = re.compile(r"[ \t\r\n]")  # nats-py's publish check
_HEADER_KEY = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # nats-py's header name check
_NEWLINES = str.maketrans({"\r": " ", "\n": " "})
_checked_keys: set[str] = set()  # header names already found valid


def check_subject(subject: str) -> None:
    if not subject or _SUBJECT_INVALID.search(subject):
        raise errors.BadSubjectError


def header_block(headers: dict[str, str]) -> bytes:
    """``NATS/1.0`` and one ``name: value`` line per header, as nats-py writes them."""
    lines = ["NATS/1.0\r\n"]
    for key, value in headers.items():
        if key not in _checked_keys:
            name = key.strip()
            if not name:
                continue
            if not _HEADER_KEY.fullmatch(name):
                raise errors.BadHeaderError(name)
            if name == key and len(_checked_keys) < 64:
                _checked_keys.add(key)
            key = name
        value = value.strip()
        if "\r" in value or "\n" in value:
            value = value.translate(_NEWLINES)
        lines.append(f"{key}: {value}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode()


def frame(subject: str, reply: str, headers: dict[str, str] | None, payload: bytes) -> bytes:
    """The ``PUB`` (no headers) or ``HPUB`` command that publishes ``payload`` to ``subject``
    with ``reply`` (may be empty) and ``headers``."""
    check_subject(subject)
    if reply and _SUBJECT_INVALID.search(reply):
        raise errors.BadSubjectError
    if headers is None:
        return b"PUB %s %s %d\r\n%s\r\n" % (subject.encode(), reply.encode(), len(payload), payload)
    block = header_block(headers)
    size = len(block)
    return b"HPUB %s %s %d %d\r\n%s%s\r\n" % (
        subject.encode(),
        reply.encode(),
        size,
        size + len(payload),
        block,
        payload,
    )


async def send(nc: Client, command: bytes, payload_size: int) -> None:
    """Send a ``frame`` whose payload is ``payload_size`` bytes, as ``Client.publish`` sends
    (the same checks, errors, buffering and flushing), except that the first frame of a loop
    iteration on an idle connection is written at once (``_write_now``)."""
    if nc._status != Client.CONNECTED:
        _check_state(nc, payload_size)
    if payload_size > nc._max_payload:
        raise errors.MaxPayloadError
    stats = nc.stats
    stats["out_msgs"] += 1
    stats["out_bytes"] += payload_size
    if _write_now(nc, command):
        return
    await nc._send_command(command)
    queue = nc._flush_queue
    if queue is not None and queue.empty():
        await nc._flush_pending()


class _Turn:
    """Whether a connection wrote a frame at once in the current loop iteration; the
    connection's loop is kept (on Python 3.11 ``asyncio.get_running_loop()`` is a ``getpid``
    system call)."""

    __slots__ = ("loop", "taken")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.taken = loop, False

    def end(self) -> None:
        self.taken = False


_turns: weakref.WeakKeyDictionary[Client, _Turn] = weakref.WeakKeyDictionary()


def _write_now(nc: Client, command: bytes) -> bool:
    """Write ``command`` to the socket now if the connection is idle: connected, nothing in
    its pending buffer (so nothing sent before it is still waiting: the order holds), nothing
    left unsent in the socket's buffer, and no frame written this way yet in this loop
    iteration. Else False: the caller queues it for the flusher task, which writes in the
    next iteration whatever was queued until then, in one write.

    The flusher's way costs every publish a loop iteration before it leaves (13-26 us on a
    2-core machine, three times on a sync run's path: ``submitted``, ``dispatched``, the
    end); a lone publish (a sync run's) now leaves at once. A burst still shares the
    flusher's writes: only its first frame is written alone."""
    if nc._status != Client.CONNECTED or nc._pending:
        return False
    writer = getattr(nc._transport, "_io_writer", None)  # a TCP (or TLS) connection's
    if writer is None or writer.transport.get_write_buffer_size():
        return False
    turn = _turns.get(nc)
    if turn is None:
        turn = _turns[nc] = _Turn(asyncio.get_running_loop())
    elif turn.taken:
        return False
    turn.taken = True
    turn.loop.call_soon(turn.end)
    writer.write(command)
    return True


def _check_state(nc: Client, payload_size: int) -> None:
    """``Client.publish``'s checks of a connection that is not plainly connected."""
    if nc.is_closed:
        raise errors.ConnectionClosedError
    if nc.is_draining_pubs:
        raise errors.ConnectionDrainingError
    if not nc.is_connected and (
        nc._max_pending_size <= 0 or payload_size + nc._pending_data_size > nc._max_pending_size
    ):
        raise errors.OutboundBufferLimitError
