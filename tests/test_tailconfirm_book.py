"""The bookkeeping of appends confirmed by the tail (runtime.infra.tailconfirm), without NATS:
what a delivery confirms, what it rules out, and that every append is answered by a deadline.
Sending is replaced by a no-op; NATS behaviour is in tests/test_tailconfirm.py."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from runtime.infra import pubframe
from runtime.infra.tailconfirm import NotSeen, TailConfirm, Tailed

pytestmark = pytest.mark.anyio


class Conn:
    """Stands for a connection: only its identity (and a weak reference) is used."""


@pytest.fixture(autouse=True)
def no_sending(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    sent: list[bytes] = []

    async def send(nc: Any, command: bytes, size: int) -> None:
        sent.append(command)

    monkeypatch.setattr(pubframe, "send", send)
    return sent


async def started(within_s: float = 30.0) -> TailConfirm:
    confirm = TailConfirm(within_s)
    confirm.start()
    return confirm


async def send(confirm: TailConfirm, conn: Conn, subject: str, data: bytes) -> Tailed:
    tailed = await confirm.send(conn, subject, data, {"Nats-Msg-Id": subject})  # type: ignore[arg-type]
    assert tailed is not None
    return tailed


async def answer(tailed: Tailed) -> int | type[NotSeen] | None:
    """The seq, NotSeen, or None while unanswered (without waiting for it)."""
    if not tailed.answered():
        return None
    try:
        return (await tailed.ack()).seq
    except NotSeen:
        return NotSeen


async def test_the_frame_has_no_reply_subject(no_sending: list[bytes]) -> None:
    confirm = await started()
    await send(confirm, Conn(), "jetrun.ev.r1.queued", b"{}")
    assert no_sending[0].startswith(b"HPUB jetrun.ev.r1.queued  ")  # subject, no reply, sizes


async def test_a_later_delivery_rules_out_the_earlier_appends_of_its_connection() -> None:
    confirm = await started()
    a, b = Conn(), Conn()
    first = await send(confirm, a, "s.1", b"one")
    second = await send(confirm, a, "s.2", b"two")
    other = await send(confirm, b, "s.3", b"three")  # another connection: no order with a's
    third = await send(confirm, a, "s.4", b"four")
    confirm.seen(7, b"s.2", b"two")
    assert await answer(first) is NotSeen  # sent before s.2, not delivered before it
    assert await answer(second) == 7
    assert await answer(third) is None  # sent after: may still come
    confirm.seen(8, b"s.4", b"four")
    assert await answer(third) == 8
    assert await answer(other) is None
    confirm.seen(9, b"s.3", b"three")
    assert await answer(other) == 9
    assert confirm.waiting() == 0


async def test_another_payload_on_the_subject_confirms_nothing() -> None:
    confirm = await started()
    mine = await send(confirm, Conn(), "jetrun.ev.r1.dispatched.a1", b"mine")
    confirm.seen(3, b"jetrun.ev.r1.dispatched.a1", b"another scheduler's")
    assert await answer(mine) is None
    confirm.seen(4, b"jetrun.ev.r1.dispatched.a1", b"mine")
    assert await answer(mine) == 4


async def test_a_second_append_on_a_waiting_subject_goes_the_acked_way() -> None:
    confirm = await started()
    conn = Conn()
    first = await send(confirm, conn, "s.1", b"x")
    assert await confirm.send(conn, "s.1", b"x", {}) is None  # type: ignore[arg-type]
    confirm.seen(5, b"s.1", b"x")
    assert await answer(first) == 5
    assert await confirm.send(conn, "s.1", b"x", {}) is not None  # type: ignore[arg-type]


async def test_every_append_is_answered_by_its_deadline() -> None:
    confirm = await started(within_s=0.1)
    conn = Conn()
    early = await send(confirm, conn, "s.1", b"1")
    await anyio.sleep(0.06)
    late = await send(confirm, conn, "s.2", b"2")
    with anyio.fail_after(5):
        with pytest.raises(NotSeen):
            await early.ack()
        assert await answer(late) is None  # its own deadline is later
        with pytest.raises(NotSeen):
            await late.ack()
    assert confirm.waiting() == 0


async def test_a_stopped_tail_answers_what_waits_and_takes_nothing_more() -> None:
    confirm = await started()
    conn = Conn()
    waiting = await send(confirm, conn, "s.1", b"1")
    confirm.stop()
    assert await answer(waiting) is NotSeen
    assert await confirm.send(conn, "s.2", b"2", {}) is None  # type: ignore[arg-type]
    assert await TailConfirm().send(conn, "s.2", b"2", {}) is None  # type: ignore[arg-type]


async def test_a_cancelled_wait_frees_its_subject_and_still_marks_the_order() -> None:
    confirm = await started()
    conn = Conn()
    gone = await send(confirm, conn, "s.1", b"1")
    after = await send(confirm, conn, "s.2", b"2")
    gone.cancel()
    assert confirm.waiting() == 1
    again = await send(confirm, conn, "s.1", b"1")  # the subject is free again
    confirm.seen(4, b"s.2", b"2")  # passes the cancelled one quietly
    assert await answer(after) == 4
    assert await answer(again) is None
    confirm.seen(5, b"s.1", b"1")
    assert await answer(again) == 5


async def test_a_send_that_fails_leaves_nothing_waiting(monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(nc: Any, command: bytes, size: int) -> None:
        raise ConnectionError("closed")

    monkeypatch.setattr(pubframe, "send", broken)
    confirm = await started()
    with pytest.raises(ConnectionError):
        await confirm.send(Conn(), "s.1", b"1", {})  # type: ignore[arg-type]
    assert confirm.waiting() == 0
