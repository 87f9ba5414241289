"""Reading a request body (``read_body``) from the ASGI messages: joined across chunks, 413 over
the limit whether declared or streamed, 400 when the client goes away mid-body."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import pytest
from starlette.requests import Request
from starlette.responses import Response

from runtime.control.http_input import HTTPError, header, json_response, read_body

pytestmark = pytest.mark.anyio


def request(messages: list[dict[str, Any]], headers: dict[str, str] | None = None) -> Request:
    pending = list(messages)

    async def receive() -> dict[str, Any]:
        return pending.pop(0)

    raw = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    scope = {"type": "http", "method": "POST", "path": "/v4/runs", "headers": raw}
    return Request(scope, receive)


def part(body: bytes, more: bool) -> dict[str, Any]:
    return {"type": "http.request", "body": body, "more_body": more}


async def refusal(read: Callable[[], Awaitable[bytes]]) -> tuple[int, str]:
    with pytest.raises(HTTPError) as refused:
        await read()
    return refused.value.status, refused.value.detail.code


async def test_a_body_in_chunks_is_joined() -> None:
    assert (
        await read_body(request([part(b"ab", True), part(b"", True), part(b"c", False)]), 3)
        == b"abc"
    )
    assert await read_body(request([part(b"abc", False)]), 3) == b"abc"
    assert await read_body(request([{"type": "http.request"}]), 3) == b""


async def test_over_the_limit_declared_or_streamed_is_413() -> None:
    declared = request([part(b"", False)], {"content-length": "4"})
    assert await refusal(lambda: read_body(declared, 3)) == (413, "body_too_large")
    streamed = request([part(b"ab", True), part(b"cd", True)])  # no length: counted as it comes
    assert await refusal(lambda: read_body(streamed, 3)) == (413, "body_too_large")


async def test_a_client_gone_mid_body_is_400() -> None:
    gone = request([part(b"ab", True), {"type": "http.disconnect"}])
    assert await refusal(lambda: read_body(gone, 10)) == (400, "client_disconnected")


@pytest.mark.parametrize(
    ("status", "headers"),
    [
        (200, None),
        (202, {"Location": "/v4/runs/run_1"}),
        (429, {"Retry-After": "2", "X-Other": "a"}),
        (404, {}),
        (204, None),
        (200, {"Content-Type": "application/problem+json"}),
    ],
)
def test_a_json_answer_has_starlettes_headers_in_starlettes_order(
    status: int, headers: dict[str, str] | None
) -> None:
    body = {"detail": {"code": "x", "message": "ünïcode"}}
    made = json_response(body, status, headers)
    want = Response(msgspec.json.encode(body), status, headers, media_type="application/json")
    assert (made.body, made.status_code, made.raw_headers) == (
        want.body,
        want.status_code,
        want.raw_headers,
    )
    assert made.media_type == "application/json" and made.background is None


def test_a_header_is_read_as_starlettes_headers_get_reads_it() -> None:
    raw = [
        (b"host", b"x"),
        (b"idempotency-key", b"k\xe9-1"),
        (b"idempotency-key", b"k-2"),
        (b"authorization", b"Bearer t"),
    ]
    got = Request({"type": "http", "headers": raw})
    for name in ("idempotency-key", "authorization", "content-length", "host"):
        assert header(got, name.encode()) == got.headers.get(name)
