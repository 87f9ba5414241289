"""How pipeline authors define pipelines, and how a worker loads, checks and runs them.

A pipeline is a typed function, or a class with an optional ``startup(self)`` (the cold start,
run once per worker process) and a typed ``run(self, ...)``::

    @pipeline("demo/echo:v1")
    def echo(text: str, times: int = 1) -> str:
        return text * times

Each positional parameter is one input. A returned value is one output, a tuple several, and a
generator streams one output per ``yield``. Nothing here does I/O beyond importing modules.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from contracts.agents import PipelineInfo
from contracts.names import check_pointer
from contracts.scaling import ScalingSettings
from contracts.values import (
    File,
    IOType,
    RunIO,
    ValueTypeError,
    check,
    check_carriable,
    from_python,
    to_python,
)
from runtime.node.worker_env import check_declared

T = TypeVar("T")

_SIMPLE_TYPES: dict[Any, IOType] = {
    str: IOType.string,
    int: IOType.integer,
    float: IOType.fp,
    bool: IOType.boolean,
    dict: IOType.dictionary,
    list: IOType.array,
    type(None): IOType.none,
    None: IOType.none,
    File: IOType.file,
}


class InputError(ValueError):
    """Run inputs do not match the pipeline's signature; the message names the input."""


@dataclass(frozen=True, slots=True)
class Param:
    """One input of a pipeline: ``accepts`` is None when any type is accepted."""

    name: str
    accepts: frozenset[IOType] | None
    has_default: bool
    annotation: str

    def expected(self) -> str:
        if self.accepts is None:
            return "anything"
        return " or ".join(sorted(self.accepts))


@dataclass(frozen=True, slots=True)
class PipelineSpec:
    """A registered pipeline: ``target`` is the decorated function or class."""

    pointer: str
    accelerator: str
    timeout_s: float | None
    max_retries: int
    target: Callable[..., Any]
    module: str
    params: tuple[Param, ...]
    variadic: Param | None = None
    gpus: int = 1
    gpu_memory_mb: int = 0
    scaling: ScalingSettings | None = None
    env: Mapping[str, str] = field(default_factory=dict)  # its workers' declared variables

    @property
    def is_class(self) -> bool:
        return inspect.isclass(self.target)

    def info(self) -> PipelineInfo:
        """The catalogue entry agents register for this pipeline."""
        return PipelineInfo(
            pointer=self.pointer,
            accelerator=self.accelerator,
            timeout_s=self.timeout_s,
            max_retries=self.max_retries,
            gpus=self.gpus,
            gpu_memory_mb=self.gpu_memory_mb,
            scaling=self.scaling,
        )


_REGISTRY: dict[str, PipelineSpec] = {}


# --- defining pipelines -------------------------------------------------------------------


def pipeline(
    pointer: str,
    *,
    accelerator: str = "cpu",
    timeout_s: float | None = None,
    max_retries: int = 0,
    gpus: int = 1,
    gpu_memory_mb: int = 0,
    scaling: ScalingSettings | None = None,
    env: Mapping[str, str] | None = None,
) -> Callable[[T], T]:
    """Register the decorated function or class as the pipeline ``pointer``; return it unchanged.

    ``gpus`` and ``gpu_memory_mb`` say what one replica needs (GPU pipelines). ``scaling``
    makes it autoscaled (replicas load and unload with traffic, down to ``min_replicas``);
    without it every agent that can serve it keeps a replica loaded. ``env``: environment
    variables its worker processes get (on top of the allow-listed ones; never ``JETRUN_*``,
    ``NATS*`` or the accelerator selection, which stay the agent's).

    Raises ``ValueError`` for a malformed pointer, bad options or a pointer already taken by
    another object, and ``TypeError`` for a signature jetrun cannot map to typed inputs.
    """
    check_pointer(pointer)
    if timeout_s is not None and timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    if max_retries < 0:
        raise ValueError(f"max_retries must be >= 0, got {max_retries}")
    if gpus < 1 or gpu_memory_mb < 0:
        raise ValueError(f"gpus must be >= 1 and gpu_memory_mb >= 0, got {gpus}, {gpu_memory_mb}")
    declared = dict(env or {})
    check_declared(declared)

    def register(target: T) -> T:
        if not callable(target):
            raise TypeError(f"@pipeline({pointer!r}) needs a function or a class")
        params, variadic = _signature(target, pointer)
        spec = PipelineSpec(
            pointer=pointer,
            accelerator=accelerator,
            timeout_s=timeout_s,
            max_retries=max_retries,
            target=target,
            module=target.__module__,
            params=params,
            variadic=variadic,
            gpus=gpus,
            gpu_memory_mb=gpu_memory_mb,
            scaling=scaling,
            env=declared,
        )
        _add(spec)
        return target

    return register


