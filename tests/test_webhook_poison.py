"""An event the webhook outbox cannot handle (one that does not decode, a run whose read keeps
timing out) goes to the dead letters after bounded attempts, with why, against a real
nats-server: with batch acks (``AckPolicy.ALL``), retried for ever it held back the one ack of
every later event, every team's, and stopped the outbox once ``max_ack_pending`` were
outstanding."""

from __future__ import annotations

import anyio
import msgspec
import pytest
from nats.aio.client import Client
from nats.errors import NoRespondersError

from contracts.events import RunCancelled, RunCompleted, encode_event
from contracts.values import from_python
from runtime.control.webhook_delivery import pending_subject
from runtime.control.webhook_outbox import retry_after, unhandled
from runtime.control.webhooks import OUTBOX, WebhookService, dead_letters, replay
from runtime.infra.eventlog import EventLog, Stored, subject_of
from runtime.infra.streams import EVENTS_STREAM, WEBHOOKS_STREAM
from tests.webhook_teams import CONFIG, delivery_stored, parked, with_callback

pytestmark = pytest.mark.anyio


class SlowLog(EventLog):
    """The event log, except that reading ``slow`` never ends (a read that keeps timing out)."""

    slow = "run_slow"

    async def read(self, run_id: str) -> list[Stored]:
        if run_id == self.slow:
            await anyio.sleep_forever()
        return await super().read(run_id)


def test_an_event_is_tried_a_bounded_number_of_times_ever_further_apart() -> None:
    assert [retry_after(n, limit=6, base_s=1.0) for n in range(1, 7)] == [1, 2, 4, 8, 16, None]
    assert retry_after(5, limit=10, base_s=4.0) == 30.0  # capped
    nothing = unhandled("run_x", None)
    assert (nothing.delivery_id, nothing.team, nothing.url) == ("dlv_run_x", "", "")
    assert nothing.run.id == "run_x" and nothing.run.state == "unknown"


async def test_one_teams_poison_events_go_to_the_dead_letters_and_hold_back_no_other_ack(
    nc: Client,
) -> None:
    js = nc.jetstream()
    service = WebhookService(nc, CONFIG)
    service.log = SlowLog(nc)
    service.attempts, service.retry_base_s, service.event_deadline_s = 3, 0.2, 0.5
    await service.ensure()
    log = EventLog(nc)
    # acme's: an end that does not decode, and a run whose read never ends
    bad = subject_of(RunCompleted(run_id="run_bad", at=1.0, attempt=1, outputs=[]), True)
    await js.publish(bad, b'{"event": "completed", "run_id": ')
    for event in with_callback("run_slow", "acme"):
        await log.append(event, callback=True)
    # then another team's run
    last = 0
    for event in with_callback("run_big", "big"):
        last = (await log.append(event, callback=True)).seq

    outbox = await js.pull_subscribe_bind(durable=OUTBOX, stream=EVENTS_STREAM)
    async with anyio.create_task_group() as tg:
        tg.start_soon(service._outbox_loop, outbox)
        with anyio.fail_after(30):  # every event handled or buried, and acked
            while True:
                info = await js.consumer_info(EVENTS_STREAM, OUTBOX)
                floor = info.ack_floor.stream_seq if info.ack_floor else 0
                done = (floor or 0) >= last and not info.num_ack_pending and not info.num_pending
                if done and not await parked(nc):
                    break
                await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    assert await delivery_stored(nc, "big", "run_big")
    dead = {letter.delivery.run.id: letter for _, letter in await dead_letters(js)}
    assert set(dead) == {"run_bad", "run_slow"}
    for letter in dead.values():
        assert letter.attempts == 3
        assert "the outbox could not handle this run's completed event" in letter.error
        assert "no callback was queued" in letter.error
    assert "DecodeError" in dead["run_bad"].error or "ValidationError" in dead["run_bad"].error
    assert "not handled within 0.5 s" in dead["run_slow"].error
    assert dead["run_bad"].delivery.team == ""  # nothing of it could be read
    assert dead["run_slow"].delivery.team == ""  # its read never ends: the same
    assert all(letter.delivery.url == "" for letter in dead.values())  # nothing was queued

    # replayed: handled again from the log as it is now (run_slow's can be read now)
    queued, left = await replay(js, set(), everything=True, log=EventLog(nc))
    assert queued == ["dlv_run_slow"] and await delivery_stored(nc, "acme", "run_slow")
    [why] = left
    assert why.startswith("dlv_run_bad: ") and "nothing to send" in why
    assert [letter.delivery.run.id for _, letter in await dead_letters(js)] == ["run_bad"]


async def test_an_outage_while_burying_keeps_the_event_for_later(nc: Client) -> None:
    """Giving up needs the dead letters: an event that cannot be buried now is kept (parked,
    or outstanding where no ack covers it), and buried on a later attempt."""
    js = nc.jetstream()
    service = WebhookService(nc, CONFIG)
    service.attempts, service.retry_base_s, service.event_deadline_s = 2, 0.2, 0.5
    await service.ensure()
    bad = subject_of(RunCompleted(run_id="run_bad", at=1.0, attempt=1, outputs=[]), True)
    seq = (await js.publish(bad, b"not json")).seq
    buried = service.deliverer.bury
    refusals = 2

    async def flaky_bury(*args: object) -> None:
        nonlocal refusals
        if refusals:
            refusals -= 1
            raise NoRespondersError
        await buried(*args)  # type: ignore[arg-type]

    service.deliverer.bury = flaky_bury  # type: ignore[method-assign,assignment]
    outbox = await js.pull_subscribe_bind(durable=OUTBOX, stream=EVENTS_STREAM)
    async with anyio.create_task_group() as tg:
        tg.start_soon(service._outbox_loop, outbox)
        with anyio.fail_after(30):
            while not await dead_letters(js):
                info = await js.consumer_info(EVENTS_STREAM, OUTBOX)
                floor = info.ack_floor.stream_seq if info.ack_floor else 0
                if (floor or 0) >= seq:  # acked only once parked, and kept until buried
                    assert await parked(nc) == 1 or await dead_letters(js)
                await anyio.sleep(0.05)
            while (await js.consumer_info(EVENTS_STREAM, OUTBOX)).num_ack_pending:
                await anyio.sleep(0.05)
            while await parked(nc):  # settled once buried
                await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    [(_, letter)] = await dead_letters(js)
    assert letter.delivery.run.id == "run_bad" and letter.attempts >= 2
    assert refusals == 0


