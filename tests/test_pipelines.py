"""Defining pipelines, checking inputs against their signatures, shaping outputs, loading
user modules. All in-process; the worker tests run them in real child processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from contracts.agents import PipelineInfo
from contracts.values import File, IOType, RunIO, from_python
from runtime.node import pipelines
from runtime.node.pipelines import (
    InputError,
    instantiate,
    load_module,
    outputs,
    pipeline,
    validate_inputs,
)

USER_MODULE = Path(__file__).parent / "fixtures" / "user_pipelines.py"


@pipeline("tp/echo:v1", accelerator="gpu", timeout_s=10, max_retries=2)
def echo(text: str, times: int = 1) -> str:
    return text * times


@pipeline("tp/maybe:v1")
def maybe(ratio: float, note: str | None = None, extra=None) -> str:  # type: ignore[no-untyped-def]
    return f"{ratio!r} {note} {extra}"


@pipeline("tp/many:v1")
def many(first: str, *rest: int) -> int:
    return len(first) + sum(rest)


@pipeline("tp/model:v1")
class Model:
    startups = 0

    def startup(self) -> None:
        Model.startups += 1
        self.weights = 3

    def run(self, x: int) -> int:
        return x * self.weights


def io(kind: str, value: Any = None) -> RunIO:
    return RunIO(type=IOType(kind), value=value)


# --- the decorator ------------------------------------------------------------------------


def test_the_decorator_registers_and_returns_the_function_unchanged() -> None:
    spec = pipelines.get("tp/echo:v1")
    assert echo("a", 2) == "aa"
    assert spec.target is echo and spec.module == __name__ and not spec.is_class
    assert (spec.accelerator, spec.timeout_s, spec.max_retries) == ("gpu", 10, 2)
    assert [p.name for p in spec.params] == ["text", "times"]
    assert spec.info() == PipelineInfo(
        pointer="tp/echo:v1", accelerator="gpu", timeout_s=10, max_retries=2
    )
    assert spec in pipelines.registered()


def test_a_class_pipeline_is_checked_against_run_without_self() -> None:
    spec = pipelines.get("tp/model:v1")
    assert spec.is_class and [p.name for p in spec.params] == ["x"]


@pytest.mark.parametrize(
    "pointer", ["echo", "user/echo", "user/echo:", "/echo:v1", "a/b/c:v1", "us er/e:v1", "u/e:v1:x"]
)
def test_malformed_pointers_are_refused(pointer: str) -> None:
    with pytest.raises(ValueError, match="invalid pipeline pointer"):
        pipeline(pointer)


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        pipeline("tp/x:v1", timeout_s=0)
    with pytest.raises(ValueError, match="max_retries"):
        pipeline("tp/x:v1", max_retries=-1)


def test_signatures_without_a_wire_type_are_refused_at_definition() -> None:
    with pytest.raises(TypeError, match=r"parameter 'values'.*no jetrun input type"):

        @pipeline("tp/bad:v1")
        def bad(values: set[int]) -> None: ...

    with pytest.raises(TypeError, match="keyword-only parameter 'k' needs a default"):

        @pipeline("tp/bad:v1")
        def kw(*, k: int) -> None: ...

    with pytest.raises(TypeError, match="async pipelines are not supported"):

        @pipeline("tp/bad:v1")
        async def coro() -> None: ...

    with pytest.raises(TypeError, match="has no run"):

        @pipeline("tp/bad:v1")
        class NoRun: ...

    assert "tp/bad:v1" not in {s.pointer for s in pipelines.registered()}


def test_a_pointer_cannot_be_taken_by_another_function() -> None:
    with pytest.raises(ValueError, match=r"already registered by tests\.test_pipelines\.echo"):

        @pipeline("tp/echo:v1")
        def other(text: str) -> str:
            return text


def test_unknown_pointers_raise_key_error() -> None:
    with pytest.raises(KeyError, match="no pipeline 'tp/nothing:v1'"):
        pipelines.get("tp/nothing:v1")


# --- inputs -------------------------------------------------------------------------------


def test_matching_inputs_become_arguments() -> None:
    spec = pipelines.get("tp/echo:v1")
    assert validate_inputs(spec, [io("string", "hi"), io("integer", 2)]) == ["hi", 2]
    assert validate_inputs(spec, [io("string", "hi")]) == ["hi"]


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (
            [io("string", "hi"), io("string", "2")],
            "input 2 ('times'): expected integer, got string",
        ),
        (
            [io("string", "hi"), io("boolean", True)],
            "input 2 ('times'): expected integer, got boolean",
        ),
        ([io("integer", 1)], "input 1 ('text'): expected string, got integer"),
        ([io("string", "hi"), io("fp", 2.0)], "input 2 ('times'): expected integer, got fp"),
        ([], "input 1 ('text'): missing; tp/echo:v1 takes 1 to 2 inputs (text, times), got 0"),
        (
            [io("string", "a"), io("integer", 1), io("integer", 2)],
            "input 3: unexpected; tp/echo:v1 takes 1 to 2 inputs, got 3",
        ),
        ([io("string", 5)], "input 1 ('text'): type 'string' does not take a value of Python"),
        ([io("integer", True)], "input 1 ('text'): type 'integer' does not take"),
    ],
)
def test_mismatched_inputs_name_the_input_and_the_problem(
    inputs: list[RunIO], message: str
) -> None:
    with pytest.raises(InputError) as raised:
        validate_inputs(pipelines.get("tp/echo:v1"), inputs)
    assert str(raised.value).startswith(message)


def test_floats_take_integers_and_optionals_take_none() -> None:
    spec = pipelines.get("tp/maybe:v1")
    args = validate_inputs(spec, [io("integer", 2), io("none"), io("dictionary", {"a": 1})])
    assert args == [2.0, None, {"a": 1}] and isinstance(args[0], float)
    with pytest.raises(InputError, match=r"input 2 \('note'\): expected none or string, got array"):
        validate_inputs(spec, [io("fp", 1.5), io("array", [])])


def test_variadic_parameters_take_any_number_of_inputs() -> None:
    spec = pipelines.get("tp/many:v1")
    assert validate_inputs(spec, [io("string", "ab"), io("integer", 1), io("integer", 2)]) == [
        "ab",
        1,
        2,
    ]
    with pytest.raises(InputError, match=r"input 3 \('rest'\): expected integer, got string"):
        validate_inputs(spec, [io("string", "ab"), io("integer", 1), io("string", "x")])
    with pytest.raises(InputError, match="takes at least 1 inputs"):
        validate_inputs(spec, [])


def test_every_wire_type_maps_to_its_annotation() -> None:
    spec = load_module(str(USER_MODULE))
    typed = next(s for s in spec if s.pointer == "user/typed:v1")
    inputs = [
        from_python(v) for v in ("t", 1, 0.5, True, {"k": [1]}, [1, 2], None, File(url="u"), 3)
    ]
    assert validate_inputs(typed, inputs)[-2:] == [File(url="u"), 3]
    url_only = [*inputs[:7], RunIO(type=IOType.file, value="s3://bucket/a.png"), inputs[8]]
    assert validate_inputs(typed, url_only)[7] == File(url="s3://bucket/a.png")


# --- outputs and startup ------------------------------------------------------------------


def test_outputs_follow_the_shape_of_the_return_value() -> None:
    def gen() -> Iterator[object]:
        yield "a"
        yield 1

    assert list(outputs("x")) == [from_python("x")]
    assert list(outputs(None)) == [RunIO(type=IOType.none)]
    assert list(outputs(("x", 2))) == [from_python("x"), from_python(2)]
    assert list(outputs([1, 2])) == [RunIO(type=IOType.array, value=[1, 2])]
    assert list(outputs(gen())) == [from_python("a"), from_python(1)]


def test_instantiate_runs_a_class_startup_once_and_returns_run() -> None:
    before = Model.startups
    run = instantiate(pipelines.get("tp/model:v1"))
    assert Model.startups == before + 1 and run(2) == 6
    assert instantiate(pipelines.get("tp/echo:v1")) is echo


# --- loading modules ----------------------------------------------------------------------


def test_load_module_by_dotted_name() -> None:
    pointers = [s.pointer for s in load_module("runtime.node.demo")]
    assert pointers == [
        "demo/echo:v1",
        "demo/fail:v1",
        "demo/noop:v1",
        "demo/sleep:v1",
        "demo/slow-start:v1",
        "demo/stream:v1",
    ]


def test_load_module_by_path_outside_the_package() -> None:
    first = load_module(str(USER_MODULE))
    again = load_module(str(USER_MODULE))
    assert first == again
    greet = next(s for s in first if s.pointer == "user/greet:v1")
    assert greet.module.startswith("_jetrun_user_user_pipelines_") and greet.max_retries == 1


def test_load_module_reports_missing_modules(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_module(str(tmp_path / "nothing.py"))
    with pytest.raises(ImportError):
        load_module("no_such_module_for_jetrun")


def test_a_module_that_fails_to_import_can_be_fixed_and_reloaded(tmp_path: Path) -> None:
    module = tmp_path / "broken.py"
    module.write_text("raise RuntimeError('broken')\n")
    with pytest.raises(RuntimeError, match="broken"):
        load_module(str(module))
    module.write_text(
        "from runtime.node.pipelines import pipeline\n"
        "@pipeline('tp/fixed:v1')\n"
        "def fixed() -> str:\n"
        "    return 'ok'\n"
    )
    assert [s.pointer for s in load_module(str(module))] == ["tp/fixed:v1"]
