"""One team cannot stall every team's webhooks through the outbox, against a real nats-server:
an event of one team that keeps failing is parked for its retries (the outbox's one ack,
``AckPolicy.ALL``, moves on past it, so ``max_ack_pending`` never fills behind it), and a burst
of one team's slow events waiting for its lane does not use up what the outbox fetches."""

from __future__ import annotations

import dataclasses

import anyio
import pytest
from nats.aio.client import Client

import runtime.control.webhooks as webhooks
from contracts.events import RunCompleted
from runtime.control.webhooks import OUTBOX, WebhookService, dead_letters, outbox_config
from runtime.infra.eventlog import EventLog, subject_of
from runtime.infra.natsserver import NatsServer
from runtime.infra.streams import EVENTS_STREAM
from tests.webhook_teams import CONFIG, GatedLog, delivery_stored, parked, with_callback

pytestmark = pytest.mark.anyio


async def append_run(log: EventLog, run_id: str, team: str) -> int:
    """``run_id``'s history; the sequence of its end."""
    seq = 0
    for event in with_callback(run_id, team):
        seq = (await log.append(event, callback=True)).seq
    return seq


async def test_a_failing_event_is_parked_and_holds_no_other_teams_callbacks_back(
    nats_server: NatsServer, nc: Client
) -> None:
    """acme's end keeps failing (its retries take half a minute); more than max_ack_pending
    ends of big's come after it: big's are all stored promptly, and acme's event is acked only
    once parked, where it stays until it is handled or in the dead letters. The deliverer
    runs as its role (parking needs its permissions)."""
    js = nc.jetstream()
    role = await nats_server.connect("webhooks")
    service = WebhookService(role, CONFIG)
    service.event_deadline_s = 2.0  # the default back-off: 1, 2, 4, 8, 16 s between attempts
    service.outbox_ack_wait_s = 3.0  # what the first process holds comes back soon
    await service.ensure()
    small = dataclasses.replace(outbox_config(None, 3.0), max_ack_pending=4)
    await js.add_consumer(EVENTS_STREAM, small)
    bad = subject_of(RunCompleted(run_id="run_bad", at=1.0, attempt=1, outputs=[]), True)
    bad_seq = (await js.publish(bad, b'{"event": "completed", "run_id": ')).seq
    log = EventLog(nc)
    runs = [f"run_b{i}" for i in range(12)]  # three times max_ack_pending
    for run_id in runs:
        await append_run(log, run_id, "big")

    outbox = await role.jetstream().pull_subscribe_bind(durable=OUTBOX, stream=EVENTS_STREAM)
    async with anyio.create_task_group() as tg:
        tg.start_soon(service._outbox_loop, outbox)
        with anyio.fail_after(10):  # long before acme's event could be given up on (31 s)
            while not all([await delivery_stored(nc, "big", r) for r in runs]):
                info = await js.consumer_info(EVENTS_STREAM, OUTBOX)
                if ((info.ack_floor.stream_seq if info.ack_floor else 0) or 0) >= bad_seq:
                    assert await parked(nc) == 1  # acked past it only once parked
                await anyio.sleep(0.05)
        assert await parked(nc) == 1 and not await dead_letters(js)  # still being retried
        tg.cancel_scope.cancel()
    await role.close()

    # a restart resumes the parked retries: it goes to the dead letters after its attempts
    again = WebhookService(nc, CONFIG)
    again.attempts, again.retry_base_s = 3, 0.2
    outbox = await js.pull_subscribe_bind(durable=OUTBOX, stream=EVENTS_STREAM)
    async with anyio.create_task_group() as tg:
        tg.start_soon(again._outbox_loop, outbox)
        with anyio.fail_after(20):
            while not await dead_letters(js) or await parked(nc):
                await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    [(_, letter)] = await dead_letters(js)
    assert letter.delivery.run.id == "run_bad" and letter.attempts >= 3


async def test_a_burst_of_one_teams_slow_events_does_not_delay_another_teams(
    nc: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More of acme's hanging ends than the outbox fetches at once: big's end after them is
    fetched and stored meanwhile. Those beyond acme's lane are parked rather than held in the
    outbox, and handled from there once acme's reads end."""
    js = nc.jetstream()
    service = WebhookService(nc, CONFIG)
    service.outbox_concurrency, service.outbox_team_concurrency = 4, 2
    service.event_deadline_s = 60.0  # acme's reads hang for the whole test, until released
    gated = GatedLog(nc)
    burst = [f"run_a{i}" for i in range(24)]
    gated.held, gated.release = set(burst), anyio.Event()
    service.log = gated
    await service.ensure()
    monkeypatch.setattr(webhooks, "OUTBOX_BATCH", 16)  # what the outbox fetches at most
    log = EventLog(nc)
    for run_id in burst:
        await append_run(log, run_id, "acme")
    last = await append_run(log, "run_b", "big")

    outbox = await js.pull_subscribe_bind(durable=OUTBOX, stream=EVENTS_STREAM)
    async with anyio.create_task_group() as tg:
        tg.start_soon(service._outbox_loop, outbox)
        with anyio.fail_after(5):
            while not await delivery_stored(nc, "big", "run_b"):
                await anyio.sleep(0.05)
        assert not any([await delivery_stored(nc, "acme", r) for r in burst])  # still hanging
        assert await parked(nc) > 0  # acme's beyond its lane
        gated.release.set()
        with anyio.fail_after(20):  # then every event is handled and acked
            while True:
                info = await js.consumer_info(EVENTS_STREAM, OUTBOX)
                floor = (info.ack_floor.stream_seq if info.ack_floor else 0) or 0
                done = floor >= last and not info.num_ack_pending and not info.num_pending
                if done and not await parked(nc):
                    break
                await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    assert all([await delivery_stored(nc, "acme", r) for r in burst])
