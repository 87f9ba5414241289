"""The NATS-level client: publish events, watch run changes by filter, resume from a sequence."""

from __future__ import annotations

from contextlib import aclosing

import msgspec
import pytest
from nats.js.errors import NotFoundError

from contracts import RunAdmitted, RunCompleted, RunDispatched, RunQueued, RunState, RunSubmitted
from contracts.events import AnyEvent, RunCancelled
from runtime.clients.client import RunChange, RunEvents
from runtime.control.webhooks import OUTBOX, outbox_config
from runtime.infra.natsserver import NatsServer
from runtime.infra.streams import EVENTS_STREAM

pytestmark = pytest.mark.anyio


def history(run_id: str, team: str, pipeline: str) -> list[AnyEvent]:
    return [
        RunSubmitted(run_id=run_id, at=1.0, team=team, pipeline=pipeline, inputs=[]),
        RunAdmitted(run_id=run_id, at=2.0, tier="pro"),
        RunQueued(run_id=run_id, at=3.0, attempt=1),
        RunDispatched(run_id=run_id, at=4.0, attempt=1, agent_id="a"),
        RunCompleted(run_id=run_id, at=5.0, attempt=1, outputs=[]),
    ]


async def collect(events: RunEvents, n: int, **filters: object) -> list[RunChange]:
    seen: list[RunChange] = []
    async with aclosing(events.watch(**filters)) as changes:  # type: ignore[arg-type]
        async for change in changes:
            seen.append(change)
            if len(seen) == n:
                break
    return seen


async def test_watch_filters_and_resumes(nats_server: NatsServer) -> None:
    async with RunEvents.connect(nats_server.url, nats_server.credentials("admin")) as events:
        await events.log.ensure()
        for run_id, team, pipeline in [
            ("r1", "acme", "a/x:v1"),
            ("r2", "rival", "a/x:v1"),
            ("r3", "acme", "a/y:v1"),
        ]:
            for event in history(run_id, team, pipeline):
                appended = await events.publish(event)
                assert not appended.duplicate
        assert (await events.publish(history("r1", "acme", "a/x:v1")[0])).duplicate

        acme = await collect(events, 10, team="acme")
        assert {c.run.id for c in acme} == {"r1", "r3"}
        assert acme[4].run.state is RunState.completed
        by_pipeline = await collect(events, 10, pipeline="a/x:v1")
        assert {c.run.id for c in by_pipeline} == {"r1", "r2"}
        one = await collect(events, 5, run_id="r2")
        assert [c.run.state for c in one][-1] is RunState.completed

        # resume after the third change of r1: the run is loaded from the log first
        resumed = await collect(events, 2, run_id="r1", from_seq=acme[2].seq + 1)
        assert [c.event.kind for c in resumed] == ["dispatched", "completed"]
        assert resumed[-1].run.team == "acme"
        resumed_team = await collect(events, 1, team="rival", from_seq=acme[2].seq + 1)
        assert resumed_team[0].run.id == "r2"


async def test_a_runs_end_published_here_is_posted_when_the_run_has_a_callback(
    nats_server: NatsServer,
) -> None:
    """An end published through ``publish`` (the admin path) goes where the webhook outbox
    reads it when the run was submitted with a callback URL, and only then."""
    async with RunEvents.connect(nats_server.url, nats_server.credentials("admin")) as events:
        await events.log.ensure()
        js = events.log.js
        await js.add_consumer(EVENTS_STREAM, outbox_config())
        hooked = history("r_hook", "acme", "a/x:v1")
        first = hooked[0]
        assert isinstance(first, RunSubmitted)
        hooked[0] = msgspec.structs.replace(first, callback_url="https://example.com/hook")
        for event in [*hooked, *history("r_plain", "acme", "a/x:v1")]:
            await events.publish(event)
        ends = [RunCancelled(run_id="r_unknown", at=6.0)]  # a run the log does not know
        for event in ends:
            await events.publish(event)
        stored = await js.get_last_msg(EVENTS_STREAM, "jetrun.ev.r_hook.completed.callback")
        assert stored.data is not None
        with pytest.raises(NotFoundError):
            await js.get_last_msg(EVENTS_STREAM, "jetrun.ev.r_hook.completed")
        await js.get_last_msg(EVENTS_STREAM, "jetrun.ev.r_plain.completed")
        await js.get_last_msg(EVENTS_STREAM, "jetrun.ev.r_unknown.cancelled")
        info = await js.consumer_info(EVENTS_STREAM, OUTBOX)
        assert info.num_pending == 1  # the outbox reads r_hook's end, and nothing else
