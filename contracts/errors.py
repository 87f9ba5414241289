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
