"""Typed run inputs and outputs: ``{"type": ..., "value": ...}`` on the wire.

Conversion follows the seed SDK: ``run_pipeline(pointer, "text", 5)`` sends a ``string`` and an
``integer``. ``bool`` is checked before ``int`` because ``True`` is an ``int`` in Python.

What the wire carries (``check``): integers anywhere in a value fit a signed 64-bit integer
(``INT_MIN`` .. ``INT_MAX``), and dictionaries and arrays nest at most ``MAX_DEPTH`` levels.
"""

from __future__ import annotations

import enum
import re
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


MAX_DEPTH = 32  # dictionaries and arrays nested in one value: {"a": {"b": 1}} is 2 levels
INT_MIN, INT_MAX = -(2**63), 2**63 - 1  # integers are signed 64-bit on the wire

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ValueTypeError(ValueError):
    """A value does not match its declared type, has no wire type at all, or cannot be carried
    (an integer out of range, nesting too deep). ``path`` says where inside the value
    (``""`` for the value itself, else e.g. ``.steps[2]``)."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path


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
    check_carriable(value)


def check_carriable(value: Any) -> None:
    """Raise ``ValueTypeError`` (with ``path``) if an integer anywhere in ``value`` is outside
    ``INT_MIN`` .. ``INT_MAX``, or dictionaries and arrays nest deeper than ``MAX_DEPTH``.
    Iterative: any depth is checked without recursion."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, int) and not isinstance(item, bool):
            if not INT_MIN <= item <= INT_MAX:
                raise ValueTypeError(
                    f"integer out of range: integers must be between {INT_MIN} and {INT_MAX}",
                    path,
                )
        elif isinstance(item, dict | list):
            if depth >= MAX_DEPTH:
                raise ValueTypeError(
                    f"nested too deep: dictionaries and arrays nest at most {MAX_DEPTH} levels",
                    path,
                )
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            stack.extend((v, path + _step(k), depth + 1) for k, v in pairs)


def _step(key: Any) -> str:
    if isinstance(key, int):
        return f"[{key}]"
    if isinstance(key, str) and _NAME.match(key):
        return f".{key}"
    return f"[{msgspec.json.encode(key).decode()}]"


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
