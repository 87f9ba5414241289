"""The webhook outbox acknowledges a batch at a time (``AckPolicy.ALL``) against a real
nats-server: its one ack never covers an event that no process has handled."""

from __future__ import annotations

import dataclasses

import anyio
import msgspec
import pytest
from nats.aio.client import Client
from nats.js import api
from nats.js.errors import NotFoundError

from contracts.events import AnyEvent, RunCompleted, RunSubmitted
from contracts.values import from_python
from runtime.control.webhook_delivery import pending_subject
from runtime.control.webhooks import OUTBOX, WebhookService, dead_letters, outbox_config
from runtime.infra.config import parse
from runtime.infra.eventlog import EventLog, callback_ends
from runtime.infra.natsserver import NatsServer
from runtime.infra.streams import EVENTS_STREAM, TERMINAL_KINDS, WEBHOOKS_STREAM
from tests.test_eventlog import history

pytestmark = pytest.mark.anyio

CONFIG = parse(
    {
        "teams": {
            "acme": {"tier": "startup", "tokens": ["tok"], "webhook_secret": "whsec_" + "a" * 24}
        }
    }
)


def with_callback(run_id: str) -> list[AnyEvent]:
    events = history(run_id)
    first = events[0]
    assert isinstance(first, RunSubmitted)
    return [msgspec.structs.replace(first, callback_url="http://127.0.0.1:9/hook"), *events[1:]]


async def append(nc: Client, run_id: str, callback: bool = True) -> list[int]:
    """``run_id``'s history, with a callback URL, appended as this release does (``callback``:
    its end on the subject the outbox reads) or as an older one did."""
    log = EventLog(nc)
    return [(await log.append(e, callback=callback)).seq for e in with_callback(run_id)]


async def delivery_stored(nc: Client, run_id: str) -> bool:
    try:
        await nc.jetstream().get_last_msg(WEBHOOKS_STREAM, pending_subject("acme", run_id))
    except NotFoundError:
        return False
    return True


async def test_events_a_killed_process_took_are_never_covered_by_another_ones_ack(
    nats_server: NatsServer, nc: Client
) -> None:
    js = nc.jetstream()
    service = WebhookService(nc, CONFIG)
    service.outbox_ack_wait_s = 3.0  # what the dead process took comes back soon
    await service.ensure()
    seqs_a = await append(nc, "run_a")
    other = await nats_server.connect("admin", "jetrun-webhooks")  # another deliverer...
    taken = await (
        await other.jetstream().pull_subscribe_bind(durable=OUTBOX, stream=EVENTS_STREAM)
    ).fetch(10, timeout=5)
    assert [m.subject for m in taken] == ["jetrun.ev.run_a.completed.callback"]
    await other.close()  # ... killed before it handled or acked them
    await append(nc, "run_b")

    outbox = await js.pull_subscribe_bind(durable=OUTBOX, stream=EVENTS_STREAM)
    covered_before_stored = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(service._outbox_loop, outbox)
        with anyio.fail_after(30):
            while True:
                info = await js.consumer_info(EVENTS_STREAM, OUTBOX)
                floor = info.ack_floor.stream_seq if info.ack_floor else 0
                stored_a, stored_b = (
                    await delivery_stored(nc, "run_a"),
                    await delivery_stored(nc, "run_b"),
                )
                if floor and floor >= seqs_a[-1] and not stored_a:
                    covered_before_stored.append(floor)
                    break
                if stored_a and stored_b and not info.num_pending and not info.num_ack_pending:
                    break
                await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    assert not covered_before_stored  # run_a's end was acked only once its delivery was stored
    info = await js.consumer_info(EVENTS_STREAM, OUTBOX)
    assert info.config.ack_policy == api.AckPolicy.ALL


# what older releases' outboxes read: every run's submitted and end
OLD_FILTERS = [f"jetrun.ev.*.{kind}" for kind in ("submitted", *TERMINAL_KINDS)]


