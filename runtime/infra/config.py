"""jetrun's TOML config: teams, their tokens and tiers, tier limits, and service timings.

Example (see ``examples/jetrun.toml``)::

    [tiers]              # concurrent runs per tier; "unlimited" for no cap
    basic = 3
    [teams.acme]
    tier = "basic"
    tokens = ["jr_acme_secret"]   # or its hash: "sha256:<hex>" (``jetrun hash-token``)
"""

from __future__ import annotations

import hashlib
import hmac
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any

import msgspec

DEFAULT_TIERS: dict[str, int | None] = {
    "basic": 3,
    "starter": 5,
    "pro": 12,
    "startup": None,
    "byoc": None,
}

TEAM_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
DEMO_TOKEN = "jr_demo_token"
DEMO_ADMIN_TOKEN = "jr_demo_admin"  # jetrun up without --config: /metrics, the admin dashboard
DEMO_WEBHOOK_SECRET = "whsec_jetrun_demo_secret"


class ConfigError(ValueError):
    """The config file is invalid; the message names the key (never a token)."""


HASH_PREFIX = "sha256:"
_HASHED = re.compile(r"^sha256:[0-9a-f]{64}$")


def token_digest(token: str) -> str:
    """What a bearer token is checked against: ``sha256:<hex>``. Tokens are random secrets, so
    a fast hash is enough (nothing to brute-force); the config may store this instead."""
    return HASH_PREFIX + hashlib.sha256(token.encode()).hexdigest()


def _configured_digest(entry: str) -> str:
    """A config entry, plain or already hashed, as a digest."""
    lowered = entry.lower()
    if lowered.startswith(HASH_PREFIX):
        if not _HASHED.match(lowered):
            raise ConfigError("a token hash is 'sha256:' followed by 64 hex digits")
        return lowered
    return token_digest(entry)


