"""Names that end up in NATS subjects: pipeline pointers, run ids, agent ids, team names.

A subject is split on ``.``; ``*`` and ``>`` are wildcards; whitespace ends it. A name that
reaches a subject unchecked could read or write other subjects (``GET /v4/pipelines/>/scaling``),
so every such name is checked here, where it enters.
"""

from __future__ import annotations

import re

#: ``user/pipeline:v1``; '.' is allowed in parts (the catalogue escapes it in its subjects).
POINTER = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+:[A-Za-z0-9_.-]+$")
#: One subject token: a run id, an agent id, a team name.
TOKEN = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_:-]*$")
MAX_NAME = 200


def is_pointer(pointer: str) -> bool:
    return len(pointer) <= MAX_NAME and POINTER.match(pointer) is not None


def check_pointer(pointer: str) -> None:
    """Raise ``ValueError`` unless ``pointer`` looks like ``user/name:v1``."""
    if not is_pointer(pointer):
        raise ValueError(
            f"invalid pipeline pointer {pointer[:MAX_NAME]!r}: expected 'user/name:version' "
            "using letters, digits, '_', '.' and '-'"
        )


def is_token(name: str) -> bool:
    return len(name) <= MAX_NAME and TOKEN.match(name) is not None


def check_token(name: str, what: str) -> None:
    """Raise ``ValueError`` unless ``name`` is one plain subject token (letters, digits, '_',
    '-', ':'; no '.', '*', '>' or whitespace)."""
    if not is_token(name):
        raise ValueError(
            f"invalid {what} {name[:MAX_NAME]!r}: use letters, digits, '_', '-' and ':'"
            " (no '.', '*', '>' or spaces)"
        )
