"""Who may do what on NATS: one nkey identity per role, with least-privilege permissions.

Every jetrun process connects as one of five roles; the nats-server config lists each role's
public nkeys with the subjects it may publish and subscribe to (``authorization_block``).
Anonymous connections are refused (a server with ``users`` has no anonymous user).

- ``admin``: everything; the only role that creates, updates, purges or deletes streams
  (``jetrun setup``) and recalls agents.
- ``gateway``: appends ``submitted``, ``admitted``, ``cancel_requested``; takes and gives back
  admission permits; answers submit requests of platform services.
- ``scheduler``: appends its decisions; gives back permits; answers drain requests.
- ``agent``: appends what an attempt did (``started``, ``output``, results); registers its
  pipelines; heartbeats; reads a dispatched run's ``submitted`` event.
- ``service``: a platform service (``runtime.clients.client``): watches the log, submits through the
  gateways' admission, asks for cancellation; forges nothing.

Replies go to a per-role inbox (``_INBOX.<role>.>``), so no role reads another role's replies.
Seeds (``<role>.nk``) are written owner-only; the server only ever sees public keys, and the
seed never crosses the wire (the server sends a nonce, the client signs it).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys

from contracts.events import ENDED_RUNS_ID
from contracts.names import check_token, is_token
from runtime.infra.streams import CALLBACK_TOKEN, EVENTS_PREFIX, TERMINAL_KINDS

ROLES = ("admin", "gateway", "scheduler", "service", "webhooks")  # one seed each
AGENT = "agent"  # not one identity: each agent has its own (``agent_role``)
AGENTS_DIR = "agents"  # <credentials>/agents/<agent_id>.nk
EVENTS = "JETRUN_EVENTS"
PIPELINES = "JETRUN_PIPELINES"
SCALING = "JETRUN_SCALING"
LOGS = "JETRUN_LOGS"
WEBHOOKS = "JETRUN_WEBHOOKS"
DEAD = "JETRUN_WEBHOOKS_DEAD"
RETRY = "JETRUN_WEBHOOKS_RETRY"  # the outbox's events parked for a retry
VIEWS = "JETRUN_RUNS"  # KV bucket: ended runs' views and the replay checkpoint
LISTING = "JETRUN_LISTING"  # every run per team (the listing index)
SUBMIT_SUBJECT = "jetrun.submit"  # request: a platform service submits a run through admission
# How long a role may answer a request it received (once): nats-server's ``allow_responses``
# ``expires``. Every requester here gives up sooner or at the same time (an agent's drain
# request and ``jetrun recall`` 5 s, a service's submit 30 s by default). nats-server keeps,
# per connection, the reply subject of every message delivered to it for this long, and walks
# them all every 4,096 deliveries: a tail of the log gets one per event, so its default
# (2 minutes) kept ~2 minutes of the log per tailing connection and the walks grew with the
# square of the event rate (at 1,500 runs/s, 20-35 s into a run: 12% of nats-server's CPU).
RESPONSE_WINDOW = "30s"
API = "$JS.API"


class CredentialsError(ValueError):
    """A credential file is missing, unreadable or not an nkey seed (its content is never
    part of the message)."""


def agent_role(agent_id: str) -> str:
    """The identity of one agent (``agent:<agent_id>``). Raises ``ValueError`` for an id that
    is not one subject token."""
    check_token(agent_id, "agent id")
    return f"{AGENT}:{agent_id}"


def agent_of(role: str) -> str | None:
    """The agent id of an agent identity, else None."""
    kind, _, agent_id = role.partition(":")
    return agent_id if kind == AGENT and agent_id else None


def inbox_prefix(role: str) -> str:
    """``_INBOX.<role>``; an agent's is its own (``_INBOX.agent.<agent_id>``)."""
    return f"_INBOX.{role.replace(':', '.', 1)}"  # an agent id (which may hold ':') is one token


def _append(*kinds: str) -> list[str]:
    return [subject for kind in kinds for subject in _kind_subjects(kind)]


def _kind_subjects(kind: str) -> list[str]:
    """The subjects of ``kind``'s events: a terminal kind's of a run with a callback URL end
    with one more token."""
    plain = f"{EVENTS_PREFIX}.*.{kind}"
    return [plain, f"{plain}.{CALLBACK_TOKEN}"] if kind in TERMINAL_KINDS else [plain]


