"""Each agent has its own NATS identity (against a real nats-server with auth on): agent A's
credentials cannot read agent B's dispatches by any consumer, direct get or inbox, cannot
heartbeat, drain or answer recalls as B; what A reads of the log arrives on consumers NATS
could check."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import anyio
import msgspec
import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api
from nats.js.errors import APIError

from contracts.agents import AgentHeartbeat
from contracts.events import AnyEvent, RunCancelled, RunDispatched
from contracts.values import RunIO
from runtime.infra.config import parse
from runtime.infra.eventlog import EVENTS_STREAM, EventLog, LogSettings, agent_dispatches
from runtime.infra.fleet import HEARTBEAT_SUBJECT, decode_heartbeat, drain_subject
from runtime.infra.nats_auth import agent_permissions, agent_role, inbox_prefix
from runtime.infra.natsserver import NatsServer
from runtime.node.ended import EndedRuns
from runtime.provision import provision

pytestmark = pytest.mark.anyio

CONFIG = parse({"tiers": {"basic": 3}, "teams": {"acme": {"tier": "basic", "tokens": ["t"]}}})
SECRET = "rival's prompt"
DENIED_WITHIN_S = 1.0


@pytest.fixture(scope="module")
def anyio_backend() -> tuple[str, dict[str, bool]]:
    return ("asyncio", {"use_uvloop": True})


@pytest.fixture(scope="module")
async def server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[NatsServer]:
    """Streams made by the admin step; a dispatch to node-a and one to node-b, whose inputs
    are another team's."""
    async with NatsServer(store_dir=tmp_path_factory.mktemp("ids") / "nats") as server:
        admin = await server.connect("admin")
        await provision(admin, CONFIG, LogSettings())
        await admin.close()
        scheduler = await server.connect("scheduler")
        log = EventLog(scheduler)
        for run_id, agent_id, text in (("run_a", "node-a", "mine"), ("run_b", "node-b", SECRET)):
            inputs = [RunIO(type="string", value=text)]
            dispatch = RunDispatched(
                run_id=run_id,
                at=1.0,
                attempt=1,
                agent_id=agent_id,
                pipeline="a/b:v1",
                team="acme",
                inputs=inputs,
            )
            await log.append(dispatch)
        await log.append(RunCancelled(run_id="run_b", at=2.0))
        await scheduler.close()
        yield server


class Agent:
    """A connection as agent ``agent_id`` that records the server's permission errors."""

    def __init__(self, nc: Client, errors: list[str]) -> None:
        self.nc, self.errors = nc, errors
        self.js = nc.jetstream(timeout=DENIED_WITHIN_S)

    def violations(self) -> int:
        return sum("permissions violation" in e.lower() for e in self.errors)


async def as_agent(server: NatsServer, agent_id: str) -> Agent:
    errors: list[str] = []

    async def on_error(err: Exception) -> None:
        errors.append(str(err))

    options = server.add_agent(agent_id).connect_options()
    nc = await nats.connect(server.url, error_cb=on_error, allow_reconnect=False, **options)
    return Agent(nc, errors)


async def test_an_agent_reads_its_own_dispatches_and_the_ends_of_runs(server: NatsServer) -> None:
    a = await as_agent(server, "node-a")
    seen: list[AnyEvent] = []

    async def on_event(seq: int, event: AnyEvent) -> None:
        seen.append(event)

    subjects = [agent_dispatches("node-a"), "jetrun.ev.*.cancelled"]
    try:
        subs = await EventLog(a.nc).tail_each(on_event, from_seq=1, subjects=subjects)
        with anyio.fail_after(10):
            while len(seen) < 2:
                await anyio.sleep(0.02)
        for sub in subs:
            await sub.unsubscribe()
    finally:
        await a.nc.close()
    assert sorted(e.run_id for e in seen) == ["run_a", "run_b"]
    assert [e.kind for e in seen if e.run_id == "run_b"] == ["cancelled"]
    assert a.violations() == 0, a.errors


def _denied(*errors: type[BaseException]) -> tuple[type[BaseException], ...]:
    return (nats.errors.TimeoutError, TimeoutError, *errors)


