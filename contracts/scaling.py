"""Scaling: a deployed pipeline's settings, the states of its replicas, and the scaling events.

A *replica* is a loaded worker of one pipeline on one agent (its ``startup()`` done). The
autoscaler's decisions are events (``ScalingEvent``) on their own stream, one subject per pipeline,
so a pipeline's scaling history can be replayed and shown. Rules as for run events: a new field
gets a default, a field is never retyped, a tag is never reused.
"""

from __future__ import annotations

import enum
import re
from typing import Annotated, ClassVar

import msgspec

_HHMM = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]$")


class ReplicaState(enum.StrEnum):
    booting = "booting"  # a node is being added for it
    loading = "loading"  # its startup() is running on an agent (the cold start)
    ready = "ready"  # it serves runs
    draining = "draining"  # being unloaded: finishes what it runs, takes nothing new
    failed = "failed"  # its startup() raised


class WarmWindow(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Keep ``replicas`` ready every day from ``start`` to ``end`` (``HH:MM``, UTC; a window
    whose end is before its start runs past midnight)."""

    start: str
    end: str
    replicas: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 1

    def __post_init__(self) -> None:
        for name, value in (("start", self.start), ("end", self.end)):
            if not _HHMM.match(value):
                raise ValueError(f"{name}: expected HH:MM (UTC), got {value!r}")

    def covers(self, unix_s: float) -> bool:
        minute = int(unix_s // 60) % (24 * 60)
        start, end = _minutes(self.start), _minutes(self.end)
        if start <= end:
            return start <= minute < end
        return minute >= start or minute < end


def _minutes(hhmm: str) -> int:
    hours, minutes = hhmm.split(":")
    return int(hours) * 60 + int(minutes)


class ScalingSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How a deployed pipeline scales. ``min_replicas = 0`` scales it to zero when idle."""

    min_replicas: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 0
    max_replicas: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 1
    cooldown_s: Annotated[float, msgspec.Meta(ge=0, le=86_400 * 7)] = 300.0
    target_concurrency: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 1  # runs per replica
    warm: list[WarmWindow] = msgspec.field(default_factory=list)
    startup_retries: Annotated[int, msgspec.Meta(ge=0, le=100)] = 3
    startup_backoff_s: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 2.0

    def __post_init__(self) -> None:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})"
            )

    def floor(self, unix_s: float) -> int:
        """Replicas to keep ready at ``unix_s``: ``min_replicas`` or a warm window's count,
        never above ``max_replicas``."""
        warm = max((w.replicas for w in self.warm if w.covers(unix_s)), default=0)
        return min(max(self.min_replicas, warm), self.max_replicas)

    def most_kept(self) -> int:
        """The most replicas these settings keep ready with no traffic (``min_replicas`` or
        the largest warm window), never above ``max_replicas``."""
        warm = max((w.replicas for w in self.warm), default=0)
        return min(max(self.min_replicas, warm), self.max_replicas)

    def backoff_s(self, failures: int) -> float:
        """Wait before the next startup attempt after ``failures`` failed ones (doubling)."""
        return float(self.startup_backoff_s * 2.0 ** max(failures - 1, 0))