def _read(stream: str) -> list[str]:
    """What a consumer of ``stream`` needs: ordered and pull consumers, flow control."""
    return [
        f"{API}.CONSUMER.CREATE.{stream}",
        f"{API}.CONSUMER.CREATE.{stream}.>",
        f"{API}.CONSUMER.INFO.{stream}.*",
        f"{API}.CONSUMER.MSG.NEXT.{stream}.*",
        f"{API}.CONSUMER.DELETE.{stream}.*",
        f"$JS.FC.{stream}.>",
    ]


_INFO = [f"{API}.INFO", f"{API}.STREAM.INFO.*"]
_READ_LOG = [*_INFO, *_read(EVENTS)]
_READ_CATALOG = [
    *_read(PIPELINES),
    f"{API}.STREAM.MSG.GET.{PIPELINES}",
    f"{API}.DIRECT.GET.{PIPELINES}",
    f"{API}.DIRECT.GET.{PIPELINES}.>",
]
_READ_SCALING = _read(SCALING)
_READ_RUN_LOGS = _read(LOGS)
# the run views bucket: the leading scheduler writes it, gateways read it
_READ_VIEWS = [
    f"{API}.DIRECT.GET.KV_{VIEWS}.>",
    f"{API}.STREAM.MSG.GET.KV_{VIEWS}",
    f"{API}.DIRECT.GET.{LISTING}",
    f"{API}.DIRECT.GET.{LISTING}.>",
]
# Admission permits live on JETRUN_ADMIT_<N> streams (one per tier limit): message get and
# delete on any stream but the log, the catalogue and the scaling log.
_PERMITS = [f"{API}.STREAM.MSG.GET.*", f"{API}.STREAM.MSG.DELETE.*"]
_NOT_THE_LOG = [
    *(
        f"{API}.STREAM.MSG.DELETE.{stream}"
        for stream in (EVENTS, PIPELINES, SCALING, LOGS, LISTING)
    ),
    f"{API}.STREAM.MSG.GET.{EVENTS}",
]


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    publish_deny: tuple[str, ...] = ()
    allow_responses: bool = False  # may answer requests it received (reply subjects)


def permissions(role: str) -> Permissions:
    """The subjects ``role`` may publish (JetStream API calls included) and subscribe to.
    Raises ``KeyError`` for an unknown role."""
    inbox = (f"{inbox_prefix(role)}.>",)
    table: dict[str, Permissions] = {
        "admin": Permissions(publish=(">",), subscribe=(">",), allow_responses=True),
        "gateway": Permissions(
            publish=(
                *_READ_LOG,
                *_READ_CATALOG,
                *_READ_SCALING,
                *_READ_RUN_LOGS,
                *_PERMITS,
                *_READ_VIEWS,
                f"{API}.DIRECT.GET.{EVENTS}.jetrun.ev.*.submitted",  # an old run, by id
                f"{API}.DIRECT.GET.{EVENTS}.jetrun.ev.*.restated",  # a live run, restated
                *_append("submitted", "admitted", "cancel_requested"),
                "jetrun.admit.*.*",
                "jetrun.streams.*.*",  # a team's open streams, counted over every gateway
                "jetrun.probe.*",  # readiness: the store takes writes
                "jetrun.pipelines.*",  # a team changes its pipeline's scaling settings
                "jetrun.scaling.*.settings",
            ),
            publish_deny=tuple(_NOT_THE_LOG),
            subscribe=(
                *inbox,
                "jetrun.agents.heartbeat.*",
                "jetrun.scheduler.heartbeat",
                SUBMIT_SUBJECT,
            ),
            allow_responses=True,
        ),
        "scheduler": Permissions(
            publish=(
                *_READ_LOG,
                *_READ_CATALOG,
                *_PERMITS,
                *_append(
                    "admitted",
                    "queued",
                    "queued_runs",  # one per decision pass: the runs it queued
                    "waiting",
                    "queue_waiting",  # one per queue: what its queued runs wait for now
                    "failed",
                    "preempted",
                    "requeued",
                    "no_resources",
                    "cancelled",
                    "restated",  # a live run recorded again before its events age out
                    "elected",  # the fence markers of a scheduler that took the lease
                ),
                f"{API}.DIRECT.GET.{EVENTS}.jetrun.ev.*.elected",  # the fence's last markers
                "jetrun.ev.*.dispatched.*",  # a dispatch names its agent
                "jetrun.scheduler.heartbeat",
                "$KV.JETRUN_LEASES.>",  # the scheduler lease: one decides at a time
                f"{API}.DIRECT.GET.KV_JETRUN_LEASES.>",
                f"$KV.{VIEWS}.>",  # run views and the checkpoint (the lease holder only)
                "jetrun.listing.>",  # the run history: one entry per run
                *_READ_VIEWS,
                *_READ_SCALING,
                "jetrun.scaling.>",  # the autoscaler's decisions (not teams' settings)
            ),
            publish_deny=(*_NOT_THE_LOG, "jetrun.scaling.*.settings"),
            subscribe=(
                *inbox,
                "jetrun.agents.heartbeat.*",
                "jetrun.agents.drain.*",
                "jetrun.scheduler.heartbeat",  # another of a release before batches: none
            ),
            allow_responses=True,
        ),
        "webhooks": Permissions(  # the webhook deliverer (``jetrun webhooks``)
            publish=(
                *_READ_LOG,
                *_read(WEBHOOKS),
                *_read(DEAD),
                *_read(RETRY),
                f"{API}.CONSUMER.DURABLE.CREATE.{EVENTS}.*",
                f"{API}.CONSUMER.DURABLE.CREATE.{WEBHOOKS}.*",
                f"{API}.CONSUMER.DURABLE.CREATE.{RETRY}.*",
                f"$JS.ACK.{EVENTS}.>",
                f"$JS.ACK.{WEBHOOKS}.>",
                f"$JS.ACK.{RETRY}.>",
                "jetrun.webhooks.>",
                # a run's team, before its event is handled (the outbox's lanes)
                f"{API}.DIRECT.GET.{EVENTS}.jetrun.ev.*.submitted",
                f"{API}.DIRECT.GET.{EVENTS}.jetrun.ev.*.restated",
                f"{API}.STREAM.MSG.GET.{DEAD}",
                f"{API}.STREAM.MSG.DELETE.{DEAD}",
            ),
            subscribe=inbox,
        ),
        "service": Permissions(
            publish=(*_READ_LOG, *_append("cancel_requested"), SUBMIT_SUBJECT),
            subscribe=inbox,
        ),
    }
    agent_id = agent_of(role)
    return agent_permissions(agent_id) if agent_id is not None else table[role]