async def test_an_agent_cannot_read_another_agents_dispatches(server: NatsServer) -> None:
    """Every way to B's dispatch (and its inputs) is refused to A's identity: a consumer
    filtered on B's subject, on everything, on several subjects, a consumer whose request
    says another filter than its subject, a direct get, a stream get, B's inbox."""
    a = await as_agent(server, "node-a")
    b = await as_agent(server, "node-b")
    got: list[bytes] = []

    async def keep(msg: Msg) -> None:
        got.append(msg.data)

    inbox = a.nc.new_inbox()
    await a.nc.subscribe(inbox, cb=keep)
    await a.nc.subscribe("_INBOX.agent.node-b.>", cb=keep)  # B's replies and deliveries
    outcomes: dict[str, str] = {}

    async def attempt(name: str, call: object) -> None:
        try:
            await call  # type: ignore[misc]
            outcomes[name] = "allowed"
        except _denied(APIError):
            outcomes[name] = "denied"

    def config(**fields: object) -> api.ConsumerConfig:
        return api.ConsumerConfig(deliver_subject=inbox, **fields)  # type: ignore[arg-type]

    def raw_create(name: str, subject_filter: str, body: dict[str, object]) -> object:
        subject = f"$JS.API.CONSUMER.CREATE.{EVENTS_STREAM}.{name}.{subject_filter}"
        request = {"stream_name": EVENTS_STREAM, "config": {"name": name, **body}}

        async def call() -> None:
            reply = await a.nc.request(subject, json.dumps(request).encode(), timeout=1.0)
            if "error" in json.loads(reply.data):
                raise APIError(description=reply.data.decode())

        return call()

    own = agent_dispatches("node-a")
    delivery = {"deliver_subject": inbox, "deliver_policy": "all"}
    attempts = {
        "filtered on B": a.js.add_consumer(
            EVENTS_STREAM, config(name="x1", filter_subject=agent_dispatches("node-b"))
        ),
        "filtered on everything": a.js.add_consumer(
            EVENTS_STREAM, config(name="x2", filter_subject="jetrun.ev.>")
        ),
        "unnamed (no filter in the subject)": a.js.add_consumer(
            EVENTS_STREAM, config(filter_subject=own)
        ),
        "several filters": a.js.add_consumer(
            EVENTS_STREAM, config(filter_subjects=[own, agent_dispatches("node-b")])
        ),
        "own filter in the subject, another in the request": raw_create(
            "x3", own, {**delivery, "filter_subject": "jetrun.ev.>"}
        ),
        "own filter in the subject, several in the request": raw_create(
            "x4", own, {**delivery, "filter_subjects": [own, agent_dispatches("node-b")]}
        ),
        "ordered consumer on B's dispatches": a.js.subscribe(
            agent_dispatches("node-b"), stream=EVENTS_STREAM, ordered_consumer=True
        ),
        "direct get": a.js.get_last_msg(
            EVENTS_STREAM, "jetrun.ev.run_b.dispatched.node-b", direct=True
        ),
        "stream get": a.js.get_last_msg(EVENTS_STREAM, "jetrun.ev.run_b.dispatched.node-b"),
    }
    try:
        async with anyio.create_task_group() as tg:
            for name, call in attempts.items():
                tg.start_soon(attempt, name, call)
        # B reads its own dispatch meanwhile: nothing of it reaches A
        seen_by_b: list[AnyEvent] = []

        async def on_b(seq: int, event: AnyEvent) -> None:
            seen_by_b.append(event)

        subs = await EventLog(b.nc).tail_each(
            on_b, from_seq=1, subjects=[agent_dispatches("node-b")]
        )
        with anyio.fail_after(10):
            while not seen_by_b:
                await anyio.sleep(0.02)
        await b.js.stream_info(EVENTS_STREAM)  # a reply to B's inbox
        await anyio.sleep(0.3)
        for sub in subs:
            await sub.unsubscribe()
    finally:
        await a.nc.close()
        await b.nc.close()
    assert set(outcomes.values()) == {"denied"}, outcomes
    assert [e.run_id for e in seen_by_b] == ["run_b"]
    assert not any(SECRET.encode() in data for data in got), got
    assert a.violations() >= 7, a.errors  # the other two: the server answered an error
    assert b.violations() == 0, b.errors


async def test_an_agent_cannot_heartbeat_drain_or_answer_recalls_as_another(
    server: NatsServer,
) -> None:
    a = await as_agent(server, "node-a")
    gateway = await server.connect("gateway")
    beats: list[Msg] = []

    async def on_beat(msg: Msg) -> None:
        beats.append(msg)

    def beat(agent_id: str) -> bytes:
        return msgspec.json.encode(
            AgentHeartbeat(agent_id=agent_id, at=1.0, started_at=1.0, accelerators=[], pipelines=[])
        )

    try:
        await gateway.subscribe(f"{HEARTBEAT_SUBJECT}.*", cb=on_beat)
        await gateway.flush()
        await a.nc.publish(f"{HEARTBEAT_SUBJECT}.node-b", beat("node-b"))  # refused
        await a.nc.publish(f"{HEARTBEAT_SUBJECT}.node-a", beat("node-b"))  # B's, on A's subject
        await a.nc.publish(f"{HEARTBEAT_SUBJECT}.node-a", beat("node-a"))
        await a.nc.subscribe("jetrun.agents.recall.node-b")
        with pytest.raises(_denied()):
            await a.nc.request(drain_subject("node-b"), b"node-b", timeout=DENIED_WITHIN_S)
        await a.nc.flush()
        await anyio.sleep(0.3)
    finally:
        await a.nc.close()
        await gateway.close()
    assert [m.subject for m in beats] == [f"{HEARTBEAT_SUBJECT}.node-a"] * 2
    forged, own = beats
    with pytest.raises(msgspec.ValidationError, match="node-b"):
        decode_heartbeat(forged.subject, forged.data)  # what the gateway and scheduler drop
    assert decode_heartbeat(own.subject, own.data).agent_id == "node-a"
    assert a.violations() == 3, a.errors


def test_a_dispatch_older_than_its_runs_end_is_stale_whatever_came_first() -> None:
    ended = EndedRuns(capacity=2)
    ended.note("r1", 10)  # cancelled at 10, heard before its dispatch at 7
    assert ended.ended_after("r1", 7)
    assert not ended.ended_after("r1", 11)  # a later dispatch (a requeued run's next attempt)
    ended.note("r1", 5)  # an older end changes nothing
    assert ended.ended_after("r1", 7)
    ended.note("r2", 3)
    ended.note("r3", 4)
    assert len(ended) == 2 and not ended.ended_after("r1", 7)  # bounded: the oldest forgotten


def test_an_agents_inbox_is_one_token_of_its_own() -> None:
    """Agent ids may hold ':'; one agent's inbox never covers another's (``a`` and ``a:b``)."""
    assert inbox_prefix(agent_role("a:b")) == "_INBOX.agent.a:b"
    assert agent_permissions("a").subscribe[0] == "_INBOX.agent.a.>"
    assert not inbox_prefix(agent_role("a:b")).startswith("_INBOX.agent.a.")