def _add(spec: PipelineSpec) -> None:
    old = _REGISTRY.get(spec.pointer)
    if old is not None and _qualname(old.target) != _qualname(spec.target):
        raise ValueError(
            f"pipeline {spec.pointer!r} is already registered by {_qualname(old.target)}"
        )
    _REGISTRY[spec.pointer] = spec


def _qualname(target: Any) -> str:
    return f"{target.__module__}.{target.__qualname__}"


def get(pointer: str) -> PipelineSpec:
    """The registered pipeline ``pointer``; raises ``KeyError`` if there is none."""
    try:
        return _REGISTRY[pointer]
    except KeyError:
        raise KeyError(f"no pipeline {pointer!r} is registered") from None


def registered() -> list[PipelineSpec]:
    """Every pipeline registered in this process, sorted by pointer."""
    return [_REGISTRY[p] for p in sorted(_REGISTRY)]


# --- signatures ---------------------------------------------------------------------------


def _run_function(target: Any, pointer: str) -> Callable[..., Any]:
    if not inspect.isclass(target):
        return typing.cast(Callable[..., Any], target)
    run = getattr(target, "run", None)
    if not callable(run):
        raise TypeError(f"pipeline class {target.__qualname__} ({pointer}) has no run() method")
    return typing.cast(Callable[..., Any], run)


def _signature(target: Any, pointer: str) -> tuple[tuple[Param, ...], Param | None]:
    func = _run_function(target, pointer)
    if inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func):
        raise TypeError(f"{pointer}: async pipelines are not supported; use a plain def")
    try:
        hints = typing.get_type_hints(func)
    except Exception as exc:
        raise TypeError(f"{pointer}: cannot resolve its annotations: {exc!r}") from exc
    params = list(inspect.signature(func).parameters.values())
    if inspect.isclass(target):
        params = params[1:]  # self
    positional: list[Param] = []
    variadic: Param | None = None
    for p in params:
        hint = hints.get(p.name, Any)
        if p.kind is p.VAR_POSITIONAL:
            variadic = _param(p.name, hint, True, pointer)
        elif p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            positional.append(_param(p.name, hint, p.default is not p.empty, pointer))
        elif p.kind is p.KEYWORD_ONLY and p.default is p.empty:
            raise TypeError(f"{pointer}: keyword-only parameter {p.name!r} needs a default")
    return tuple(positional), variadic


def _param(name: str, hint: Any, has_default: bool, pointer: str) -> Param:
    try:
        accepts = accepted_types(hint)
    except TypeError as exc:
        raise TypeError(f"{pointer}: parameter {name!r}: {exc}") from None
    return Param(name=name, accepts=accepts, has_default=has_default, annotation=repr(hint))


def accepted_types(hint: Any) -> frozenset[IOType] | None:
    """The wire types a parameter annotated ``hint`` accepts (None: any); ``TypeError`` if none."""
    if hint is Any or hint is object:
        return None
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        parts = [accepted_types(arg) for arg in typing.get_args(hint)]
        if any(part is None for part in parts):
            return None
        return frozenset().union(*typing.cast(list[frozenset[IOType]], parts))
    base = origin if origin is not None else hint
    if base in _SIMPLE_TYPES:
        return frozenset({_SIMPLE_TYPES[base]})
    raise TypeError(f"annotation {hint!r} has no jetrun input type")


# --- inputs -------------------------------------------------------------------------------


