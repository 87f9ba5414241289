"""Bodies of the v4 HTTP API that are not runs themselves."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from contracts.run import Run
from contracts.scaling import AnyScalingEvent, ReplicaView, ScalingSettings
from contracts.values import File, IOType, RunIO

# One rule for keys: an unknown key is a 422 naming it, at the top level and inside input and
# file objects. Known beside jetrun's own: what Mystic's SDK sends in every call (``run_id``,
# which must be null, and per input ``file_name``, ``file_path``, ``file_url``).


class FileInput(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    url: str | None = None
    path: str | None = None
    name: str | None = None


class RunInput(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One input of ``POST /v4/runs``: jetrun's ``{type, value, file}``, plus the file fields
    Mystic's SDK sends flat (they make the ``file`` of a ``file`` input)."""

    type: IOType
    value: Any = None
    file: FileInput | None = None
    file_name: str | None = None
    file_path: str | None = None
    file_url: str | None = None

    def flat_file(self) -> File | None:
        """The file the flat Mystic fields describe, or None if they are all null."""
        if self.file_name is None and self.file_path is None and self.file_url is None:
            return None
        return File(url=self.file_url, path=self.file_path, name=self.file_name)

    def to_io(self) -> RunIO:
        nested = self.file
        file = File(url=nested.url, path=nested.path, name=nested.name) if nested else None
        return RunIO(type=self.type, value=self.value, file=file or self.flat_file())


class RunCreate(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``POST /v4/runs``. ``wait_for_resources=None`` means: false for sync, true for async.
    ``run_id`` is accepted only as null (Mystic's SDK sends it) and ignored."""

    pipeline: str
    inputs: list[RunInput] = msgspec.field(default_factory=list)
    async_run: bool = False
    wait_for_resources: bool | None = None
    run_id: None = None
    # POSTed the ended run, signed (see docs/webhooks in the README); http or https
    callback_url: Annotated[str, msgspec.Meta(max_length=2048)] | None = None

    def waits_for_resources(self) -> bool:
        if self.wait_for_resources is None:
            return self.async_run
        return self.wait_for_resources

    def run_inputs(self) -> list[RunIO]:
        return [item.to_io() for item in self.inputs]


class ErrorDetail(msgspec.Struct, frozen=True, kw_only=True):
    code: str
    message: str
    field: str | None = None


class ConcurrencyLimitDetail(msgspec.Struct, frozen=True, kw_only=True):
    code: str = "concurrency_limit"
    tier: str
    limit: int
    active: int
    message: str = ""


class ErrorBody(msgspec.Struct, frozen=True, kw_only=True):
    detail: ErrorDetail | ConcurrencyLimitDetail | Any


class Scaling(msgspec.Struct, frozen=True, kw_only=True):
    """``GET /v4/pipelines/{pointer}/scaling``."""

    current_replicas: int
    desired_replicas: int
    current_pipeline_states: dict[str, int]
    pipeline: str = ""
    pipeline_id: str = ""
    autoscaled: bool = False  # False: always on (every agent that can serve it loads it)
    settings: ScalingSettings | None = None
    replicas: list[ReplicaView] = msgspec.field(default_factory=list)


class Health(msgspec.Struct, frozen=True, kw_only=True):
    status: str
    checks: dict[str, bool] = msgspec.field(default_factory=dict)


class RunList(msgspec.Struct, frozen=True, kw_only=True):
    """``GET /v4/runs``: the team's runs, newest first; ``next_cursor`` fetches the next page
    (``None`` on the last one)."""

    runs: list[Run]
    next_cursor: str | None = None


class ScalingHistory(msgspec.Struct, frozen=True, kw_only=True):
    """``GET /v4/pipelines/{pointer}/scaling/history``: its scaling events, oldest first."""

    pipeline: str
    events: list[AnyScalingEvent]