# What an agent reads of the log: the dispatches addressed to it, and the ends of runs it may be
# running (cancelled, or declared lost). Each through the filtered consumer create call, whose
# subject carries the filter (nats-server checks it against the request).
AGENT_READS = ("cancelled", "preempted", "requeued")


def _consumer_with_filter(stream: str, subject: str) -> str:
    return f"{API}.CONSUMER.CREATE.{stream}.*.{subject}"


def agent_permissions(agent_id: str) -> Permissions:
    """One agent's identity: it reads only its own dispatches (and the cancellations and
    requeues of any run, which carry no inputs), heartbeats and answers recalls only as
    itself, and appends what an attempt did. Raises ``ValueError`` for a bad id."""
    check_token(agent_id, "agent id")
    reads = [f"{EVENTS_PREFIX}.*.dispatched.{agent_id}"]
    reads += [subject for kind in AGENT_READS for subject in _kind_subjects(kind)]
    return Permissions(
        publish=(
            *_INFO,
            *(_consumer_with_filter(EVENTS, subject) for subject in reads),
            f"$JS.FC.{EVENTS}.>",
            *_READ_CATALOG,
            *_READ_SCALING,
            # inputs too large to be repeated in a dispatch are read back by run id (from the
            # run's restatement once its submitted event aged out)
            f"{API}.DIRECT.GET.{EVENTS}.jetrun.ev.*.submitted",
            f"{API}.DIRECT.GET.{EVENTS}.jetrun.ev.*.restated",
            *_append("started", "output", "completed", "failed", "timed_out"),
            # its own batches of ends (no other identity may publish there)
            f"{EVENTS_PREFIX}.{ENDED_RUNS_ID}.ended_runs.{agent_id}",
            "jetrun.pipelines.*",
            "jetrun.logs.*.*",  # what an attempt printed
            f"jetrun.agents.heartbeat.{agent_id}",
            f"jetrun.agents.drain.{agent_id}",
        ),
        subscribe=(
            f"{inbox_prefix(agent_role(agent_id))}.>",
            f"jetrun.agents.recall.{agent_id}",
            "jetrun.scheduler.heartbeat",  # one of a release before batches: ends go alone
        ),
        allow_responses=True,
    )


# --- server side -------------------------------------------------------------------------


def _quoted(subjects: Sequence[str]) -> str:
    return "[" + ", ".join(f'"{s}"' for s in subjects) + "]"


