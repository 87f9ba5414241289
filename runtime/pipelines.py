"""Pipelines as their authors write them: a typed function, or a class with a startup step.

    from runtime.pipelines import pipeline

    @pipeline("acme/summarise:v1", accelerator="gpu", timeout_s=60, max_retries=1)
    class Summarise:
        def startup(self) -> None:          # the cold start: once per worker process
            self.model = load_model()
        def run(self, text: str, max_words: int = 50) -> str:
            return self.model(text, max_words)

    @pipeline("acme/echo:v1")
    def echo(text: str, times: int) -> str:
        return text * times

A run's inputs are checked against the signature of the function (or ``run``) before it runs.
A returned value is one output, a tuple several, a generator streams one output per yield.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contracts.values import File, IOType, RunIO, from_python, to_python

POINTER = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+:[A-Za-z0-9_.-]+$")


class InputError(ValueError):
    """The inputs do not match the pipeline's signature; the message names the input."""


@dataclass(frozen=True)
class PipelineSpec:
    pointer: str
    target: Any  # the function, or the class with run() and an optional startup()
    accelerator: str = "cpu"
    timeout_s: float | None = None
    max_retries: int = 0

    @property
    def module(self) -> str:
        return str(self.target.__module__)

    def entry(self) -> Callable[..., Any]:
        """The callable whose signature inputs must match (unbound ``run`` for a class)."""
        if inspect.isclass(self.target):
            run: Callable[..., Any] = getattr(self.target, "run")  # noqa: B009
            return run
        return self.target  # type: ignore[no-any-return]


_REGISTRY: dict[str, PipelineSpec] = {}


def pipeline(
    pointer: str,
    *,
    accelerator: str = "cpu",
    timeout_s: float | None = None,
    max_retries: int = 0,
) -> Callable[[Any], Any]:
    """Register a function or class as the pipeline ``pointer``. Raises ``ValueError`` for a
    malformed pointer or a class without ``run``."""
    if not POINTER.match(pointer):
        raise ValueError(f"pipeline pointer {pointer!r} is not like user/pipeline:v1")
    if max_retries < 0 or (timeout_s is not None and timeout_s <= 0):
        raise ValueError("max_retries must be >= 0 and timeout_s > 0")

    def register(target: Any) -> Any:
        if inspect.isclass(target) and not callable(getattr(target, "run", None)):
            raise ValueError(f"pipeline class {target.__name__} has no run() method")
        _REGISTRY[pointer] = PipelineSpec(pointer, target, accelerator, timeout_s, max_retries)
        return target

    return register


def registered() -> dict[str, PipelineSpec]:
    return dict(_REGISTRY)


def load_module(spec: str) -> list[PipelineSpec]:
    """Import a dotted module name or a ``.py`` file (a user's module outside the package) and
    return the pipelines it registered. Raises ``ImportError`` if it cannot be imported."""
    if spec.endswith(".py") or "/" in spec:
        module = _import_path(Path(spec).resolve())
    else:
        module = importlib.import_module(spec)
    return [s for s in _REGISTRY.values() if s.module == module.__name__]


def _import_path(path: Path) -> types.ModuleType:
    name = f"jetrun_user_{re.sub(r'[^A-Za-z0-9_]', '_', str(path.with_suffix('')))}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import pipeline module {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def find(module_spec: str, pointer: str) -> PipelineSpec:
    for spec in load_module(module_spec):
        if spec.pointer == pointer:
            return spec
    raise LookupError(f"module {module_spec} has no pipeline {pointer}")


def start(spec: PipelineSpec) -> Callable[..., Any]:
    """Run the startup step (for a class) and return what runs an attempt."""
    target: Any = spec.target
    if not inspect.isclass(target):
        return target  # type: ignore[no-any-return]
    instance: Any = target()
    startup = getattr(instance, "startup", None)
    if callable(startup):
        startup()
    run: Callable[..., Any] = instance.run
    return run


# --- input validation ----------------------------------------------------------------------

_ACCEPTS: dict[Any, tuple[IOType, ...]] = {
    str: (IOType.string,),
    int: (IOType.integer,),
    float: (IOType.fp, IOType.integer),
    bool: (IOType.boolean,),
    dict: (IOType.dictionary,),
    list: (IOType.array,),
    tuple: (IOType.array,),
    type(None): (IOType.none,),
    File: (IOType.file,),
}


def validate_inputs(spec: PipelineSpec, inputs: list[RunIO]) -> list[Any]:
    """The Python arguments for ``inputs``; raises ``InputError`` naming the first bad one."""
    entry = spec.entry()
    params = list(inspect.signature(entry).parameters.values())
    if inspect.isclass(spec.target):
        params = params[1:]  # self
    hints = typing.get_type_hints(entry)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    if not (len(required) <= len(inputs) <= len(positional)):
        expected = (
            f"{len(required)}"
            if len(required) == len(positional)
            else (f"{len(required)} to {len(positional)}")
        )
        raise InputError(f"expected {expected} inputs, got {len(inputs)}")
    args = []
    for i, (param, item) in enumerate(zip(positional, inputs, strict=False)):
        accepted = _accepted(hints.get(param.name, Any))
        if accepted is not None and item.type not in accepted:
            names = " or ".join(t.value for t in accepted)
            raise InputError(
                f"input {i + 1} ('{param.name}'): expected {names}, got {item.type.value}"
            )
        args.append(to_python(item))
    return args


def _accepted(hint: Any) -> tuple[IOType, ...] | None:
    """The wire types a parameter annotation accepts; None for anything."""
    if hint is Any or hint is inspect.Parameter.empty:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        accepted: list[IOType] = []
        for arg in typing.get_args(hint):
            sub = _accepted(arg)
            if sub is None:
                return None
            accepted.extend(sub)
        return tuple(dict.fromkeys(accepted))
    return _ACCEPTS.get(origin or hint)


# --- outputs ---------------------------------------------------------------------------------


def is_stream(result: Any) -> bool:
    return inspect.isgenerator(result)


def outputs_of(result: Any) -> list[RunIO]:
    """A returned value -> one output; a tuple -> several. Raises ``ValueTypeError`` for a
    value with no wire type."""
    if isinstance(result, tuple):
        return [from_python(v) for v in result]
    return [from_python(result)]


def stream_outputs(result: Iterator[Any]) -> Iterator[RunIO]:
    for value in result:
        yield from_python(value)