def validate_inputs(spec: PipelineSpec, inputs: list[RunIO]) -> list[Any]:
    """Check ``inputs`` against the run signature; return the Python arguments in order.

    Does not block. Raises ``InputError`` naming the first input that is missing, extra or of
    the wrong type, e.g. ``input 2 ('times'): expected integer, got string``.
    """
    _check_count(spec, len(inputs))
    args: list[Any] = []
    for position, io in enumerate(inputs, start=1):
        param = spec.params[position - 1] if position <= len(spec.params) else spec.variadic
        assert param is not None  # _check_count guarantees it
        args.append(_convert(position, param, io))
    return args


def _check_count(spec: PipelineSpec, count: int) -> None:
    required = sum(1 for p in spec.params if not p.has_default)
    if count < required:
        missing = spec.params[count]
        names = ", ".join(p.name for p in spec.params)
        raise InputError(
            f"input {count + 1} ('{missing.name}'): missing; {spec.pointer} takes "
            f"{_inputs_phrase(required, len(spec.params), spec.variadic)} ({names}), got {count}"
        )
    if spec.variadic is None and count > len(spec.params):
        raise InputError(
            f"input {len(spec.params) + 1}: unexpected; {spec.pointer} takes "
            f"{_inputs_phrase(required, len(spec.params), None)}, got {count}"
        )


def _inputs_phrase(required: int, total: int, variadic: Param | None) -> str:
    if variadic is not None:
        return f"at least {required} inputs"
    if required == total:
        return f"{total} input{'s' if total != 1 else ''}"
    return f"{required} to {total} inputs"


def _convert(position: int, param: Param, io: RunIO) -> Any:
    label = f"input {position} ('{param.name}')"
    try:
        check(io)
    except ValueTypeError as exc:
        raise InputError(f"{label}: {exc}") from None
    accepts = param.accepts
    if accepts is not None and io.type not in accepts:
        widened = io.type is IOType.integer and IOType.fp in accepts
        if not widened:
            raise InputError(f"{label}: expected {param.expected()}, got {io.type}")
        return float(io.value)
    return to_python(io)


# --- running ------------------------------------------------------------------------------


def instantiate(spec: PipelineSpec) -> Callable[..., Any]:
    """The callable that runs one attempt; for a class, build it and run ``startup()`` first.

    Blocks for as long as ``startup()`` takes; raises whatever the constructor or it raises.
    """
    if not spec.is_class:
        return spec.target
    instance = spec.target()
    startup = getattr(instance, "startup", None)
    if callable(startup):
        startup()
    return typing.cast(Callable[..., Any], instance.run)


def outputs(result: Any) -> Iterator[RunIO]:
    """The wire outputs of a run's return value: one, one per tuple item, or one per ``yield``.

    Lazy: iterating a generator runs the pipeline. Raises ``ValueTypeError`` for a value with
    no wire type or one the wire cannot carry (``check_carriable``), and whatever a generator
    raises.
    """
    items = result if inspect.isgenerator(result) or isinstance(result, tuple) else (result,)
    for index, item in enumerate(items):
        output = from_python(item)
        try:
            check_carriable(output.value)
        except ValueTypeError as err:
            raise ValueTypeError(f"output {index}{err.path}: {err}", err.path) from None
        yield output


# --- loading user modules -----------------------------------------------------------------


def load_module(spec: str) -> list[PipelineSpec]:
    """Import a dotted module name or a ``.py`` file path; return the pipelines it registered.

    Blocks while the module is imported. Raises ``ImportError`` (or ``FileNotFoundError``) if it
    cannot be found, and whatever the module raises while importing.
    """
    before = set(_REGISTRY)
    module = _import_path(Path(spec)) if _is_path(spec) else importlib.import_module(spec)
    return [
        s
        for pointer, s in sorted(_REGISTRY.items())
        if s.module == module.__name__ or pointer not in before
    ]


def _is_path(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or "\\" in spec


def _import_path(path: Path) -> types.ModuleType:
    path = path.resolve()
    if not path.is_file():
        raise FileNotFoundError(f"pipeline module {str(path)!r} does not exist")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    name = f"_jetrun_user_{path.stem.replace('-', '_')}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ImportError(f"cannot import {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
