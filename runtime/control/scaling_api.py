"""The scaling endpoints of the gateway: read a pipeline's replicas, change its settings, show
its scaling history.

``GET /v4/pipelines/{pointer}/scaling`` (any team): current and desired replicas and each
replica's state (booting, loading, ready, draining, failed). ``PATCH`` the same path with a
``ScalingPatch`` (the team that owns the pointer's ``team/`` prefix, or a team listed in
``settings.scaling_operators``): the catalogue entry is rewritten and a ``settings`` event is
logged; the scaler and agents follow the catalogue, so it applies without restarts.
``GET .../scaling/history``: the pipeline's scaling events. ``{pointer}`` may also be the
``pipeline_id`` the API returns (``team/name``), when exactly one version is deployed.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import re
from typing import TYPE_CHECKING, Protocol

import msgspec
from nats.aio.subscription import Subscription

from contracts.agents import AgentHeartbeat, PipelineInfo
from contracts.api import Scaling, ScalingHistory
from contracts.run import pipeline_id_of
from contracts.scaling import (
    AnyScalingEvent,
    ReplicaState,
    ReplicaView,
    ScalingPatch,
    ScalingSettings,
    SettingsChanged,
)
from runtime.control.autoscaler import Memory, Node, Replica, remember, replica_states
from runtime.control.http_input import error, json_response, read_body
from runtime.infra.scalinglog import ScalingLog

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

    from runtime.control.gateway import Gateway

_patch_decoder = msgspec.json.Decoder(ScalingPatch)
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}/[A-Za-z0-9_.-]{1,128}(:[A-Za-z0-9_.-]{1,128})?$")


class ScalingApi:
    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        self.log = ScalingLog(gateway.log.js, replicas=gateway.log.settings.replicas)
        self.memory = Memory()
        self.recent: collections.deque[AnyScalingEvent] = collections.deque(maxlen=50)  # dashboard
        self._subs: list[Subscription] = []
        self._stack = contextlib.AsyncExitStack()

    async def start(self) -> None:
        """Follow the scaling log (for desired replicas and pending loads) and the catalogue
        (so pipeline ids resolve and settings are current)."""
        await self.log.require()
        self._subs = [await self.log.tail(self.gw.guard.wrap("scaling-log tail", self._fold))]
        await self._stack.enter_async_context(self.gw.catalog.following())

    async def stop(self) -> None:
        await self._stack.aclose()
        for sub in self._subs:
            with contextlib.suppress(Exception):  # the connection may be gone
                await sub.unsubscribe()

    async def _fold(self, seq: int, event: AnyScalingEvent) -> None:
        self.memory = remember(self.memory, event)
        self.recent.append(event)

    # --- endpoints ---------------------------------------------------------------------------

    async def get(self, request: Request) -> Response:
        team = self.gw._team(request)
        info = await self.resolve(request.path_params["pointer"])
        return json_response(self.view(info, errors=self.manages(team.name, info.pointer)))

    async def history(self, request: Request) -> Response:
        team = self.gw._team(request)
        info = await self.resolve(request.path_params["pointer"])
        if not self.manages(team.name, info.pointer):  # startup errors are the owner's data
            raise error(
                403, "forbidden", f"team {team.name} may not read the history of {info.pointer}"
            )
        events = await self.log.history(info.pointer)
        return json_response(ScalingHistory(pipeline=info.pointer, events=events))

    async def patch(self, request: Request) -> Response:
        team = self.gw._team(request)
        info = await self.resolve(request.path_params["pointer"])
        if not self.manages(team.name, info.pointer):
            raise error(
                403, "forbidden", f"team {team.name} may not change the scaling of {info.pointer}"
            )
        body = await read_body(request, self.gw.config.settings.max_body_bytes)
        try:
            settings = _patch_decoder.decode(body).apply(info.scaling or ScalingSettings())
        except msgspec.ValidationError as err:
            raise error(422, "invalid_field", str(err)) from None
        except msgspec.DecodeError as err:
            raise error(422, "invalid_json", f"malformed JSON body: {err}") from None
        if team.name not in self.gw.config.settings.scaling_operators:
            limit = self.gw.config.limit(team.tier)
            if over := kept_over_limit(team.name, limit, info.pointer, settings, self.gw.catalog):
                raise error(422, "replica_limit", over, "min_replicas")
        updated = msgspec.structs.replace(info, scaling=settings)
        await self.gw.catalog.register(updated)
        event = SettingsChanged(
            pipeline=info.pointer, at=self.gw.clock.now(), settings=settings, by=team.name
        )
        await self.log.append(event)
        self.memory = remember(self.memory, event)
        return json_response(self.view(updated))

    # --- helpers -----------------------------------------------------------------------------

    def manages(self, team: str, pointer: str) -> bool:
        """The pipeline's own team (its pointer's ``team/`` prefix) or a scaling operator:
        may change its settings and see its startup errors and history."""
        owner = pointer.split("/", 1)[0]
        return team == owner or team in self.gw.config.settings.scaling_operators

    async def resolve(self, pointer: str) -> PipelineInfo:
        """The catalogue entry for a pointer, or for a pipeline id naming one deployed
        version. 404 otherwise (422 when the id names several versions, or is not a name at all)."""
        if not _NAME.match(pointer):  # never a wildcard or a stray token in a subject
            message = f"{pointer[:200]!r} is neither a pointer (user/name:v1) nor a pipeline id"
            raise error(422, "invalid_field", message, "pointer")
        info = await self.gw.catalog.lookup(pointer)
        if info is not None:
            return info
        versions = sorted(
            i.pointer for i in self.gw.catalog.entries() if pipeline_id_of(i.pointer) == pointer
        )
        if len(versions) == 1:
            found = await self.gw.catalog.lookup(versions[0])
            if found is not None:
                return found
        if len(versions) > 1:
            raise error(
                422,
                "ambiguous_pipeline_id",
                f"{pointer} names several versions ({', '.join(versions)}): give the pointer",
            )
        raise error(404, "pipeline_not_found", f"pipeline {pointer} not found")

    def view(self, info: PipelineInfo, *, errors: bool = True) -> Scaling:
        """The scaling of ``info``; replicas' startup errors only if ``errors``."""
        now = self.gw.clock.now()
        nodes = [_node(beat) for beat in self.gw.fleet.live()]
        states = replica_states(info.pointer, nodes, self.memory, now)
        gpus = {
            (r.agent_id): list(r.gpus)
            for n in nodes
            for r in n.replicas
            if r.pipeline == info.pointer
        }
        failed = {
            r.agent_id: r.error
            for n in nodes
            for r in n.replicas
            if r.pipeline == info.pointer and errors
        }
        replicas = [
            ReplicaView(agent_id=a, state=s, gpus=gpus.get(a, []), error=failed.get(a))
            for a, s in states
        ]
        counts: dict[str, int] = {}
        for r in replicas:
            counts[r.state.value] = counts.get(r.state.value, 0) + 1
        current = counts.get(ReplicaState.ready.value, 0)
        if info.scaling is not None:
            desired = self.memory.desired.get(info.pointer, info.scaling.floor(now))
        else:  # always on: every agent that can serve it keeps a replica
            waiting = self.gw.index.queue_depth(info.pointer)
            desired = max(current, 1) if waiting else current
        return Scaling(
            current_replicas=current,
            desired_replicas=desired,
            current_pipeline_states=counts,
            pipeline=info.pointer,
            pipeline_id=pipeline_id_of(info.pointer),
            autoscaled=info.scaling is not None,
            settings=info.scaling,
            replicas=replicas,
        )


