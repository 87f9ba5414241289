"""NATS authorization against a real nats-server: anonymous and unknown clients are refused,
and each role's forbidden publishes and JetStream API calls fail with the log unchanged."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import anyio
import nats
import nats.errors
import nkeys
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api

from contracts.events import (
    RunCancelled,
    RunCancelRequested,
    RunCompleted,
    RunDispatched,
    RunQueued,
    RunsQueued,
    RunStarted,
    RunSubmitted,
    queued_runs,
)
from runtime.control.admission import Admission, permit_subject, stream_name
from runtime.infra import nats_auth
from runtime.infra.config import parse
from runtime.infra.eventlog import EVENTS_STREAM, EventLog, LogSettings, subject_of
from runtime.infra.nats_auth import (
    ROLES,
    SUBMIT_SUBJECT,
    Credentials,
    agent_of,
    agent_role,
    authorization_block,
    permissions,
)
from runtime.infra.nats_conn import NatsRefused, connect
from runtime.infra.natsserver import NatsServer
from runtime.infra.streams import VIEWS_BUCKET, VIEWS_STREAM
from runtime.provision import provision

pytestmark = pytest.mark.anyio

CONFIG = parse({"tiers": {"basic": 3}, "teams": {"acme": {"tier": "basic", "tokens": ["t"]}}})
LIMIT = 3
DENIED_WITHIN_S = 1.0


@pytest.fixture(scope="module")
def anyio_backend() -> tuple[str, dict[str, bool]]:
    return ("asyncio", {"use_uvloop": True})


@pytest.fixture(scope="module")
async def server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[NatsServer]:
    """One server with the streams made by the admin step, one run in the log and one
    admission permit held."""
    async with NatsServer(store_dir=tmp_path_factory.mktemp("auth") / "nats") as server:
        nc = await server.connect("admin")
        await provision(nc, CONFIG, LogSettings())
        await EventLog(nc).append(submitted("run_victim"))
        permit = b'{"run_id":"x","team":"acme","at":0}'
        await nc.jetstream().publish(permit_subject(LIMIT, "acme"), permit)
        await nc.close()
        yield server


def submitted(run_id: str) -> RunSubmitted:
    return RunSubmitted(run_id=run_id, at=1.0, team="acme", pipeline="a/b:v1", inputs=[])


class Role:
    """A connection as one role that records the server's permission errors."""

    def __init__(self, nc: Client, errors: list[str]) -> None:
        self.nc, self.errors = nc, errors
        self.js = nc.jetstream(timeout=DENIED_WITHIN_S)


async def as_role(server: NatsServer, role: str) -> Role:
    errors: list[str] = []

    async def on_error(err: Exception) -> None:
        errors.append(str(err))

    agent_id = agent_of(role)
    credentials = server.add_agent(agent_id) if agent_id else server.credentials(role)
    options = credentials.connect_options()
    nc = await nats.connect(server.url, error_cb=on_error, allow_reconnect=False, **options)
    return Role(nc, errors)


async def log_state(server: NatsServer) -> dict[str, tuple[int, int, int]]:
    """(messages, last sequence, replicas) of every stream, read as admin."""
    nc = await server.connect("admin")
    try:
        js = nc.jetstream()
        names = [EVENTS_STREAM, "JETRUN_PIPELINES", stream_name(LIMIT), VIEWS_STREAM]
        infos = [await js.stream_info(name) for name in names]
        return {
            i.config.name or "": (i.state.messages, i.state.last_seq, i.config.num_replicas or 1)
            for i in infos
        }
    finally:
        await nc.close()


Attempt = Callable[[Role], Awaitable[object]]


def append(event: object) -> Attempt:
    async def attempt(role: Role) -> object:
        assert isinstance(
            event, RunSubmitted | RunCompleted | RunDispatched | RunCancelled | RunsQueued
        )
        subject = subject_of(event)
        return await role.js.publish(subject, b"{}", headers={"Nats-Msg-Id": subject})

    return attempt


async def delete_stream(role: Role) -> object:
    return await role.js.delete_stream(EVENTS_STREAM)