class Team(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    tier: str
    tokens: list[str]
    webhook_secret: str | None = None  # signs this team's callbacks; none: no callbacks


class WebhookSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``[webhooks]``: where callbacks may go, and how hard to try."""

    allow_private: bool = False  # loopback, private, link-local, ... addresses
    allowed_hosts: list[str] = msgspec.field(default_factory=list)  # names, IPs or CIDRs
    only_allowed_hosts: bool = False  # nothing but allowed_hosts
    max_attempts: int = 8
    initial_backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    timeout_s: float = 10.0  # one POST
    concurrency: int = 16  # deliveries in flight, shared fairly by the teams
    team_concurrency: int = 4  # one team's deliveries in flight (a slow endpoint holds no more)


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    lookback_s: float = 86_400.0  # admission counts non-terminal runs created this recently
    resource_wait_timeout_s: float = 300.0
    node_loss_timeout_s: float = 10.0
    # a pipeline's runs may wait in an agent's queue (dispatched while every slot is busy)
    # only while its typical attempt is shorter than this: a run waiting there waits behind
    # the attempts running there (see runtime.control.slots); 0: never
    short_attempt_s: Annotated[float, msgspec.Meta(ge=0)] = 0.05
    # and only while a run dispatched there is expected to start within this: the runs waiting
    # there, and one more, over how many attempts the agent ended per second recently (so
    # about the longest any team's run waits there behind others; runtime.control.slots)
    agent_queue_wait_s: Annotated[float, msgspec.Meta(ge=0)] = 0.02
    heartbeat_interval_s: float = 1.0
    max_body_bytes: int = 1_048_576
    sync_wait_s: float = 600.0  # a sync POST waits this long, then answers 202 like async
    settle_s: float = 1.0  # an async POST waits this long for the run to be queued
    release_grace_s: float = 30.0  # an admission slot with no run after this is leaked
    request_deadline_s: float = 10.0  # a request retries an unreachable NATS this long, then 503
    shutdown_grace_s: float = 5.0  # open HTTP requests and streams get this long at shutdown
    http_header_timeout_s: float = 10.0  # a connection must send a request head within this
    http_max_connections: int = 4096  # open HTTP connections (also kept below the fd limit)
    http_keepalive_s: float = 5.0  # an idle keep-alive connection is closed after this
    http_max_head_bytes: int = 65_536  # a request line and headers; past it 431
    # followed logs and streamed runs a team may hold open per gateway process (429 past it)
    max_streams_per_team: Annotated[int, msgspec.Meta(ge=1)] = 32
    scale_tick_s: float = 0.5  # the autoscaler decides this often
    node_cooldown_s: float = 60.0  # a node a provider added is released after idling this long
    node_boot_timeout_s: float = 300.0  # a requested node not registered by then is released
    max_nodes: int = 4  # nodes a provider may have added at once
    scaling_operators: list[str] = msgspec.field(default_factory=list)  # teams that may change
    # any pipeline's scaling settings (a team may always change its own: ``team/...``)
    replay_deadline_s: float = 300.0  # a starting service replays the log this long, then exits
    # requests per second one bearer token may make to one gateway process, and its burst
    # (429 rate_limited with Retry-After past it); 0 turns the limit off
    rate_limit_per_s: Annotated[float, msgspec.Meta(ge=0)] = 200.0
    rate_limit_burst: Annotated[float, msgspec.Meta(ge=1)] = 400.0
    keep_ended_s: float = 300.0  # an ended run stays in memory this long (then: its stored view)
    checkpoint_every_s: float = 5.0  # the scheduler records where a restart may start this often
    # retention, applied by ``jetrun admin apply-retention`` (0: kept for ever)
    events_max_age_s: float = 0.0  # run events (and pipelines' logs)
    views_max_age_s: float = 0.0  # stored views of ended runs


class Config(msgspec.Struct, frozen=True, kw_only=True):
    tiers: dict[str, int | None]
    teams: dict[str, Team]
    settings: Settings = Settings()
    by_token: dict[str, Team] = msgspec.field(default_factory=dict)  # token digest -> team
    admin_tokens: frozenset[str] = frozenset()  # digests of [admin] tokens (admin views)
    webhooks: WebhookSettings = WebhookSettings()

    def team_for_token(self, token: str) -> Team | None:
        """The team a bearer token names."""
        return self.team_for_digest(token_digest(token))

    def team_for_digest(self, digest: str) -> Team | None:
        """The team whose token has this digest (``token_digest``). It is compared with every
        configured digest in constant time (no early exit), so timing tells nothing about how
        much of a real token a guess matches."""
        found = None
        for known, team in self.by_token.items():
            if hmac.compare_digest(digest.encode(), known.encode()):
                found = team
        return found

    def is_admin(self, token: str) -> bool:
        digest = token_digest(token).encode()
        return any(hmac.compare_digest(digest, t.encode()) for t in self.admin_tokens)

    def limit(self, tier: str) -> int | None:
        return self.tiers[tier]


def demo_config() -> Config:
    """What ``jetrun up`` runs with when no config file is given: one demo team (whose
    callbacks are signed with ``DEMO_WEBHOOK_SECRET`` and may go to this machine) and an admin
    token."""
    demo = {"tier": "pro", "tokens": [DEMO_TOKEN], "webhook_secret": DEMO_WEBHOOK_SECRET}
    return parse(
        {
            "teams": {"demo": demo},
            "admin": {"tokens": [DEMO_ADMIN_TOKEN]},
            "webhooks": {"allow_private": True},
        }
    )


def load(path: str | Path) -> Config:
    """Read and check a TOML config file; raises ``ConfigError`` naming the bad key."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"cannot read config {path}: {err}") from err
    return parse(data)


def parse(data: dict[str, Any]) -> Config:
    tiers = dict(DEFAULT_TIERS)
    for name, limit in data.get("tiers", {}).items():
        tiers[name] = _limit(name, limit)
    teams: dict[str, Team] = {}
    seen_tokens: set[str] = set()  # digests
    for name, raw in data.get("teams", {}).items():
        team = _team(name, raw, tiers)
        digests = _digests(f"teams.{name}.tokens", team.tokens)
        if seen_tokens.intersection(digests):
            raise ConfigError(f"teams.{name}.tokens: a token is already used by another team")
        seen_tokens.update(digests)
        teams[name] = team
    try:
        settings = msgspec.convert(data.get("settings", {}), Settings, strict=False)
    except msgspec.ValidationError as err:
        raise ConfigError(f"settings: {err}") from err
    by_token = {_configured_digest(token): team for team in teams.values() for token in team.tokens}
    admin = _admin_tokens(data.get("admin", {}), seen_tokens)
    try:
        webhooks = msgspec.convert(data.get("webhooks", {}), WebhookSettings, strict=False)
    except msgspec.ValidationError as err:
        raise ConfigError(f"webhooks: {err}") from err
    return Config(
        tiers=tiers,
        teams=teams,
        settings=settings,
        by_token=by_token,
        admin_tokens=admin,
        webhooks=webhooks,
    )


def _admin_tokens(raw: Any, team_tokens: set[str]) -> frozenset[str]:
    if not isinstance(raw, dict):
        raise ConfigError("admin: expected a table")
    tokens = raw.get("tokens", [])
    if not isinstance(tokens, list) or not all(isinstance(t, str) and t for t in tokens):
        raise ConfigError("admin.tokens: expected a list of non-empty strings")
    digests = _digests("admin.tokens", tokens)
    if team_tokens.intersection(digests):
        raise ConfigError("admin.tokens: a token is also a team's token")
    return frozenset(digests)


def _digests(key: str, tokens: list[str]) -> set[str]:
    try:
        digests = [_configured_digest(t) for t in tokens]
    except ConfigError as err:
        raise ConfigError(f"{key}: {err}") from None
    if len(set(digests)) != len(digests):
        raise ConfigError(f"{key}: a token is listed twice")
    return set(digests)


def _limit(tier: str, value: Any) -> int | None:
    if value == "unlimited":
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    raise ConfigError(f'tiers.{tier}: expected a positive integer or "unlimited", got {value!r}')


def _team(name: str, raw: Any, tiers: dict[str, int | None]) -> Team:
    if not TEAM_NAME.match(name):
        raise ConfigError(f"teams.{name}: a team name is 1-64 letters, digits, '_' or '-'")
    if not isinstance(raw, dict):
        raise ConfigError(f"teams.{name}: expected a table")
    tier = raw.get("tier")
    if tier not in tiers:
        raise ConfigError(f"teams.{name}.tier: unknown tier {tier!r}; known: {sorted(tiers)}")
    tokens = raw.get("tokens")
    if (
        not isinstance(tokens, list)
        or not tokens
        or not all(isinstance(t, str) and t for t in tokens)
    ):
        raise ConfigError(f"teams.{name}.tokens: expected a non-empty list of strings")
    secret = raw.get("webhook_secret")
    if secret is not None and not (isinstance(secret, str) and len(secret) >= 16):
        raise ConfigError(f"teams.{name}.webhook_secret: expected a string of 16+ characters")
    return Team(name=name, tier=tier, tokens=tokens, webhook_secret=secret)
