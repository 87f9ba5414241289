"""An event is what its subject says it is: a role may append only some kinds (the subjects its
NATS permissions allow), so a body whose kind or run differs from its subject's (an agent's
``started`` subject carrying a ``cancelled`` or a ``queued_runs`` batch, say) is no event to
any reader of the log, on a real nats-server with auth."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from contracts.events import (
    AdmissionGrant,
    Event,
    RunCancelled,
    RunDispatched,
    RunQueued,
    RunStarted,
    RunSubmitted,
    dispatched_runs,
    encode_event,
    queued_runs,
)
from contracts.states import RunState
from runtime.infra.config import parse
from runtime.infra.eventlog import ALL_EVENTS, EventLog, LogSettings, subject_of
from runtime.infra.nats_auth import agent_role
from runtime.infra.natsserver import NatsServer
from runtime.infra.projection import RunIndex
from runtime.provision import provision

pytestmark = pytest.mark.anyio

CONFIG = parse({"teams": {"acme": {"tier": "startup", "tokens": ["t"]}}})
WITHIN_S = 5.0


@pytest.fixture(scope="module")
def anyio_backend() -> tuple[str, dict[str, bool]]:
    return ("asyncio", {"use_uvloop": True})


@pytest.fixture(scope="module")
async def server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[NatsServer]:
    async with NatsServer(store_dir=tmp_path_factory.mktemp("forge") / "nats") as server:
        nc = await server.connect("admin")
        await provision(nc, CONFIG, LogSettings())
        await nc.close()
        yield server


def submitted(run_id: str) -> RunSubmitted:
    return RunSubmitted(
        run_id=run_id,
        at=1.0,
        team="acme",
        pipeline="t/p:v1",
        inputs=[],
        wait_for_resources=True,
        admission=AdmissionGrant(tier="startup"),
    )


async def publish_as(server: NatsServer, role: str, subject: str, event: Event) -> int:
    """Publish ``event``'s body on ``subject`` as ``role`` (which may publish there)."""
    nc = await server.connect(role)
    try:
        ack = await nc.jetstream().publish(subject, encode_event(event))
        return int(ack.seq)
    finally:
        await nc.close()


async def index_upto(log: EventLog, seq: int) -> RunIndex:
    """A ``RunIndex`` that followed the whole log up to ``seq`` (what every service holds)."""
    index = RunIndex()
    tail = await log.follow(index.apply, index.skip)
    try:
        await index.catch_up(seq, timeout=WITHIN_S)
    finally:
        await tail.unsubscribe()
    return index


@pytest.mark.parametrize(
    "forged",
    [
        pytest.param("batch", id="queued_runs on the agent's started subject"),
        pytest.param("cancelled", id="cancelled on the agent's started subject"),
        pytest.param("other_run", id="started of another run on a run's started subject"),
    ],
)
async def test_a_body_unlike_its_subject_is_no_event_to_readers(
    server: NatsServer, forged: str
) -> None:
    victim, decoy = f"run_victim_{forged}", f"run_decoy_{forged}"
    admin = await server.connect("admin")
    try:
        log = EventLog(admin)
        for run_id in (victim, decoy):
            await log.append(submitted(run_id))
        # what the agent may publish: ``jetrun.ev.*.started``
        server.add_agent("node-rogue")
        agent = agent_role("node-rogue")
        if forged == "batch":  # the scheduler's batch, on ``jetrun.ev._queued.started``
            queued = [
                RunQueued(run_id=victim, at=2.0, attempt=1),
                RunQueued(run_id=decoy, at=2.0, attempt=1),
            ]
            body: Event = queued_runs(queued, 2.0)
            subject = "jetrun.ev._queued.started"
        elif forged == "cancelled":  # a decision, on the victim's ``started`` subject
            body = RunCancelled(run_id=victim, at=2.0)
            subject = f"jetrun.ev.{victim}.started"
        else:  # the victim's ``started``, on the decoy's subject
            body = RunStarted(run_id=victim, at=2.0, attempt=1, agent_id="node-rogue")
            subject = f"jetrun.ev.{decoy}.started"
        seq = await publish_as(server, agent, subject, body)

        index = await index_upto(log, seq)
        assert index.records[victim].state is RunState.routing
        assert index.records[decoy].state is RunState.routing
        read = [s.event for s in await log.read_subject(ALL_EVENTS)]
        assert body not in read
        assert (await log.load(victim)).state is RunState.routing
    finally:
        await admin.close()


async def test_the_schedulers_batches_on_their_own_subjects_are_read(server: NatsServer) -> None:
    """The check refuses only what does not match: the scheduler's own batches are read, a
    ``dispatched_runs`` on its agent's dispatch subject only."""
    run_id = "run_batched"
    admin = await server.connect("admin")
    try:
        log = EventLog(admin)
        await log.append(submitted(run_id))
        two = [
            RunQueued(run_id=run_id, at=2.0, attempt=1),
            RunQueued(run_id="x", at=2.0, attempt=1),
        ]
        batch = queued_runs(two, 2.0)
        await publish_as(server, "scheduler", subject_of(batch), batch)
        sent = [
            RunDispatched(run_id=r, at=3.0, attempt=1, agent_id="node-b") for r in (run_id, "x")
        ]
        dispatches = dispatched_runs(sent, 3.0)
        elsewhere = "jetrun.ev._dispatched.dispatched.node-c"  # another agent's
        await publish_as(server, "scheduler", elsewhere, dispatches)
        index = await index_upto(log, await publish_as(server, "scheduler", elsewhere, batch))
        assert index.records[run_id].state is RunState.queued
        seq = await publish_as(server, "scheduler", subject_of(dispatches), dispatches)
        index = await index_upto(log, seq)
        assert index.records[run_id].state is RunState.running
        assert index.records[run_id].agent_id == "node-b"
    finally:
        await admin.close()


async def test_a_forged_body_is_skipped_within_a_deadline(server: NatsServer) -> None:
    """A reader waiting for the forged message's sequence is not left hanging."""
    admin = await server.connect("admin")
    try:
        log = EventLog(admin)
        server.add_agent("node-rogue")
        agent = agent_role("node-rogue")
        body = RunCancelled(run_id="run_none", at=2.0)
        seq = await publish_as(server, agent, "jetrun.ev.run_other.started", body)
        with anyio.fail_after(WITHIN_S):
            index = await index_upto(log, seq)
        assert index.last_seq >= seq
        assert "run_none" not in index.records
    finally:
        await admin.close()