async def purge_admission(role: Role) -> object:
    return await role.js.purge_stream(stream_name(LIMIT))


async def delete_msg(role: Role, stream: str) -> object:
    subject = f"$JS.API.STREAM.MSG.DELETE.{stream}"
    reply = await role.nc.request(subject, b'{"seq": 1}', timeout=DENIED_WITHIN_S)
    return reply.data


async def delete_event(role: Role) -> object:
    return await delete_msg(role, EVENTS_STREAM)


async def update_stream(role: Role) -> object:
    config = EventLog(role.nc).stream_config()
    config.max_age = 1.0
    return await role.js.update_stream(config)


async def take_permit(role: Role) -> object:
    return await role.js.publish(permit_subject(LIMIT, "acme"), b"{}")


async def release_permit(role: Role) -> object:
    return await delete_msg(role, stream_name(LIMIT))


async def forge_view(role: Role) -> object:
    """Overwrite a run's stored view (what a gateway answers for an ended run)."""
    return await role.js.publish(f"$KV.{VIEWS_BUCKET}.run.run_victim", b"{}")


async def forge_checkpoint(role: Role) -> object:
    """Move the replay checkpoint (where every gateway starts reading the log)."""
    return await role.js.publish(f"$KV.{VIEWS_BUCKET}.checkpoint", b"{}")


FORGED_COMPLETED = append(RunCompleted(run_id="run_victim", at=2.0, attempt=1, outputs=[]))
FORGED_SUBMITTED = append(submitted("run_forged"))
FORGED_DISPATCH = append(RunDispatched(run_id="run_victim", at=2.0, attempt=1, agent_id="a"))
FORGED_CANCELLED = append(RunCancelled(run_id="run_victim", at=2.0))
# a batch of queued runs is the scheduler's alone: another role could place runs in a queue
FORGED_BATCH = append(queued_runs([RunQueued(run_id="run_victim", at=2.0, attempt=1)] * 2, 2.0))
ALWAYS_DENIED = [delete_stream, purge_admission, delete_event, update_stream]
NOT_THE_VIEWS = [forge_view, forge_checkpoint]  # only the scheduler writes them

AGENT_A = agent_role("node-a")

FORBIDDEN: dict[str, list[Attempt]] = {
    AGENT_A: [
        FORGED_SUBMITTED,
        FORGED_DISPATCH,
        FORGED_CANCELLED,
        FORGED_BATCH,
        take_permit,
        release_permit,
        *NOT_THE_VIEWS,
        *ALWAYS_DENIED,
    ],
    "service": [
        FORGED_SUBMITTED,
        FORGED_COMPLETED,
        FORGED_DISPATCH,
        FORGED_BATCH,
        take_permit,
        release_permit,
        *NOT_THE_VIEWS,
        *ALWAYS_DENIED,
    ],
    "gateway": [
        FORGED_COMPLETED,
        FORGED_DISPATCH,
        FORGED_CANCELLED,
        FORGED_BATCH,
        *NOT_THE_VIEWS,
        *ALWAYS_DENIED,
    ],
    "scheduler": [FORGED_COMPLETED, FORGED_SUBMITTED, take_permit, *ALWAYS_DENIED],
}


@pytest.mark.parametrize("role", sorted(FORBIDDEN))
async def test_each_roles_forbidden_operations_fail_and_change_nothing(
    server: NatsServer, role: str
) -> None:
    before = await log_state(server)
    client = await as_role(server, role)
    outcomes: dict[str, str] = {}

    async def attempt(i: int, call: Attempt) -> None:
        try:
            await call(client)
            outcomes[f"{i}:{call.__name__}"] = "allowed"
        except (nats.errors.TimeoutError, TimeoutError):
            outcomes[f"{i}:{call.__name__}"] = "denied"

    try:
        async with anyio.create_task_group() as tg:
            for i, call in enumerate(FORBIDDEN[role]):
                tg.start_soon(attempt, i, call)
        await anyio.sleep(0.1)  # the last permission errors
    finally:
        await client.nc.close()
    assert set(outcomes.values()) == {"denied"}, outcomes
    assert len([e for e in client.errors if "permissions violation" in e.lower()]) >= len(
        FORBIDDEN[role]
    )
    assert await log_state(server) == before


