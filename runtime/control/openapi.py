"""The gateway's OpenAPI 3.1 document, built from the msgspec types the handlers encode and
decode (``msgspec.json.schema_components``), so the schema cannot disagree with the wire.

Every route of the gateway has one ``Operation`` here; ``tests/test_openapi.py`` fails when a
route is missing from ``OPERATIONS`` or an operation has no route.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

import msgspec

from contracts.api import ErrorBody, Health, RunCreate, RunList, Scaling, ScalingHistory
from contracts.dashboard import Dashboard
from contracts.logs import RunLogs
from contracts.run import Run, RunUpdate
from contracts.scaling import ScalingPatch

JSON = "application/json"
REF = "#/components/schemas/{name}"


@dataclass(frozen=True)
class Param:
    name: str
    where: str  # "query" or "path"
    schema: dict[str, Any]
    description: str
    repeatable: bool = False


@dataclass(frozen=True)
class Operation:
    method: str
    path: str  # OpenAPI form: ``/v4/runs/{run_id}``
    summary: str
    # status -> (description, body type (a tuple: one of them; None: not JSON), media type)
    responses: dict[int, tuple[str, Any, str]]
    body: Any = None
    params: list[Param] = field(default_factory=list)
    auth: bool = True


DOCS_HTML = (files("runtime") / "static" / "docs.html").read_text()

POINTER = Param("pointer", "path", {"type": "string"}, "user/name:v1, or its pipeline id")
RUN_ID = Param("run_id", "path", {"type": "string"}, "the run's id")
ERR_401 = ("missing, malformed or unknown bearer token", ErrorBody, JSON)
ERR_404_RUN = ("run_not_found: no such run of this team", ErrorBody, JSON)
ERR_422 = ("invalid_json, invalid_field (named in detail.field)", ErrorBody, JSON)
ERR_503 = ("event_log_unavailable: NATS is unreachable; nothing was recorded", ErrorBody, JSON)
CREATE_ERRORS = {
    401: ERR_401,
    404: ("pipeline_not_found", ErrorBody, JSON),
    413: ("body_too_large", ErrorBody, JSON),
    422: ERR_422,
    429: ("concurrency_limit, with Retry-After; no run was created", ErrorBody, JSON),
}
LIST_PARAMS = [
    Param("pipeline", "query", {"type": "string"}, "a pointer (user/name:v1) or pipeline id"),
    Param("state", "query", {"type": "string"}, "run state(s), comma-separated", True),
    Param("created_after", "query", {"type": "number"}, "Unix seconds, inclusive"),
    Param("created_before", "query", {"type": "number"}, "Unix seconds, exclusive"),
    Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 100}, "page size"),
    Param("cursor", "query", {"type": "string"}, "next_cursor of the previous page"),
]

OPERATIONS: list[Operation] = [
    Operation(
        "post",
        "/v4/runs",
        "Submit a run (sync by default; async_run answers 202 + Location)",
        {
            200: ("the ended run (sync)", Run, JSON),
            202: ("the run, still going (async, or sync past sync_wait_s)", Run, JSON),
            **CREATE_ERRORS,
            503: (
                "no_resources_available (the ended run), or event_log_unavailable (an error)",
                (Run, ErrorBody),
                JSON,
            ),
        },
        body=RunCreate,
    ),
    Operation(
        "get",
        "/v4/runs",
        "List the team's runs, newest first, with filters and cursor pagination",
        {200: ("one page of runs", RunList, JSON), 401: ERR_401, 422: ERR_422},
        params=LIST_PARAMS,
    ),
    Operation(
        "post",
        "/v4/runs/stream",
        "Submit a run and stream it (NDJSON: one run per line after every change, each with only "
        "the outputs new since the previous line)",
        {
            200: (
                "one RunUpdate per line (outputs_start: index of its first output), the last "
                "one terminal",
                RunUpdate,
                "application/x-ndjson",
            )
        }
        | CREATE_ERRORS
        | {429: ("concurrency_limit or too_many_streams, with Retry-After", ErrorBody, JSON)},
        body=RunCreate,
    ),
    Operation(
        "get",
        "/v4/runs/{run_id}",
        "A run with its live queue position",
        {200: ("the run", Run, JSON), 401: ERR_401, 404: ERR_404_RUN},
        params=[RUN_ID],
    ),
    Operation(
        "post",
        "/v4/runs/{run_id}/cancel",
        "Cancel a run",
        {
            200: ("the cancelled run", Run, JSON),
            202: ("cancellation requested, not yet confirmed", Run, JSON),
            401: ERR_401,
            404: ERR_404_RUN,
            409: ("not_cancellable: the run already ended", ErrorBody, JSON),
            503: ERR_503,
        },
        params=[RUN_ID],
    ),
    Operation(
        "get",
        "/v4/runs/{run_id}/logs",
        "What the run's pipeline printed, per attempt, each line naming its stream (stdout "
        "or stderr; stream= keeps one). With follow=1: "
        "one RunLogLine per line (NDJSON), or Server-Sent Events (event: line, then "
        "event: end) when the request accepts text/event-stream, until the run has ended",
        {
            200: ("the run's captured lines", RunLogs, JSON),
            401: ERR_401,
            404: ERR_404_RUN,
            422: ("invalid_field: stream is neither stdout nor stderr", ErrorBody, JSON),
            429: ("too_many_streams: the team holds max_streams_per_team open", ErrorBody, JSON),
        },
        params=[
            RUN_ID,
            Param("follow", "query", {"type": "string", "enum": ["1", "true"]}, "stream"),
            Param(
                "stream",
                "query",
                {"type": "string", "enum": ["stdout", "stderr"]},
                "only this stream's lines",
            ),
        ],
    ),
    Operation(
        "get",
        "/v4/pipelines/{pointer}/scaling",
        "Replicas of a pipeline",
        {
            200: ("current and desired replicas, each replica's state, settings", Scaling, JSON),
            401: ERR_401,
            404: ("pipeline_not_found", ErrorBody, JSON),
            422: (
                "ambiguous_pipeline_id: give the pointer; invalid_field: neither a pointer nor a "
                "pipeline id (field 'pointer')",
                ErrorBody,
                JSON,
            ),
        },
        params=[POINTER],
    ),
    Operation(
        "patch",
        "/v4/pipelines/{pointer}/scaling",
        "Change a pipeline's scaling settings (applies without restarts)",
        {
            200: ("the pipeline's scaling with the new settings", Scaling, JSON),
            401: ERR_401,
            403: ("forbidden: not the pipeline's team nor a scaling operator", ErrorBody, JSON),
            404: ("pipeline_not_found", ErrorBody, JSON),
            422: ERR_422,
        },
        body=ScalingPatch,
        params=[POINTER],
    ),
    Operation(
        "get",
        "/v4/pipelines/{pointer}/scaling/history",
        "A pipeline's scaling decisions, oldest first",
        {
            200: ("the scaling events", ScalingHistory, JSON),
            401: ERR_401,
            403: ("forbidden: not the pipeline's team nor a scaling operator", ErrorBody, JSON),
            404: ("pipeline_not_found", ErrorBody, JSON),
        },
        params=[POINTER],
    ),
    Operation("get", "/healthz", "The process is alive", {200: ("ok", Health, JSON)}, auth=False),
    Operation(
        "get",
        "/readyz",
        "Ready: a run can flow (NATS, event log, store writes, a scheduler heard)",
        {200: ("ready", Health, JSON), 503: ("not ready; checks say why", Health, JSON)},
        auth=False,
    ),
    Operation(
        "get",
        "/openapi.json",
        "This document",
        {200: ("OpenAPI 3.1", None, JSON)},
        auth=False,
    ),
    Operation(
        "get",
        "/v4/dashboard",
        "What the dashboard shows: the team's live runs, queues, agents, recent failures "
        "(every team's for an admin token)",
        {200: ("the dashboard", Dashboard, JSON), 401: ERR_401},
    ),
    Operation(
        "get",
        "/dashboard",
        "The dashboard page (asks for a token; polls /v4/dashboard)",
        {200: ("HTML", None, "text/html")},
        auth=False,
    ),
    Operation(
        "get",
        "/metrics",
        "Prometheus metrics of this gateway (and of the scheduler in jetrun up); admin tokens",
        {
            200: ("Prometheus text exposition", None, "text/plain"),
            401: ERR_401,
            403: ("forbidden: a team token; metrics need an admin token", ErrorBody, JSON),
        },
    ),
    Operation(
        "get", "/docs", "This document as a page", {200: ("HTML", None, "text/html")}, auth=False
    ),
]


def document(operations: list[Operation] | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``operations`` (the gateway's by default)."""
    ops = OPERATIONS if operations is None else operations
    named = [k for op in ops for k in (op.body, *(r[1] for r in op.responses.values()))]
    flat = {t for k in named for t in (k if isinstance(k, tuple) else (k,)) if t is not None}
    types = sorted(flat, key=lambda t: t.__name__)
    refs, components = msgspec.json.schema_components(types, ref_template=REF)
    ref_of = dict(zip(types, refs, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for op in ops:
        paths.setdefault(op.path, {})[op.method] = _operation(op, ref_of)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "jetrun API",
            "version": "4",
            "description": "Runs of ML pipelines for many teams (the v4 runs API).",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _operation(op: Operation, ref_of: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"summary": op.summary, "responses": {}}
    if op.auth:
        out["security"] = [{"bearer": []}]
    if op.params:
        out["parameters"] = [_param(p) for p in op.params]
    if op.body is not None:
        out["requestBody"] = {"required": True, "content": {JSON: {"schema": ref_of[op.body]}}}
    for status, (description, kind, media) in sorted(op.responses.items()):
        response: dict[str, Any] = {"description": description}
        response["content"] = {media: _schema(kind, ref_of)}
        out["responses"][str(status)] = response
    return out


def _schema(kind: Any, ref_of: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    if kind is None:
        return {}
    if isinstance(kind, tuple):
        return {"schema": {"oneOf": [ref_of[k] for k in kind]}}
    return {"schema": ref_of[kind]}


def _param(p: Param) -> dict[str, Any]:
    schema = {"type": "array", "items": p.schema} if p.repeatable else p.schema
    return {
        "name": p.name,
        "in": p.where,
        "required": p.where == "path",
        "description": p.description,
        "schema": schema,
    }