def _user(key: str, perms: Permissions) -> str:
    publish = f"allow: {_quoted(perms.publish)}"
    if perms.publish_deny:
        publish += f", deny: {_quoted(perms.publish_deny)}"
    responses = (
        f', allow_responses: {{ max: 1, expires: "{RESPONSE_WINDOW}" }}'
        if perms.allow_responses
        else ""
    )
    return (
        f'    {{ nkey: "{key}", permissions: {{ publish: {{ {publish} }}, '
        f"subscribe: {{ allow: {_quoted(perms.subscribe)} }}{responses} }} }}"
    )


def authorization_block(users: Mapping[str, Sequence[str]]) -> str:
    """The nats-server ``authorization`` block: each role's public nkeys and permissions
    (``users`` maps a role, or an agent identity ``agent:<id>``, to its public keys)."""
    agents = sorted(role for role in users if agent_of(role) is not None)
    lines = [
        _user(key, permissions(role)) for role in (*ROLES, *agents) for key in users.get(role, ())
    ]
    return "authorization {\n  users = [\n" + "\n".join(lines) + "\n  ]\n}\n"


def write_private(path: Path, data: bytes) -> None:
    """Create ``path`` readable and writable by its owner only (never world- or group-)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(path, 0o600)


def seed_path(directory: Path, role: str) -> Path:
    """``<directory>/<role>.nk``; an agent's: ``<directory>/agents/<agent_id>.nk``."""
    agent_id = agent_of(role)
    if agent_id is not None:
        return Path(directory) / AGENTS_DIR / f"{agent_id}.nk"
    return Path(directory) / f"{role}.nk"


def _new_seed(path: Path) -> None:
    write_private(path, nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))


def mint_agent(directory: Path, agent_id: str) -> Path:
    """A seed of its own for agent ``agent_id`` in ``<directory>/agents`` (mode 0700, file
    0600), kept if already there. Returns its path. The servers accept it once their
    authorization block lists it (``authorization_block(public_keys(directory))``, then a
    config reload). Raises ``ValueError`` for an id that is not one subject token."""
    path = seed_path(directory, agent_role(agent_id))
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    if not path.exists():
        _new_seed(path)
    return path


def generate_keys(directory: Path) -> dict[str, list[str]]:
    """A seed per role in ``directory`` (mode 0700, files 0600), kept if already there.
    Returns each role's public key. Idempotent."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    for role in ROLES:
        path = seed_path(directory, role)
        if not path.exists():
            _new_seed(path)
    return public_keys(directory)


def public_keys(directory: Path) -> dict[str, list[str]]:
    """Each role's public key, from the seeds in ``directory`` (roles without a seed are
    left out), and each minted agent's (as ``agent:<id>``)."""
    found: dict[str, list[str]] = {}
    for role in ROLES:
        path = seed_path(directory, role)
        if path.exists():
            found[role] = [public_key(path)]
    for path in sorted((Path(directory) / AGENTS_DIR).glob("*.nk")):
        if is_token(path.stem):
            found[agent_role(path.stem)] = [public_key(path)]
    return found


def public_key(seed_file: Path) -> str:
    """The public key of a seed file; raises ``CredentialsError`` (without the content)."""
    try:
        seed = Path(seed_file).read_bytes().strip()
        return str(nkeys.from_seed(bytearray(seed)).public_key.decode())
    except OSError as err:
        raise CredentialsError(f"cannot read nkey seed {seed_file}: {err.strerror}") from None
    except (nkeys.NkeysError, ValueError, TypeError):
        raise CredentialsError(f"{seed_file} is not a valid nkey user seed") from None


# --- client side -------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """How one process proves who it is: its role (for the inbox prefix), its seed file, and
    the CA that signed the servers' TLS certificates (``None``: no TLS)."""

    role: str
    seed_file: Path | None = None
    ca_file: Path | None = None

    @classmethod
    def from_dir(cls, directory: Path, role: str, ca_file: Path | None = None) -> Credentials:
        return cls(role=role, seed_file=seed_path(directory, role), ca_file=ca_file)

    def check(self) -> None:
        """Fail early and clearly if a file is missing or invalid (contents never shown)."""
        if self.seed_file is not None:
            public_key(self.seed_file)
        if self.ca_file is not None and not Path(self.ca_file).is_file():
            raise CredentialsError(f"TLS CA file {self.ca_file} does not exist")

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect``."""
        options: dict[str, Any] = {"inbox_prefix": inbox_prefix(self.role)}
        if self.seed_file is not None:
            options["nkeys_seed"] = str(self.seed_file)
        if self.ca_file is not None:
            options["tls"] = ssl.create_default_context(cafile=str(self.ca_file))
        return options