class ScalingPatch(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A change to some settings (``PATCH /v4/pipelines/{pointer}/scaling``, ``jetrun
    scaling``): the fields given replace the current ones."""

    min_replicas: int | None = None
    max_replicas: int | None = None
    cooldown_s: float | None = None
    target_concurrency: int | None = None
    warm: list[WarmWindow] | None = None
    startup_retries: int | None = None
    startup_backoff_s: float | None = None

    def apply(self, settings: ScalingSettings) -> ScalingSettings:
        """The patched settings; raises ``msgspec.ValidationError`` naming a bad field."""
        merged = msgspec.to_builtins(settings)
        merged.update({k: v for k, v in msgspec.to_builtins(self).items() if v is not None})
        return msgspec.convert(merged, ScalingSettings)


class ReplicaView(msgspec.Struct, frozen=True, kw_only=True):
    """One replica as the scaling endpoint shows it."""

    agent_id: str
    state: ReplicaState
    gpus: list[int] = msgspec.field(default_factory=list)
    error: str | None = None


class ScalingEvent(msgspec.Struct, frozen=True, kw_only=True, tag_field="event"):
    """A scaling decision or observation about ``pipeline`` (``""``: about a node only)."""

    pipeline: str
    at: float

    kind: ClassVar[str]

    def message_id(self) -> str:
        return f"{self.pipeline}:{self.kind}:{self.at!r}:{self.subject_of()}"

    def subject_of(self) -> str:
        return ""


class DesiredReplicasChanged(ScalingEvent, frozen=True, kw_only=True, tag="desired"):
    kind: ClassVar[str] = "desired"
    desired: int
    current: int
    reason: str = ""


class ReplicaLoadRequested(ScalingEvent, frozen=True, kw_only=True, tag="replica_load"):
    """``agent_id`` is to load a replica of ``pipeline`` on GPUs ``gpus`` (none for CPU)."""

    kind: ClassVar[str] = "replica_load"
    agent_id: str
    gpus: list[int] = msgspec.field(default_factory=list)
    reason: str = ""

    def subject_of(self) -> str:
        return self.agent_id


class ReplicaReady(ScalingEvent, frozen=True, kw_only=True, tag="replica_ready"):
    """A requested replica finished its startup; ``load_s`` is how long it took."""

    kind: ClassVar[str] = "replica_ready"
    agent_id: str
    load_s: float = 0.0

    def subject_of(self) -> str:
        return self.agent_id


class ReplicaFailed(ScalingEvent, frozen=True, kw_only=True, tag="replica_failed"):
    """A replica's ``startup()`` raised; ``failures`` counts this round's failures."""

    kind: ClassVar[str] = "replica_failed"
    agent_id: str
    message: str
    failures: int = 1

    def subject_of(self) -> str:
        return self.agent_id


class ReplicaUnloadRequested(ScalingEvent, frozen=True, kw_only=True, tag="replica_unload"):
    """``agent_id`` is to unload its replica of ``pipeline``: its worker processes exit."""

    kind: ClassVar[str] = "replica_unload"
    agent_id: str
    reason: str = ""

    def subject_of(self) -> str:
        return self.agent_id


class StartupGaveUp(ScalingEvent, frozen=True, kw_only=True, tag="startup_gave_up"):
    """Startup failed ``failures`` times in a row: runs waiting for a replica end with a
    ``startup_error`` carrying ``message``."""

    kind: ClassVar[str] = "startup_gave_up"
    message: str
    failures: int


class NodeRequested(ScalingEvent, frozen=True, kw_only=True, tag="node_requested"):
    """No agent has room for a replica of ``pipeline``: a node provider is to add
    ``node_id`` (the agent id the new node registers under)."""

    kind: ClassVar[str] = "node_requested"
    node_id: str
    accelerator: str = "cpu"
    reason: str = ""

    def subject_of(self) -> str:
        return self.node_id


class NodeReleased(ScalingEvent, frozen=True, kw_only=True, tag="node_released"):
    """An added node idled past the node cooldown (or never came up): remove it."""

    kind: ClassVar[str] = "node_released"
    node_id: str
    reason: str = ""

    def subject_of(self) -> str:
        return self.node_id


class SettingsChanged(ScalingEvent, frozen=True, kw_only=True, tag="settings"):
    kind: ClassVar[str] = "settings"
    settings: ScalingSettings
    by: str = ""


AnyScalingEvent = (
    DesiredReplicasChanged
    | ReplicaLoadRequested
    | ReplicaReady
    | ReplicaFailed
    | ReplicaUnloadRequested
    | StartupGaveUp
    | NodeRequested
    | NodeReleased
    | SettingsChanged
)

_encoder = msgspec.json.Encoder()
_decoder: msgspec.json.Decoder[AnyScalingEvent] = msgspec.json.Decoder(AnyScalingEvent)


def encode_scaling(event: ScalingEvent) -> bytes:
    return _encoder.encode(event)


def decode_scaling(data: bytes) -> AnyScalingEvent:
    """Raises ``msgspec.ValidationError`` or ``msgspec.DecodeError``."""
    return _decoder.decode(data)