async def test_a_body_unlike_its_subject_posts_no_callback(nc: Client) -> None:
    """An agent may publish on any run's ``<kind>.callback`` subject of an end it appends; a
    body of another kind there (a ``cancelled`` on ``completed.callback``, while the run still
    runs) is no event: no callback is stored or buried for it."""
    js = nc.jetstream()
    service = WebhookService(nc, CONFIG)
    service.attempts, service.retry_base_s, service.event_deadline_s = 2, 0.2, 0.5
    await service.ensure()
    log = EventLog(nc)
    for event in with_callback("run_running", "acme")[:-1]:  # dispatched: it runs
        await log.append(event, callback=True)
    where = subject_of(RunCompleted(run_id="run_running", at=6.0, attempt=1, outputs=[]), True)
    forged = encode_event(RunCancelled(run_id="run_running", at=6.0))
    seq = (await js.publish(where, forged)).seq
    outbox = await js.pull_subscribe_bind(durable=OUTBOX, stream=EVENTS_STREAM)
    async with anyio.create_task_group() as tg:
        tg.start_soon(service._outbox_loop, outbox)
        with anyio.fail_after(30):  # handled and acked
            while True:
                info = await js.consumer_info(EVENTS_STREAM, OUTBOX)
                floor = info.ack_floor.stream_seq if info.ack_floor else 0
                if (floor or 0) >= seq and not info.num_ack_pending and not await parked(nc):
                    break
                await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    assert not await delivery_stored(nc, "acme", "run_running")
    assert not await dead_letters(js)


async def test_an_agents_end_of_a_queued_run_posts_no_callback(nc: Client) -> None:
    """The outbox reads a run's own subjects: a run with a callback is dispatched alone (on its
    own subject), so an end with no dispatch before it is another agent's forgery (attempt 1 of
    a queued run is easy to guess): no callback for it, and the run's real end is posted."""
    js = nc.jetstream()
    service = WebhookService(nc, CONFIG)
    service.attempts, service.retry_base_s, service.event_deadline_s = 2, 0.2, 0.5
    await service.ensure()
    log = EventLog(nc)
    events = with_callback("run_queued", "acme")  # submitted, admitted, queued, dispatched, done
    for event in events[:3]:
        await log.append(event, callback=True)
    forged = RunCompleted(run_id="run_queued", at=3.5, attempt=1, outputs=[from_python("lie")])
    await js.publish(subject_of(forged, True), encode_event(forged))  # no message id of its
    outbox = await js.pull_subscribe_bind(durable=OUTBOX, stream=EVENTS_STREAM)

    async def settled(seq: int) -> None:
        while True:
            info = await js.consumer_info(EVENTS_STREAM, OUTBOX)
            floor = info.ack_floor.stream_seq if info.ack_floor else 0
            if (floor or 0) >= seq and not info.num_ack_pending and not await parked(nc):
                return
            await anyio.sleep(0.05)

    async with anyio.create_task_group() as tg:
        tg.start_soon(service._outbox_loop, outbox)
        with anyio.fail_after(30):
            await settled(await log.last_seq())
            assert not await delivery_stored(nc, "acme", "run_queued")
            for event in events[3:]:  # its dispatch, then its real end
                await log.append(event, callback=True)
            await settled(await log.last_seq())
        tg.cancel_scope.cancel()
    msg = await js.get_last_msg(WEBHOOKS_STREAM, pending_subject("acme", "run_queued"))
    delivery = msgspec.json.decode(msg.data)
    assert delivery["run"]["state"] == "completed"
    assert [o["value"] for o in delivery["run"]["outputs"]] == ["hihi"]  # not the forged
    assert not await dead_letters(js)


async def test_a_replayed_letter_is_built_from_the_runs_real_end_not_a_forged_one(
    nc: Client,
) -> None:
    """A letter the outbox could not handle is handled again from the log: a run with a
    callback is dispatched on its own subjects, so an end before its dispatch (another agent's,
    for a queued run) is no end there either; the callback carries the real one."""
    js = nc.jetstream()
    service = WebhookService(nc, CONFIG)
    await service.ensure()
    log = EventLog(nc)
    events = with_callback("run_replayed", "acme")  # submitted, admitted, queued, dispatched, done
    for event in events[:3]:
        await log.append(event, callback=True)
    forged = RunCompleted(run_id="run_replayed", at=3.5, attempt=1, outputs=[from_python("lie")])
    await js.publish(subject_of(forged, True), encode_event(forged))
    for event in events[3:]:
        await log.append(event, callback=True)
    await service.deliverer.bury(unhandled("run_replayed", None), 3, "could not handle", "e1")
    queued, left = await replay(js, {"run_replayed"}, log=log)
    assert queued == ["dlv_run_replayed"] and not left
    msg = await js.get_last_msg(WEBHOOKS_STREAM, pending_subject("acme", "run_replayed"))
    delivery = msgspec.json.decode(msg.data)
    assert [o["value"] for o in delivery["run"]["outputs"]] == ["hihi"]  # not the forged
