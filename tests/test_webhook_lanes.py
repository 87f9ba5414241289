"""The webhook outbox handles events concurrently, each team within its own lane, against a
real nats-server: one team's events whose handling hangs (a run with tens of thousands of
streamed outputs to read, a read that times out) do not hold back another team's callbacks,
and the outbox's one ack (``AckPolicy.ALL``) never covers an event not handled yet."""

from __future__ import annotations

import anyio
import pytest
from nats.aio.client import Client

from runtime.control.webhook_lanes import Lanes
from runtime.control.webhooks import OUTBOX, WebhookService
from runtime.infra.eventlog import EventLog
from runtime.infra.natsserver import NatsServer
from runtime.infra.streams import EVENTS_STREAM
from tests.webhook_teams import CONFIG, GatedLog, delivery_stored, with_callback

pytestmark = pytest.mark.anyio


async def test_one_teams_hung_events_do_not_hold_back_another_teams_callback(nc: Client) -> None:
    js = nc.jetstream()
    service = WebhookService(nc, CONFIG)
    service.outbox_concurrency, service.outbox_team_concurrency = 4, 2
    service.event_deadline_s = 60.0  # acme's reads hang for the whole test, until released
    gated = GatedLog(nc)
    gated.held, gated.release = {f"run_a{i}" for i in range(4)}, anyio.Event()
    service.log = gated
    await service.ensure()
    log = EventLog(nc)
    hung_ends = []  # acme's: more than its lane, as many as every slot
    for i in range(4):
        for event in with_callback(f"run_a{i}", "acme"):
            seq = (await log.append(event, callback=True)).seq
        hung_ends.append(seq)
    for event in with_callback("run_b", "big"):  # then another team's run
        last = (await log.append(event, callback=True)).seq

    outbox = await js.pull_subscribe_bind(durable=OUTBOX, stream=EVENTS_STREAM)
    floors: list[int] = []

    async def ack_floor() -> int:
        info = await js.consumer_info(EVENTS_STREAM, OUTBOX)
        floors.append((info.ack_floor.stream_seq if info.ack_floor else 0) or 0)
        return floors[-1]

    async with anyio.create_task_group() as tg:
        tg.start_soon(service._outbox_loop, outbox)
        with anyio.fail_after(10):  # big's delivery is stored while acme's reads hang
            while not await delivery_stored(nc, "big", "run_b"):
                assert await ack_floor() < hung_ends[0]
                await anyio.sleep(0.05)
        for _ in range(20):  # a second on: nothing acked past acme's unhandled events
            assert await ack_floor() < hung_ends[0]
            await anyio.sleep(0.05)
        assert not any([await delivery_stored(nc, "acme", f"run_a{i}") for i in range(4)])
        gated.release.set()
        with anyio.fail_after(15):  # then every event is handled (those beyond acme's lane
            while True:  # were parked, and are handled from there) and acked
                info = await js.consumer_info(EVENTS_STREAM, OUTBOX)
                floor = (info.ack_floor.stream_seq if info.ack_floor else 0) or 0
                done = floor >= last and not info.num_ack_pending and not info.num_pending
                if done and all([await delivery_stored(nc, "acme", f"run_a{i}") for i in range(4)]):
                    break
                await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    assert all([await delivery_stored(nc, "acme", f"run_a{i}") for i in range(4)])
    assert floors and max(floors) < hung_ends[0]  # while they hung, no ack passed them


async def test_events_in_flight_when_the_process_dies_are_handled_by_the_next_one(
    nats_server: NatsServer, nc: Client
) -> None:
    """A deliverer dies (its connection drops) while acme's events are being handled and a
    later event of another team was handled (its delivery stored): no ack covers acme's, and
    the next deliverer stores their deliveries once their ack_wait has passed."""
    js = nc.jetstream()
    doomed = await nats_server.connect("admin", "jetrun-webhooks")
    first = WebhookService(doomed, CONFIG)
    first.outbox_ack_wait_s = 2.0  # what the dead process held comes back soon
    gated = GatedLog(doomed)
    gated.held, gated.release = {"run_a0", "run_a1"}, anyio.Event()  # never released
    first.log = gated
    await first.ensure()
    log = EventLog(nc)
    hung_ends = []
    for run_id in ("run_a0", "run_a1"):
        for event in with_callback(run_id, "acme"):
            seq = (await log.append(event, callback=True)).seq
        hung_ends.append(seq)
    for event in with_callback("run_b", "big"):
        last = (await log.append(event, callback=True)).seq

    async def ack_floor() -> int:
        info = await js.consumer_info(EVENTS_STREAM, OUTBOX)
        return (info.ack_floor.stream_seq if info.ack_floor else 0) or 0

    outbox = await doomed.jetstream().pull_subscribe_bind(durable=OUTBOX, stream=EVENTS_STREAM)
    async with anyio.create_task_group() as tg:
        tg.start_soon(first._outbox_loop, outbox)
        with anyio.fail_after(10):
            while not await delivery_stored(nc, "big", "run_b"):
                await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    await doomed.close()  # dead: acme's events were taken and never handled
    assert await ack_floor() < hung_ends[0]

    second = WebhookService(nc, CONFIG)
    outbox = await js.pull_subscribe_bind(durable=OUTBOX, stream=EVENTS_STREAM)
    async with anyio.create_task_group() as tg:
        tg.start_soon(second._outbox_loop, outbox)
        with anyio.fail_after(20):
            while True:
                stored = [await delivery_stored(nc, "acme", r) for r in ("run_a0", "run_a1")]
                floor = await ack_floor()
                if not stored[0]:
                    assert floor < hung_ends[0]
                info = await js.consumer_info(EVENTS_STREAM, OUTBOX)
                if all(stored) and floor >= last and not info.num_ack_pending:
                    break
                await anyio.sleep(0.05)
        tg.cancel_scope.cancel()


async def test_a_team_holds_at_most_its_lane_and_the_others_take_turns() -> None:
    lanes = Lanes(total=3, per_team=2)
    inside: dict[str, int] = {"a": 0, "b": 0}
    most: dict[str, int] = {"a": 0, "b": 0}
    order: list[str] = []
    gate = anyio.Event()

    async def event(team: str, hold: bool) -> None:
        async with lanes.slot(team):
            inside[team] += 1
            most[team] = max(most[team], inside[team])
            order.append(team)
            if hold:
                await gate.wait()
            inside[team] -= 1

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(event, "a", True)
            await anyio.sleep(0.05)
            for _ in range(3):
                tg.start_soon(event, "b", False)
            await anyio.sleep(0.05)
            assert order == ["a", "a", "b", "b", "b"]  # b's ran while a's held their lane
            gate.set()
    assert most == {"a": 2, "b": 1}
    assert lanes.busy("a") == 0 and lanes.busy("b") == 0
