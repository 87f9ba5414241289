"""Typed run inputs and outputs: ``{"type": ..., "value": ...}`` on the wire.

Conversion follows the seed SDK: ``run_pipeline(pointer, "text", 5)`` sends a ``string`` and an
``integer``. ``bool`` is checked before ``int`` because ``True`` is an ``int`` in Python.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec


class IOType(enum.StrEnum):
    string = "string"
    integer = "integer"
    fp = "fp"
    boolean = "boolean"
    dictionary = "dictionary"
    array = "array"
    none = "none"
    file = "file"


class File(msgspec.Struct, frozen=True, kw_only=True):
    """A file input or output: a URL or a path the node can read, and an optional name."""

    url: str | None = None
    path: str | None = None
    name: str | None = None


class RunIO(msgspec.Struct, frozen=True, kw_only=True):
    """One typed input or output value."""

    type: IOType
    value: Any = None
    file: File | None = None


class ValueTypeError(ValueError):
    """A value does not match its declared type, or has no wire type at all."""


_CHECKS: dict[IOType, tuple[type, ...]] = {
    IOType.string: (str,),
    IOType.integer: (int,),
    IOType.fp: (float, int),
    IOType.boolean: (bool,),
    IOType.dictionary: (dict,),
    IOType.array: (list,),
}


def check(io: RunIO) -> None:
    """Raise ``ValueTypeError`` if ``io.value`` does not fit ``io.type``."""
    if io.type is IOType.none:
        if io.value is not None:
            raise ValueTypeError(f"type 'none' takes a null value, got {_kind(io.value)}")
        return
    if io.type is IOType.file:
        if io.file is None and not isinstance(io.value, str):
            raise ValueTypeError("type 'file' needs a 'file' object or a string URL as value")
        return
    expected = _CHECKS[io.type]
    value = io.value
    wrong_bool = isinstance(value, bool) and bool not in expected
    if wrong_bool or not isinstance(value, expected):
        raise ValueTypeError(f"type '{io.type}' does not take {_kind(value)}")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return f"a value of Python type {type(value).__name__}"


def from_python(value: Any) -> RunIO:
    """Wrap a Python value in its wire type; raise ``ValueTypeError`` if it has none."""
    match value:
        case RunIO():
            return value
        case None:
            return RunIO(type=IOType.none)
        case bool():
            return RunIO(type=IOType.boolean, value=value)
        case int():
            return RunIO(type=IOType.integer, value=value)
        case float():
            return RunIO(type=IOType.fp, value=value)
        case str():
            return RunIO(type=IOType.string, value=value)
        case dict():
            return RunIO(type=IOType.dictionary, value=value)
        case list() | tuple():
            return RunIO(type=IOType.array, value=list(value))
        case File():
            return RunIO(type=IOType.file, file=value)
    raise ValueTypeError(f"no wire type for Python type {type(value).__name__}")


def to_python(io: RunIO) -> Any:
    """The Python value of a wire value (``fp`` always gives a ``float``)."""
    if io.type is IOType.fp:
        return float(io.value)
    if io.type is IOType.file:
        return io.file if io.file is not None else File(url=io.value)
    return io.value
