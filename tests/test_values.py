"""Typed run inputs and outputs: Python values to wire values and back, and type checks."""

from __future__ import annotations

import decimal
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings

from contracts.values import File, IOType, RunIO, ValueTypeError, check, from_python, to_python
from tests.strategies import python_values

CAT = File(url="https://example.com/cat.png", name="cat.png")

ROUND_TRIPS: list[tuple[Any, IOType]] = [
    ("a photo of a cat", IOType.string),
    ("", IOType.string),
    (5, IOType.integer),
    (0, IOType.integer),
    (-(2**63), IOType.integer),
    (1.5, IOType.fp),
    (-0.0, IOType.fp),
    (True, IOType.boolean),
    (False, IOType.boolean),
    ({"steps": 20, "nested": {"a": [1, 2]}}, IOType.dictionary),
    ({}, IOType.dictionary),
    ([1, "two", 3.0, None], IOType.array),
    ([], IOType.array),
    (None, IOType.none),
    (CAT, IOType.file),
]


@pytest.mark.parametrize(("value", "io_type"), ROUND_TRIPS, ids=repr)
def test_round_trip(value: Any, io_type: IOType) -> None:
    io = from_python(value)
    assert io.type is io_type
    check(io)
    back = to_python(io)
    assert back == value
    assert type(back) is type(value)


def test_round_trips_cover_every_io_type() -> None:
    assert {io_type for _, io_type in ROUND_TRIPS} == set(IOType)


@pytest.mark.parametrize("value", [True, False])
def test_bool_is_boolean_not_integer(value: bool) -> None:
    io = from_python(value)
    assert io == RunIO(type=IOType.boolean, value=value)
    assert to_python(io) is value


def test_file_is_carried_in_the_file_field() -> None:
    io = from_python(CAT)
    assert io.file == CAT
    assert io.value is None


def test_tuple_becomes_an_array() -> None:
    io = from_python((1, "a"))
    assert io == RunIO(type=IOType.array, value=[1, "a"])
    assert to_python(io) == [1, "a"]


def test_a_run_io_is_passed_through() -> None:
    io = RunIO(type=IOType.fp, value=2)
    assert from_python(io) is io


def test_fp_always_gives_a_float() -> None:
    value = to_python(RunIO(type=IOType.fp, value=3))
    assert value == 3.0
    assert type(value) is float


def test_file_given_as_a_url_string() -> None:
    io = RunIO(type=IOType.file, value="https://example.com/x.bin")
    check(io)
    assert to_python(io) == File(url="https://example.com/x.bin")


@pytest.mark.parametrize(
    "io",
    [
        RunIO(type=IOType.fp, value=2),  # an integer is a valid fp
        RunIO(type=IOType.file, file=File(path="/data/x")),
        RunIO(type=IOType.file, value="https://example.com/x"),
        RunIO(type=IOType.none),
        RunIO(type=IOType.array, value=[]),
    ],
    ids=repr,
)
def test_check_accepts(io: RunIO) -> None:
    check(io)


@pytest.mark.parametrize(
    ("io", "words"),
    [
        (RunIO(type=IOType.string, value=5), ["'string'", "int"]),
        (RunIO(type=IOType.string, value=None), ["'string'", "null"]),
        (RunIO(type=IOType.integer, value="5"), ["'integer'", "str"]),
        (RunIO(type=IOType.integer, value=True), ["'integer'", "bool"]),
        (RunIO(type=IOType.integer, value=1.5), ["'integer'", "float"]),
        (RunIO(type=IOType.fp, value=True), ["'fp'", "bool"]),
        (RunIO(type=IOType.fp, value="1.0"), ["'fp'", "str"]),
        (RunIO(type=IOType.boolean, value=1), ["'boolean'", "int"]),
        (RunIO(type=IOType.boolean, value="true"), ["'boolean'", "str"]),
        (RunIO(type=IOType.dictionary, value=[("a", 1)]), ["'dictionary'", "list"]),
        (RunIO(type=IOType.array, value={"a": 1}), ["'array'", "dict"]),
        (RunIO(type=IOType.array, value="abc"), ["'array'", "str"]),
        (RunIO(type=IOType.none, value=0), ["'none'", "int"]),
        (RunIO(type=IOType.file), ["'file'"]),
        (RunIO(type=IOType.file, value=7), ["'file'"]),
    ],
    ids=repr,
)
def test_check_rejects_a_mismatch_with_a_message(io: RunIO, words: list[str]) -> None:
    with pytest.raises(ValueTypeError) as raised:
        check(io)
    for word in words:
        assert word in str(raised.value)


@pytest.mark.parametrize(
    "value",
    [
        {1, 2},
        frozenset(),
        b"bytes",
        bytearray(b"x"),
        1 + 2j,
        decimal.Decimal("1.5"),
        object(),
        range(3),
    ],
    ids=lambda v: type(v).__name__,
)
def test_unsupported_python_type(value: Any) -> None:
    with pytest.raises(ValueTypeError, match=type(value).__name__):
        from_python(value)


def test_value_type_error_is_a_value_error() -> None:
    assert issubclass(ValueTypeError, ValueError)


@settings(max_examples=300, deadline=None)
@given(python_values)
def test_any_python_value_round_trips_and_checks(value: Any) -> None:
    io = from_python(value)
    check(io)
    assert to_python(io) == value


@settings(max_examples=300, deadline=None)
@given(python_values)
def test_wire_values_survive_json(value: Any) -> None:
    io = from_python(value)
    back = msgspec.json.decode(msgspec.json.encode(io), type=RunIO)
    assert back == io
    check(back)
    assert to_python(back) == to_python(io)
