"""The error object of a failed run."""

from __future__ import annotations

import enum

import msgspec


class ErrorType(enum.StrEnum):
    input_error = "input_error"
    pipeline_error = "pipeline_error"
    startup_error = "startup_error"
    pipeline_loading = "pipeline_loading"
    timeout = "timeout"
    oom = "oom"
    cuda_oom = "cuda_oom"
    cuda_error = "cuda_error"
    unknown = "unknown"


class RunError(msgspec.Struct, frozen=True, kw_only=True):
    type: ErrorType
    message: str
    traceback: str | None = None

    def json(self, indent: int = 0) -> str:
        """The error as JSON text (the seed prints ``result.error.json(indent=2)``)."""
        data = msgspec.json.encode(self)
        return msgspec.json.format(data, indent=indent).decode()