class _Entries(Protocol):
    def entries(self) -> list[PipelineInfo]: ...


def kept_over_limit(
    team: str, limit: int | None, pointer: str, settings: ScalingSettings, catalog: _Entries
) -> str | None:
    """Why ``settings`` for ``pointer`` would keep more idle replicas ready for ``team``
    (across its pipelines: ``team/...``) than it may run at once (its tier's ``limit``), or
    None. Replicas kept ready with no traffic hold nodes other teams would otherwise get."""
    if limit is None:
        return None
    others = sum(
        i.scaling.most_kept()
        for i in catalog.entries()
        if i.scaling is not None and i.pointer != pointer and i.pointer.split("/", 1)[0] == team
    )
    wanted = settings.most_kept()
    if others + wanted <= limit:
        return None
    return (
        f"team {team} may keep at most {limit} replicas ready with no traffic (its tier's "
        f"concurrency limit), across its pipelines: {others} elsewhere, {wanted} asked here "
        "(min_replicas or a warm window)"
    )


def _node(beat: AgentHeartbeat) -> Node:
    replicas = tuple(
        Replica(
            p.pointer,
            beat.agent_id,
            ReplicaState(p.status.value),
            tuple(p.gpus),
            error=p.error,
        )
        for p in beat.pipelines
    )
    return dataclasses.replace(Node(beat.agent_id), replicas=replicas)