async def test_each_role_can_do_its_own_job(server: NatsServer) -> None:
    """The control for the denials above: the same calls work for the role that owns them."""
    agent, gateway = await as_role(server, AGENT_A), await as_role(server, "gateway")
    scheduler, service = await as_role(server, "scheduler"), await as_role(server, "service")
    try:
        started = RunStarted(run_id="run_victim", at=2.0, attempt=1, agent_id="a")
        await EventLog(agent.nc).append(started)
        await EventLog(gateway.nc).append(submitted("run_ok"))
        await EventLog(service.nc).append(RunCancelRequested(run_id="run_ok", at=2.5))
        await EventLog(scheduler.nc).append(RunCancelled(run_id="run_ok", at=3.0))
        dispatch = RunDispatched(run_id="run_victim", at=2.0, attempt=2, agent_id="a")
        await EventLog(scheduler.nc).append(dispatch)
        batch = [RunQueued(run_id=r, at=2.0, attempt=1) for r in ("run_q1", "run_q2")]
        await EventLog(scheduler.nc).append(queued_runs(batch, 2.0))
        # the schedulers' heartbeats (one of a release before batches: no batches), heard by
        # the other schedulers and by agents
        heard = await scheduler.nc.subscribe("jetrun.scheduler.heartbeat", max_msgs=1)
        agent_heard = await agent.nc.subscribe("jetrun.scheduler.heartbeat", max_msgs=1)
        await agent.nc.flush()
        await scheduler.nc.publish("jetrun.scheduler.heartbeat", b"{}")
        assert (await heard.next_msg(timeout=DENIED_WITHIN_S)).data == b"{}"
        assert (await agent_heard.next_msg(timeout=DENIED_WITHIN_S)).data == b"{}"
        await scheduler.js.publish(f"$KV.{VIEWS_BUCKET}.run.run_ok", b"{}")
        view = await gateway.js.get_msg(VIEWS_STREAM, subject=f"$KV.{VIEWS_BUCKET}.run.run_ok")
        assert view.data == b"{}"
        direct = await gateway.js.get_msg(
            VIEWS_STREAM, subject=f"$KV.{VIEWS_BUCKET}.run.run_ok", direct=True
        )
        assert direct.data == b"{}"
        admission = Admission(gateway.js, {LIMIT}, lookback_s=3600)
        slot = await admission.try_admit(team="acme", tier="basic", limit=3, run_id="r", now=1.0)
        assert slot is not None
        assert await Admission(scheduler.js, {LIMIT}, lookback_s=3600).release(slot)
        kinds = [s.event.kind for s in await EventLog(service.nc).read("run_ok")]
        assert kinds == ["submitted", "cancel_requested", "cancelled"]
    finally:
        for role in (agent, gateway, scheduler, service):
            await role.nc.close()
    every = agent.errors + gateway.errors + service.errors + scheduler.errors
    assert not [e for e in every if "violation" in e]


async def test_no_role_reads_another_roles_replies(server: NatsServer) -> None:
    spy = await as_role(server, AGENT_A)
    gateway = await server.connect("gateway")
    seen: list[str] = []

    async def on_msg(msg: nats.aio.msg.Msg) -> None:
        seen.append(msg.subject)

    try:
        await spy.nc.subscribe("_INBOX.gateway.>", cb=on_msg)
        await spy.nc.subscribe("_INBOX.>", cb=on_msg)
        await spy.nc.flush()
        await gateway.jetstream().stream_info(EVENTS_STREAM)  # a request with a reply
        await anyio.sleep(0.2)
    finally:
        await gateway.close()
        await spy.nc.close()
    assert seen == []
    assert sum("permissions violation" in e.lower() for e in spy.errors) == 2


