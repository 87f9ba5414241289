"""A log feed shared by the readers of one process, against a real nats-server."""

from __future__ import annotations

import anyio
import msgspec
import pytest
from nats.aio.client import Client

from contracts import RunSubmitted
from contracts.events import AnyEvent
from runtime.control.logfeed import LogFeed
from runtime.control.views import RunViews
from runtime.infra.eventlog import EventLog, event_subject
from runtime.infra.projection import RunIndex
from runtime.infra.streams import EVENTS_STREAM

pytestmark = pytest.mark.anyio


def submitted(run_id: str) -> RunSubmitted:
    return RunSubmitted(run_id=run_id, at=1.0, team="t", pipeline="a/b:v1", inputs=[])


class Reader:
    def __init__(self, feed: LogFeed) -> None:
        self.index = RunIndex()
        self.seen: list[int] = []
        feed.join(self.index, self.on_event, self.on_skipped)

    def on_event(self, seq: int, event: AnyEvent) -> None:
        self.seen.append(seq)
        self.index.apply(seq, event)

    def on_skipped(self, seq: int) -> None:
        self.index.skip(seq)


async def test_every_reader_gets_every_event_in_order_from_one_consumer(nc: Client) -> None:
    log = EventLog(nc)
    views = RunViews(log.js)
    await views.require()
    await log.append(submitted("r0"))  # before the feed: read on start (no checkpoint yet)
    feed = LogFeed(log, views)
    readers = [Reader(feed), Reader(feed)]
    first = await feed.start()
    assert await feed.start() == first  # the second reader gets the same position
    assert (first.start, first.target) == (1, 1)
    with pytest.raises(RuntimeError):
        Reader(feed)  # too late: its index would miss what was already fed
    for i in range(1, 20):
        await log.append(submitted(f"r{i}"))
    with anyio.fail_after(10):
        for reader in readers:
            await reader.index.wait_for_seq(20, timeout=10)
    for reader in readers:
        assert reader.seen == list(range(1, 21))
        assert len(reader.index.records) == 20
    info = await log.js.stream_info(EVENTS_STREAM)
    assert info.state.consumer_count == 1
    await feed.leave()
    assert feed._sub is not None  # one reader is still reading
    await feed.leave()
    assert feed._sub is None


async def test_an_index_two_readers_share_is_fed_once(nc: Client) -> None:
    """``jetrun up``: the gateway and the scheduler hold one index; each event is applied once,
    through the callbacks of the reader that joined first."""
    log = EventLog(nc)
    views = RunViews(log.js)
    await views.require()
    feed = LogFeed(log, views)
    first = Reader(feed)
    second_seen: list[int] = []

    def second(seq: int, event: AnyEvent) -> None:
        second_seen.append(seq)

    def skipped(seq: int) -> None:
        second_seen.append(seq)

    feed.join(first.index, second, skipped)  # the same index: not fed a second time
    position = await feed.start()  # positions the shared index once
    last = position.target
    for i in range(5):
        await log.append(submitted(f"s{i}"))
    with anyio.fail_after(10):
        await first.index.wait_for_seq(last + 5, timeout=10)
    assert first.seen == list(range(position.start, last + 6))
    assert second_seen == []
    assert len(first.index.records) == last + 5 - position.start + 1
    await feed.leave()


async def test_a_message_that_does_not_decode_moves_every_reader_past_it(nc: Client) -> None:
    """An event kind from a newer release: each reader's ``on_skipped`` gets its sequence, so
    a wait for it (or for a later one) does not hang, and the events after it are applied."""
    log = EventLog(nc)
    views = RunViews(log.js)
    await views.require()
    feed = LogFeed(log, views)
    readers = [Reader(feed), Reader(feed)]
    position = await feed.start()
    newer = {"event": "frobnicated", "run_id": "run_newer", "at": 1.0}
    ack = await log.js.publish(
        event_subject("run_newer", "frobnicated"), msgspec.json.encode(newer), stream=EVENTS_STREAM
    )
    await log.append(submitted("after_newer"))
    with anyio.fail_after(10):
        for reader in readers:
            await reader.index.wait_for_seq(ack.seq + 1, timeout=10)
    for reader in readers:
        assert ack.seq not in reader.seen and reader.seen[-1] == ack.seq + 1
        assert reader.index.get("after_newer") is not None
        assert reader.index.get("run_newer") is None
    assert position.start <= ack.seq
    await feed.leave()
    await feed.leave()