async def test_an_outbox_that_acked_each_event_carries_on_from_its_first_unacked_one(
    nc: Client,
) -> None:
    js = nc.jetstream()
    older = dataclasses.replace(
        outbox_config(), ack_policy=api.AckPolicy.EXPLICIT, filter_subjects=OLD_FILTERS
    )
    await js.add_consumer(EVENTS_STREAM, older)
    await append(nc, "run_a", callback=False)
    psub = await js.pull_subscribe_bind(durable=OUTBOX, stream=EVENTS_STREAM)
    for msg in await psub.fetch(2, timeout=5):  # run_a's submitted and end, acked one by one
        assert msg.subject.startswith("jetrun.ev.run_a.")
        await msg.ack_sync()
    await psub.unsubscribe()
    seqs_b = await append(nc, "run_b")  # this release's writers

    await WebhookService(nc, CONFIG).ensure()
    info = await js.consumer_info(EVENTS_STREAM, OUTBOX)
    assert info.config.ack_policy == api.AckPolicy.ALL
    assert info.config.filter_subjects == callback_ends()
    assert info.config.opt_start_seq is not None and info.config.opt_start_seq <= seqs_b[0]
    assert info.num_pending == 1  # run_b's end: nothing lost, nothing acked twice


async def test_an_outbox_that_read_every_run_reads_only_the_ends_of_runs_with_a_callback(
    nc: Client,
) -> None:
    """An older release's outbox (batch acks, every run's submitted and end) carries on from
    where it stands with this release's filters."""
    js = nc.jetstream()
    await js.add_consumer(
        EVENTS_STREAM, dataclasses.replace(outbox_config(), filter_subjects=OLD_FILTERS)
    )
    await append(nc, "run_a", callback=False)
    assert (await js.consumer_info(EVENTS_STREAM, OUTBOX)).num_pending == 2
    await WebhookService(nc, CONFIG).ensure()
    await append(nc, "run_b")
    info = await js.consumer_info(EVENTS_STREAM, OUTBOX)
    assert info.config.filter_subjects == callback_ends()
    assert info.num_pending == 1  # run_b's end alone


async def test_a_run_too_large_to_deliver_goes_to_the_dead_letters_and_holds_no_ack_back(
    nc: Client,
) -> None:
    """A team's run whose view is over a message's size (its inputs and streamed outputs
    together): its delivery can never be stored. It goes to the dead letters, trimmed, with
    why; the outbox acks past it, so the next run's event (another team's, in real life) is
    acknowledged. Retried for ever, it held back the one ack of every later event, and the
    outbox stopped once max_ack_pending events were outstanding."""
    js = nc.jetstream()
    service = WebhookService(nc, CONFIG)
    await service.ensure()
    half = "x" * (nc.max_payload * 5 // 8)  # each event fits; the run's view does not
    big = with_callback("run_big")
    first, end = big[0], big[-1]
    assert isinstance(first, RunSubmitted) and isinstance(end, RunCompleted)
    big[0] = msgspec.structs.replace(first, inputs=[from_python(half)])
    big[-1] = msgspec.structs.replace(end, outputs=[from_python(half)])
    log = EventLog(nc)
    for event in big:
        await log.append(event, callback=True)
    seqs_b = await append(nc, "run_b")

    outbox = await js.pull_subscribe_bind(durable=OUTBOX, stream=EVENTS_STREAM)
    async with anyio.create_task_group() as tg:
        tg.start_soon(service._outbox_loop, outbox)
        with anyio.fail_after(20):
            while True:
                info = await js.consumer_info(EVENTS_STREAM, OUTBOX)
                floor = info.ack_floor.stream_seq if info.ack_floor else 0
                if (floor or 0) >= seqs_b[-1] and not info.num_ack_pending:
                    break
                await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    assert await delivery_stored(nc, "run_b")
    assert not await delivery_stored(nc, "run_big")
    [(_, dead)] = await dead_letters(js)
    assert dead.delivery.run.id == "run_big" and dead.delivery.run.state == "completed"
    assert dead.delivery.run.inputs == [] and dead.delivery.run.outputs == []
    assert "over the" in dead.error and "GET /v4/runs/run_big" in dead.error