async def test_a_role_answers_a_request_it_received_only_within_the_response_window(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A role answers a request once, within ``RESPONSE_WINDOW`` (nats-server's
    ``allow_responses`` expiry; its default, 2 minutes, kept every reply subject delivered to
    a connection that long, one per event for a tail of the log). Here the window is 1 s: the
    gateway's answer at once arrives, its answer 1.5 s late is refused."""
    monkeypatch.setattr(nats_auth, "RESPONSE_WINDOW", "1s")
    async with NatsServer(store_dir=tmp_path / "nats") as server:
        gateway = await as_role(server, "gateway")
        service = await as_role(server, "service")

        async def answer(msg: Msg) -> None:
            if msg.data == b"late":
                await anyio.sleep(1.5)
            await msg.respond(b"re:" + msg.data)

        try:
            await gateway.nc.subscribe(SUBMIT_SUBJECT, cb=answer)
            await gateway.nc.flush()
            reply = await service.nc.request(SUBMIT_SUBJECT, b"now", timeout=5)
            assert reply.data == b"re:now"
            with pytest.raises(nats.errors.TimeoutError):
                await service.nc.request(SUBMIT_SUBJECT, b"late", timeout=3)
            with anyio.fail_after(5):
                while not any("permissions violation" in e.lower() for e in gateway.errors):
                    await anyio.sleep(0.05)
        finally:
            await gateway.nc.close()
            await service.nc.close()
    assert not service.errors


async def test_anonymous_and_unknown_clients_are_refused(
    server: NatsServer, tmp_path: Path
) -> None:
    with pytest.raises(NatsRefused, match="anonymous"):
        await connect(server.url, "anonymous")
    raw = Client()
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await raw.connect(server.url, allow_reconnect=False, max_reconnect_attempts=0)
    await raw.close()
    stranger = tmp_path / "stranger.nk"
    stranger.write_bytes(nkeys.encode_seed(b"\1" * 32, nkeys.PREFIX_BYTE_USER))
    with pytest.raises(NatsRefused, match="service"):
        await connect(server.url, "stranger", Credentials(role="service", seed_file=stranger))


async def test_credential_errors_never_show_the_seed(tmp_path: Path) -> None:
    bad = tmp_path / "bad.nk"
    bad.write_text("SUAXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX")
    with pytest.raises(ValueError) as caught:
        await connect("nats://127.0.0.1:1", "x", Credentials(role="agent", seed_file=bad))
    assert "SUAX" not in str(caught.value) and "not a valid nkey" in str(caught.value)
    with pytest.raises(ValueError, match="cannot read"):
        Credentials(role="agent", seed_file=tmp_path / "missing.nk").check()


def test_seeds_are_owner_only_and_kept(tmp_path: Path) -> None:
    from runtime.infra.nats_auth import generate_keys

    first = generate_keys(tmp_path / "creds")
    assert generate_keys(tmp_path / "creds") == first  # a restart keeps the same identities
    assert sorted(first) == sorted(ROLES)
    assert (tmp_path / "creds").stat().st_mode & 0o777 == 0o700
    for role in ROLES:
        assert (tmp_path / "creds" / f"{role}.nk").stat().st_mode & 0o777 == 0o600


def test_only_admin_may_manage_streams() -> None:
    for role in (*ROLES, AGENT_A):
        allowed = permissions(role).publish
        manages = [s for s in allowed if ".STREAM.CREATE" in s or ".STREAM.DELETE" in s]
        manages += [s for s in allowed if ".STREAM.PURGE" in s or ".STREAM.UPDATE" in s]
        assert bool(manages or ">" in allowed) == (role == "admin"), role
    assert authorization_block({}).count("nkey") == 0  # no user at all: nobody gets in


async def test_services_wait_for_streams_the_admin_step_creates(tmp_path: Path) -> None:
    async with NatsServer(store_dir=tmp_path / "nats") as server:
        nc = await server.connect("gateway")
        log = EventLog(nc, LogSettings(setup_deadline_s=0.5))
        try:
            with pytest.raises(RuntimeError, match="jetrun setup"):
                await log.require()
            admin = await server.connect("admin")
            await provision(admin, CONFIG, LogSettings())
            await admin.close()
            await log.require()
            info = await log.js.stream_info(EVENTS_STREAM)
            assert info.config.retention == api.RetentionPolicy.LIMITS
        finally:
            await nc.close()
