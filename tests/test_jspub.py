"""Acknowledged publishes (runtime.infra.jspub) answer as nats-py's JetStream publish does,
against a real nats-server."""

from __future__ import annotations

import anyio
import pytest
from nats.aio.client import Client
from nats.js import api
from nats.js.errors import APIError, NoStreamResponseError

from runtime.infra import jspub

pytestmark = pytest.mark.anyio

STREAM = api.StreamConfig(name="JSPUB_T", subjects=["jspub.t.>"], duplicate_window=60.0)


async def publisher_beside_a_silent_listener(nc: Client) -> jspub.Publisher:
    """The connection's publisher, the test stream on ``jspub.t.>``, and a subscriber on
    ``jspub.silent`` that never answers (publishes there wait for an ack that never comes)."""
    await nc.jetstream(timeout=5.0).add_stream(STREAM)
    await nc.subscribe("jspub.silent")
    return jspub.publisher(nc)


async def test_acks_match_nats_py_and_duplicates_are_flagged(nc: Client) -> None:
    js = nc.jetstream(timeout=5.0)
    await js.add_stream(STREAM)
    pub = jspub.publisher(nc)
    assert jspub.publisher(nc) is pub  # one per connection
    ours = await pub.publish("jspub.t.a", b"1", {"Nats-Msg-Id": "m1"}, 5.0)
    theirs = await js.publish("jspub.t.a", b"2", headers={"Nats-Msg-Id": "m2"})
    again = await pub.publish("jspub.t.a", b"1", {"Nats-Msg-Id": "m1"}, 5.0)
    assert (ours.stream, ours.seq, bool(ours.duplicate)) == ("JSPUB_T", 1, False)
    assert theirs.seq == 2
    assert (again.seq, again.duplicate) == (1, True)
    stored = await js.get_msg("JSPUB_T", 1)
    assert stored.data == b"1"


async def test_many_in_flight_each_get_their_own_ack(nc: Client) -> None:
    js = nc.jetstream(timeout=5.0)
    await js.add_stream(STREAM)
    pub = jspub.publisher(nc)
    seqs: list[int] = []

    async def one(i: int) -> None:
        seqs.append((await pub.publish(f"jspub.t.{i}", str(i).encode(), None, 5.0)).seq)

    async with anyio.create_task_group() as tg:
        for i in range(300):
            tg.start_soon(one, i)
    assert sorted(seqs) == list(range(1, 301))
    for seq in (1, 150, 300):
        msg = await js.get_msg("JSPUB_T", seq)
        assert msg.subject == f"jspub.t.{msg.data.decode()}"


async def test_a_refusal_raises_the_servers_error(nc: Client) -> None:
    js = nc.jetstream(timeout=5.0)
    await js.add_stream(STREAM)
    pub = jspub.publisher(nc)
    await pub.publish("jspub.t.x", b"1", None, 5.0)
    wrong = {"Nats-Expected-Last-Subject-Sequence": "7"}
    with pytest.raises(APIError) as refused:
        await pub.publish("jspub.t.x", b"2", wrong, 5.0)
    assert refused.value.err_code == 10071  # wrong last sequence
    assert (await js.stream_info("JSPUB_T")).state.messages == 1


async def test_no_stream_and_no_answer(nc: Client) -> None:
    pub = jspub.publisher(nc)
    with pytest.raises(NoStreamResponseError):
        await pub.publish("jspub.nowhere", b"1", None, 5.0)
    await nc.subscribe("jspub.silent")  # someone listens, nobody answers
    with anyio.fail_after(5):
        with pytest.raises(TimeoutError):  # nats.errors.TimeoutError is one
            await pub.publish("jspub.silent", b"1", None, 0.2)
    assert not pub._waiting  # nothing left behind


async def test_acks_reach_their_publishes_without_a_task_of_their_own(nc: Client) -> None:
    js = nc.jetstream(timeout=5.0)
    await js.add_stream(STREAM)
    pub = jspub.publisher(nc)
    first = await pub.send("jspub.t.a", b"1", None, 5.0)
    second = await pub.send("jspub.t.b", b"2", None, 5.0)
    replies = [sub for sub in nc._subs.values() if sub.subject.startswith(pub._prefix)]
    assert len(replies) == 1 and replies[0]._wait_for_msgs_task is None
    with anyio.fail_after(5):
        assert ((await second.ack()).seq, (await first.ack()).seq) == (2, 1)
    assert not pub._waiting


async def test_each_publish_times_out_at_its_own_deadline(nc: Client) -> None:
    pub = await publisher_beside_a_silent_listener(nc)
    with anyio.fail_after(5):
        late = await pub.send("jspub.silent", b"1", None, 1.5)
        early = await pub.send("jspub.silent", b"2", None, 0.1)  # due before the first
        answered = await pub.send("jspub.t.a", b"3", None, 0.3)
        start = anyio.current_time()
        with pytest.raises(TimeoutError):
            await early.ack()
        assert anyio.current_time() - start < 1.0
        assert (await answered.ack()).seq == 1
        with pytest.raises(TimeoutError):
            await late.ack()
        assert anyio.current_time() - start >= 1.3
    assert not pub._waiting


async def test_publishes_sent_together_time_out_together_on_one_timer(nc: Client) -> None:
    """``Expiry``: the acks of publishes sent with it that are not answered fail with a
    TimeoutError once its time has passed, the answered ones keep their acks, and after
    ``cancel()`` nothing fails later."""
    pub = await publisher_beside_a_silent_listener(nc)
    with anyio.fail_after(5):
        expiry = jspub.Expiry(0.3)
        silent = [await pub.send("jspub.silent", b"1", None, 0.3, expiry) for _ in range(2)]
        answered = await pub.send("jspub.t.a", b"2", None, 0.3, expiry)
        start = anyio.current_time()
        assert (await answered.ack()).seq == 1
        for pending in silent:
            with pytest.raises(TimeoutError):
                await pending.ack()
        assert 0.1 <= anyio.current_time() - start < 2.0
        expiry.cancel()
        kept = jspub.Expiry(0.1)
        done = await pub.send("jspub.t.b", b"3", None, 0.1, kept)
        assert (await done.ack()).seq == 2
        kept.cancel()
        late = await pub.send("jspub.silent", b"4", None, 0.1, kept)  # its timer is gone
        with pytest.raises(TimeoutError):  # ... so it has one of its own
            await late.ack()
    assert not pub._waiting


async def test_a_publish_sent_after_its_expiry_fired_still_times_out(nc: Client) -> None:
    """A send that waited past the expiry's time (a connection stalled under its writes) joins
    an expiry whose timer has already fired: its ack still fails at its own deadline instead
    of being awaited for ever."""
    pub = await publisher_beside_a_silent_listener(nc)
    with anyio.fail_after(5):
        expiry = jspub.Expiry(0.1)
        first = await pub.send("jspub.silent", b"1", None, 0.1, expiry)
        await anyio.sleep(0.3)  # the expiry's timer fires
        with pytest.raises(TimeoutError):
            await first.ack()
        late = await pub.send("jspub.silent", b"2", None, 0.2, expiry)
        start = anyio.current_time()
        with pytest.raises(TimeoutError):
            await late.ack()
        assert anyio.current_time() - start >= 0.1
        expiry.cancel()
    assert not pub._waiting
