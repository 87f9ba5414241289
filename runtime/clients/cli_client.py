"""What the user-facing CLI commands share: where the API is, the token, and typed inputs.

URL and token come from flags, else ``$JETRUN_URL`` / ``$JETRUN_TOKEN``, else a small TOML file
(``$JETRUN_CLIENT_CONFIG``, default ``~/.config/jetrun/client.toml``)::

    url = "http://127.0.0.1:8080"
    token = "jr_demo_token"

Inputs on the command line are JSON (``5``, ``"text"``, ``[1, 2]``, or a typed object
``{"type": "integer", "value": 5}``), a typed value ``TYPE:VALUE`` (``string:5``, ``integer:5``,
``fp:0.5``, ``boolean:true``, ``array:[1,2]``, ``dictionary:{"a":1}``, ``none:``,
``file:https://...``), or else a plain string.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from contracts.values import File, IOType, RunIO, ValueTypeError, check, from_python

DEFAULT_URL = "http://127.0.0.1:8080"
CONFIG_ENV = "JETRUN_CLIENT_CONFIG"
_ALIASES = {"int": "integer", "float": "fp", "str": "string", "bool": "boolean",
            "dict": "dictionary", "list": "array", "null": "none"}  # fmt: skip


class InputError(ValueError):
    """A command-line input cannot become a typed value; the message says which and why."""


@dataclass(frozen=True)
class ClientSettings:
    url: str
    token: str | None


def config_path() -> Path:
    configured = os.environ.get(CONFIG_ENV)
    return Path(configured) if configured else Path.home() / ".config" / "jetrun" / "client.toml"


def resolve(url: str | None, token: str | None) -> ClientSettings:
    """Flags (already merged with the env by click) win; the config file fills the rest."""
    file: dict[str, Any] = {}
    path = config_path()
    if (url is None or token is None) and path.is_file():
        try:
            file = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise InputError(f"cannot read {path}: {err}") from err
    return ClientSettings(
        url=(url or file.get("url") or DEFAULT_URL).rstrip("/"),
        token=token or file.get("token"),
    )


def parse_input(arg: str, position: int) -> RunIO:
    """One command-line input as a typed value; raises ``InputError``."""
    try:
        io = _parse(arg)
        check(io)
    except (ValueError, ValueTypeError, msgspec.ValidationError) as err:
        raise InputError(f"input {position + 1} ({arg!r}): {err}") from None
    return io


def _parse(arg: str) -> RunIO:
    name, sep, rest = arg.partition(":")
    kind = _ALIASES.get(name, name)
    if sep and kind in IOType.__members__:
        return _typed(IOType(kind), rest)
    try:
        value = json.loads(arg)
    except ValueError:
        return RunIO(type=IOType.string, value=arg)
    if isinstance(value, dict) and "type" in value and set(value) <= {"type", "value", "file"}:
        return msgspec.convert(value, RunIO)
    return from_python(value)


def _typed(kind: IOType, text: str) -> RunIO:
    match kind:
        case IOType.string:
            return RunIO(type=kind, value=text)
        case IOType.integer:
            return RunIO(type=kind, value=int(text))
        case IOType.fp:
            return RunIO(type=kind, value=float(text))
        case IOType.boolean:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError("a boolean is true or false")
            return RunIO(type=kind, value=text.lower() in ("true", "1", "yes"))
        case IOType.none:
            return RunIO(type=kind)
        case IOType.file:
            is_url = "://" in text
            return RunIO(type=kind, file=File(url=text) if is_url else File(path=text))
    return RunIO(type=kind, value=json.loads(text))
