"""Two teams with webhook secrets, runs of theirs with a callback URL, an event log whose reads
of some runs hang until released, and what the webhook outbox stored or parked: what the
outbox's tests against a real nats-server share."""

from __future__ import annotations

import anyio
import msgspec
from nats.aio.client import Client
from nats.js.errors import NotFoundError

from contracts.events import AnyEvent, RunSubmitted
from runtime.control.webhook_delivery import pending_subject
from runtime.infra.config import parse
from runtime.infra.eventlog import EventLog, Stored
from runtime.infra.streams import RETRY_STREAM, WEBHOOKS_STREAM
from tests.test_eventlog import history

SECRET = "whsec_" + "a" * 24
CONFIG = parse(
    {
        "teams": {
            "acme": {"tier": "startup", "tokens": ["tok_a"], "webhook_secret": SECRET},
            "big": {"tier": "startup", "tokens": ["tok_b"], "webhook_secret": SECRET},
        }
    }
)


def with_callback(run_id: str, team: str) -> list[AnyEvent]:
    """A whole run of ``team`` (``tests.test_eventlog.history``) submitted with a callback URL."""
    events = history(run_id)
    first = events[0]
    assert isinstance(first, RunSubmitted)
    url = f"http://127.0.0.1:9/{team}"
    return [msgspec.structs.replace(first, team=team, callback_url=url), *events[1:]]


async def delivery_stored(nc: Client, team: str, run_id: str) -> bool:
    """Whether the outbox stored the delivery of ``run_id``'s callback."""
    try:
        await nc.jetstream().get_last_msg(WEBHOOKS_STREAM, pending_subject(team, run_id))
    except NotFoundError:
        return False
    return True


async def parked(nc: Client) -> int:
    """Events parked for a retry (neither handled nor in the dead letters yet)."""
    return (await nc.jetstream().stream_info(RETRY_STREAM)).state.messages


class GatedLog(EventLog):
    """The event log, except that reading one of ``held`` waits until ``release`` is set."""

    held: set[str] = set()
    release = anyio.Event()

    async def read(self, run_id: str) -> list[Stored]:
        if run_id in self.held:
            await self.release.wait()
        return await super().read(run_id)
