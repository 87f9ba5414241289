"""The SDK's side of the HTTP API: its errors, how a call is encoded and how an answer is
decoded (``runtime.clients.sdk`` builds the clients on these)."""

from __future__ import annotations

import os
from typing import Any

import httpx
import msgspec

from contracts.api import RunList
from contracts.logs import RunLogLine, RunLogs
from contracts.run import Run, RunUpdate
from contracts.values import from_python

DEFAULT_URL = "http://127.0.0.1:8080"
_run_decoder = msgspec.json.Decoder(Run)
_list_decoder = msgspec.json.Decoder(RunList)
_logs_decoder = msgspec.json.Decoder(RunLogs)
_line_decoder = msgspec.json.Decoder(RunLogLine)
_update_decoder = msgspec.json.Decoder(RunUpdate)


class JetrunError(Exception):
    """The API answered with an error: ``status`` and the ``detail`` object."""

    def __init__(self, status: int, detail: Any) -> None:
        message = detail.get("message") if isinstance(detail, dict) else None
        super().__init__(f"HTTP {status}: {message or detail}")
        self.status, self.detail = status, detail


class NoResourcesAvailable(JetrunError):
    """No replica of the pipeline was alive (or came alive in time); ``run`` is the ended run."""

    def __init__(self, run: Run) -> None:
        message = run.error.message if run.error is not None else run.pipeline
        super().__init__(503, {"code": "no_resources_available", "message": message})
        self.run = run


class ConcurrencyLimitReached(JetrunError):
    """The team is at its tier's limit; no run was created. Retry after ``retry_after`` s."""

    def __init__(self, detail: dict[str, Any], retry_after: float) -> None:
        super().__init__(429, detail)
        self.tier: str = detail.get("tier", "")
        self.limit: int = detail.get("limit", 0)
        self.active: int = detail.get("active", 0)
        self.retry_after = retry_after


class RunTimeout(JetrunError):
    """``poll_for_run_completion`` gave up; ``run`` is the last state seen."""

    def __init__(self, run: Run, timeout_secs: float) -> None:
        super().__init__(408, {"message": f"run {run.id} not done after {timeout_secs} s"})
        self.run = run


def body_for(
    pointer: str, inputs: tuple[Any, ...], async_run: bool, wait_for_resources: bool | None
) -> bytes:
    return msgspec.json.encode(
        {
            "pipeline": pointer,
            "inputs": [from_python(i) for i in inputs],
            "async_run": async_run,
            "wait_for_resources": wait_for_resources,
        }
    )


def check_run(response: httpx.Response) -> Run:
    if response.status_code in (200, 202):
        return _run_decoder.decode(response.content)
    if response.status_code == 503 and response.content.startswith(b'{"id"'):
        raise NoResourcesAvailable(_run_decoder.decode(response.content))
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = response.text
    if response.status_code == 429:
        raise ConcurrencyLimitReached(detail, float(response.headers.get("retry-after", "1")))
    raise JetrunError(response.status_code, detail)


def list_params(
    pipeline: str | None,
    state: str | list[str] | None,
    created_after: float | None,
    created_before: float | None,
    limit: int | None,
    cursor: str | None,
) -> dict[str, Any]:
    params = {
        "pipeline": pipeline,
        "state": [state] if isinstance(state, str) else state,
        "created_after": created_after,
        "created_before": created_before,
        "limit": limit,
        "cursor": cursor,
    }
    return {k: v for k, v in params.items() if v is not None}


def logs_params(stream: str | None, *, follow: bool) -> dict[str, str]:
    params = {"follow": "1"} if follow else {}
    if stream is not None:
        params["stream"] = stream
    return params


def check_list(response: httpx.Response) -> RunList:
    if response.status_code == 200:
        return _list_decoder.decode(response.content)
    check_run(response)
    raise JetrunError(response.status_code, response.text)


def check_logs(response: httpx.Response) -> RunLogs:
    if response.status_code == 200:
        return _logs_decoder.decode(response.content)
    check_run(response)
    raise JetrunError(response.status_code, response.text)


def headers_for(token: str | None, idempotency_key: str | None) -> dict[str, str]:
    token = token or os.environ.get("JETRUN_TOKEN")
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if idempotency_key:
        headers["Idempotency-Key"] = idempotency_key
    return headers


def decode_line(line: str | bytes) -> RunLogLine:
    """One NDJSON line of a followed run log."""
    return _line_decoder.decode(line)


def decode_update(line: str | bytes) -> RunUpdate:
    """One NDJSON line of a streamed run."""
    return _update_decoder.decode(line)
