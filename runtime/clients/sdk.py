"""The Python SDK, mirroring the seed's (``pipeline.cloud``) functions, sync and async.

    from runtime.clients.sdk import run_pipeline, get_run, poll_for_run_completion
    result = run_pipeline("demo/echo:v1", "my_input_string", 5)
    print(result.outputs_formatted())

The base URL and token come from arguments or from ``$JETRUN_URL`` (default
``http://127.0.0.1:8080``) and ``$JETRUN_TOKEN``. Python values become typed inputs as the seed
does it (``str`` -> ``string``, ``int`` -> ``integer``, ...).
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import httpx

from contracts.api import RunList
from contracts.logs import RunLogLine, RunLogs, Stream
from contracts.run import Run, RunUpdate
from contracts.states import RunState
from runtime.clients.sdk_wire import (
    DEFAULT_URL,
    ConcurrencyLimitReached,
    JetrunError,
    NoResourcesAvailable,
    RunTimeout,
    body_for,
    check_list,
    check_logs,
    check_run,
    decode_line,
    decode_update,
    headers_for,
    list_params,
    logs_params,
)

__all__ = [
    "AsyncClient",
    "Client",
    "ConcurrencyLimitReached",
    "JetrunError",
    "NoResourcesAvailable",
    "Run",
    "RunList",
    "RunLogLine",
    "RunLogs",
    "RunState",
    "follow_run_logs",
    "get_run",
    "get_run_logs",
    "list_runs",
    "poll_for_run_completion",
    "run_pipeline",
    "shared_client",
    "stream_pipeline",
]


class Client:
    """A blocking client. Calls raise ``JetrunError`` (or a subclass) on API errors."""

    def __init__(
        self, base_url: str | None = None, token: str | None = None, timeout: float = 660.0
    ) -> None:
        self._http = httpx.Client(
            base_url=base_url or os.environ.get("JETRUN_URL", DEFAULT_URL),
            headers=headers_for(token, None),
            timeout=timeout,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run_pipeline(
        self,
        pointer: str,
        *inputs: Any,
        async_run: bool = False,
        wait_for_resources: bool | None = None,
        idempotency_key: str | None = None,
    ) -> Run:
        """Submit a run. Sync (default): blocks until it ends; async: returns it queued."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        body = body_for(pointer, inputs, async_run, wait_for_resources)
        return check_run(self._http.post("/v4/runs", content=body, headers=headers))

    def get_run(self, run_id: str) -> Run:
        return check_run(self._http.get(f"/v4/runs/{run_id}"))

    def list_runs(
        self,
        *,
        pipeline: str | None = None,
        state: str | list[str] | None = None,
        created_after: float | None = None,
        created_before: float | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> RunList:
        """One page of the team's runs, newest first; pass ``next_cursor`` back as
        ``cursor`` for the next page. ``pipeline`` is a pointer or a pipeline id."""
        params = list_params(pipeline, state, created_after, created_before, limit, cursor)
        return check_list(self._http.get("/v4/runs", params=params))

    def iter_runs(
        self,
        *,
        pipeline: str | None = None,
        state: str | list[str] | None = None,
        created_after: float | None = None,
        created_before: float | None = None,
    ) -> Iterator[Run]:
        """Every run of the team matching the filters, newest first, page after page."""
        cursor: str | None = None
        while True:
            page = self.list_runs(
                pipeline=pipeline,
                state=state,
                created_after=created_after,
                created_before=created_before,
                limit=100,
                cursor=cursor,
            )
            yield from page.runs
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def cancel_run(self, run_id: str) -> Run:
        return check_run(self._http.post(f"/v4/runs/{run_id}/cancel"))

    def get_run_logs(self, run_id: str, stream: Stream | None = None) -> RunLogs:
        """What the run's pipeline printed so far, every attempt; each line names its
        ``stream`` (``"stdout"`` or ``"stderr"``), and ``stream=`` keeps only one."""
        params = logs_params(stream, follow=False)
        return check_logs(self._http.get(f"/v4/runs/{run_id}/logs", params=params))

    def follow_run_logs(self, run_id: str, stream: Stream | None = None) -> Iterator[RunLogLine]:
        """Every line so far, then new ones as printed, until the run has ended."""
        url, params = f"/v4/runs/{run_id}/logs", logs_params(stream, follow=True)
        with self._http.stream("GET", url, params=params) as response:
            if response.status_code != 200:
                response.read()
                check_logs(response)
            for line in response.iter_lines():
                if line:
                    yield decode_line(line)

    def poll_for_run_completion(
        self, run_id: str, timeout_secs: float = 300, interval_secs: float = 1.0
    ) -> Run:
        """Poll until the run is terminal; raises ``RunTimeout`` after ``timeout_secs``."""
        deadline = time.monotonic() + timeout_secs
        while True:
            run = self.get_run(run_id)
            if run.state.is_terminal:
                return run
            if time.monotonic() >= deadline:
                raise RunTimeout(run, timeout_secs)
            time.sleep(interval_secs)

    def stream_pipeline(self, pointer: str, *inputs: Any) -> Iterator[RunUpdate]:
        """Submit a run and yield it at every change until it ends; each update carries only
        the outputs new since the previous one (``outputs_start`` is the first one's index)."""
        body = body_for(pointer, inputs, False, None)
        with self._http.stream("POST", "/v4/runs/stream", content=body) as response:
            if response.status_code != 200:
                response.read()
                check_run(response)
            for line in response.iter_lines():
                if line:
                    yield decode_update(line)


class AsyncClient:
    """The same calls, awaitable."""

    def __init__(
        self, base_url: str | None = None, token: str | None = None, timeout: float = 660.0
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url or os.environ.get("JETRUN_URL", DEFAULT_URL),
            headers=headers_for(token, None),
            timeout=timeout,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def run_pipeline(
        self,
        pointer: str,
        *inputs: Any,
        async_run: bool = False,
        wait_for_resources: bool | None = None,
        idempotency_key: str | None = None,
    ) -> Run:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        body = body_for(pointer, inputs, async_run, wait_for_resources)
        return check_run(await self._http.post("/v4/runs", content=body, headers=headers))

    async def get_run(self, run_id: str) -> Run:
        return check_run(await self._http.get(f"/v4/runs/{run_id}"))

    async def list_runs(
        self,
        *,
        pipeline: str | None = None,
        state: str | list[str] | None = None,
        created_after: float | None = None,
        created_before: float | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> RunList:
        params = list_params(pipeline, state, created_after, created_before, limit, cursor)
        return check_list(await self._http.get("/v4/runs", params=params))

    async def cancel_run(self, run_id: str) -> Run:
        return check_run(await self._http.post(f"/v4/runs/{run_id}/cancel"))

    async def get_run_logs(self, run_id: str, stream: Stream | None = None) -> RunLogs:
        params = logs_params(stream, follow=False)
        return check_logs(await self._http.get(f"/v4/runs/{run_id}/logs", params=params))

    async def follow_run_logs(
        self, run_id: str, stream: Stream | None = None
    ) -> AsyncIterator[RunLogLine]:
        url, params = f"/v4/runs/{run_id}/logs", logs_params(stream, follow=True)
        async with self._http.stream("GET", url, params=params) as response:
            if response.status_code != 200:
                await response.aread()
                check_logs(response)
            async for line in response.aiter_lines():
                if line:
                    yield decode_line(line)

    async def poll_for_run_completion(
        self, run_id: str, timeout_secs: float = 300, interval_secs: float = 1.0
    ) -> Run:
        with anyio.move_on_after(timeout_secs):
            while True:
                run = await self.get_run(run_id)
                if run.state.is_terminal:
                    return run
                await anyio.sleep(interval_secs)
        raise RunTimeout(await self.get_run(run_id), timeout_secs)

    async def stream_pipeline(self, pointer: str, *inputs: Any) -> AsyncIterator[RunUpdate]:
        body = body_for(pointer, inputs, False, None)
        async with self._http.stream("POST", "/v4/runs/stream", content=body) as response:
            if response.status_code != 200:
                await response.aread()
                check_run(response)
            async for line in response.aiter_lines():
                if line:
                    yield decode_update(line)


_shared_lock = threading.Lock()
_shared_clients: dict[tuple[int, str, str | None], Client] = {}


def shared_client(base_url: str | None = None, token: str | None = None) -> Client:
    """The ``Client`` the module-level functions use: one per process, base URL and token, kept
    open (keep-alive) so that each call costs one request, not a new connection pool. Thread
    safe; closed at interpreter exit."""
    url = base_url or os.environ.get("JETRUN_URL", DEFAULT_URL)
    key = (os.getpid(), url, token or os.environ.get("JETRUN_TOKEN"))
    with _shared_lock:
        client = _shared_clients.get(key)
        if client is None:
            client = _shared_clients[key] = Client(url, key[2])
        return client


@atexit.register
def _close_shared() -> None:
    with _shared_lock:
        for client in _shared_clients.values():
            client.close()
        _shared_clients.clear()


def run_pipeline(
    pointer: str,
    *inputs: Any,
    async_run: bool = False,
    wait_for_resources: bool | None = None,
    base_url: str | None = None,
    token: str | None = None,
) -> Run:
    """``Client().run_pipeline(...)`` with the URL and token from arguments or the env."""
    return shared_client(base_url, token).run_pipeline(
        pointer, *inputs, async_run=async_run, wait_for_resources=wait_for_resources
    )


def get_run(run_id: str, base_url: str | None = None, token: str | None = None) -> Run:
    return shared_client(base_url, token).get_run(run_id)


def list_runs(
    *,
    pipeline: str | None = None,
    state: str | list[str] | None = None,
    created_after: float | None = None,
    created_before: float | None = None,
    limit: int | None = None,
    cursor: str | None = None,
    base_url: str | None = None,
    token: str | None = None,
) -> RunList:
    """``Client().list_runs(...)``: one page of the team's runs, newest first."""
    with Client(base_url, token) as client:
        return client.list_runs(
            pipeline=pipeline,
            state=state,
            created_after=created_after,
            created_before=created_before,
            limit=limit,
            cursor=cursor,
        )


def poll_for_run_completion(
    run_id: str,
    timeout_secs: float = 300,
    interval_secs: float = 1.0,
    base_url: str | None = None,
    token: str | None = None,
) -> Run:
    return shared_client(base_url, token).poll_for_run_completion(
        run_id, timeout_secs, interval_secs
    )


def stream_pipeline(
    pointer: str, *inputs: Any, base_url: str | None = None, token: str | None = None
) -> Iterator[Run]:
    yield from shared_client(base_url, token).stream_pipeline(pointer, *inputs)


def get_run_logs(
    run_id: str,
    stream: Stream | None = None,
    base_url: str | None = None,
    token: str | None = None,
) -> RunLogs:
    """What the run's pipeline printed, every attempt (``stream=``: only stdout or stderr)."""
    return shared_client(base_url, token).get_run_logs(run_id, stream)


def follow_run_logs(
    run_id: str,
    stream: Stream | None = None,
    base_url: str | None = None,
    token: str | None = None,
) -> Iterator[RunLogLine]:
    """The run's lines so far, then new ones as printed, until it has ended."""
    yield from shared_client(base_url, token).follow_run_logs(run_id, stream)
