"""What the gateway accepts from a request, and the JSON error every refusal answers.

Bad input stops here, before anything is recorded: a body over the size limit (413), bytes that
are not UTF-8 JSON, an unknown key, a wrong type, a pointer that is not one, an integer the wire
cannot carry or a value nested too deep (422, naming the field). Every error, on every route,
is ``{"detail": {"code", "message", "field"?}}``.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from contracts.api import ErrorBody, ErrorDetail, RunCreate
from contracts.names import check_pointer
from contracts.values import IOType, ValueTypeError, check
from runtime.control.submit import Refused

log = logging.getLogger("jetrun.gateway")

_FIELD = re.compile(r"at `\$\.?(?P<path>[^`]*)`")
_UNKNOWN = re.compile(r"Object contains unknown field `(?P<key>[^`]*)`")
_encoder = msgspec.json.Encoder()
_create_decoder = msgspec.json.Decoder(RunCreate)

#: Codes for the errors starlette raises itself (no route, wrong method).
_STATUS_CODES = {404: "not_found", 405: "method_not_allowed"}


class HTTPError(Refused):
    """An error answer: an HTTP status, its JSON detail and headers."""


def error(status: int, code: str, message: str, field: str | None = None) -> HTTPError:
    return HTTPError(status, ErrorDetail(code=code, message=message, field=field))


class JsonResponse(Response):
    """A JSON answer: Starlette's ``Response`` (the same body, status and headers, in the same
    order), its headers made in one step instead of through ``Response.init_headers``."""

    media_type = "application/json"

    def __init__(
        self, body: bytes, status: int = 200, headers: dict[str, str] | None = None
    ) -> None:
        self.status_code = status
        self.background = None
        self.body = body
        raw = (
            [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
            if headers
            else []
        )
        if status < 200 or status in (204, 304) or any(k in _SELF_MADE for k, _ in raw):
            self.init_headers(headers)  # no length for these statuses, or the caller's own
            return
        raw += ((b"content-length", b"%d" % len(body)), (b"content-type", b"application/json"))
        self.raw_headers = raw


_SELF_MADE = frozenset({b"content-length", b"content-type"})


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return JsonResponse(_encoder.encode(body), status, headers)


def error_response(exc: HTTPError | Refused) -> Response:
    return json_response(ErrorBody(detail=exc.detail), exc.status, exc.headers)


async def on_http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (unknown route, wrong method) in the JSON error shape."""
    assert isinstance(exc, HTTPException)
    code = _STATUS_CODES.get(exc.status_code, "bad_request")
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return error_response(
        HTTPError(exc.status_code, ErrorDetail(code=code, message=message), dict(exc.headers or {}))
    )


async def on_unexpected(request: Request, exc: Exception) -> Response:
    """A bug: logged with its traceback, answered in the JSON error shape."""
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(error(500, "internal_error", "the gateway failed; this is a bug"))


def header(request: Request, name: bytes) -> str | None:
    """The request's first ``name`` header (lower-case, as the server gives them), as
    ``request.headers.get`` answers, without making Starlette's ``Headers`` for it."""
    headers: list[tuple[bytes, bytes]] = request.scope["headers"]
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


async def read_body(request: Request, limit: int) -> bytes:
    """The request body; 413 over ``limit`` bytes, 400 if the client went away."""
    declared = header(request, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise error(413, "body_too_large", f"request body is over {limit} bytes")
    chunks, size = [], 0
    receive = request.receive  # the ASGI messages themselves: no generator per request
    while True:
        message = await receive()
        if message["type"] != "http.request":  # http.disconnect
            raise error(400, "client_disconnected", "the request body was cut off")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise error(413, "body_too_large", f"request body is over {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def parse_create(body: bytes) -> RunCreate:
    """The ``POST /v4/runs`` body, checked; raises ``HTTPError`` 422 naming the field."""
    try:
        create = _create_decoder.decode(body)
    except msgspec.ValidationError as err:
        raise _invalid_field(str(err)) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as err:
        raise error(422, "invalid_json", f"malformed JSON body: {err}") from None
    except RecursionError:
        raise error(422, "invalid_json", "the JSON body is nested too deep") from None
    try:
        check_pointer(create.pipeline)
    except ValueError as err:
        raise error(422, "invalid_field", str(err), "pipeline") from None
    for i, item in enumerate(create.inputs):
        _check_input(i, item.to_io(), has_flat_file=item.flat_file() is not None)
    return create


def _invalid_field(text: str) -> HTTPError:
    match = _FIELD.search(text)
    field = match.group("path") if match else None
    unknown = _UNKNOWN.search(text)
    if unknown is not None:  # name the key itself, not the object that holds it
        key = unknown.group("key")
        field = f"{field}.{key}" if field else key
        text = f"unknown key {key!r}" + (f" in {match.group('path')}" if match else "")
    return error(422, "invalid_field", text, field)


def _check_input(i: int, io: Any, *, has_flat_file: bool) -> None:
    where = f"inputs[{i}]"
    if has_flat_file and io.type is not IOType.file:
        message = f"{where}: file_name, file_path and file_url are only for 'file' inputs"
        raise error(422, "invalid_field", message, where)
    try:
        check(io)
    except ValueTypeError as err:
        field = f"{where}.value{err.path}"
        raise error(422, "invalid_field", f"{field}: {err}", field) from None
