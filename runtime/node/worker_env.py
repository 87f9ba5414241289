"""The environment a worker process (tenant code) gets: an allow-list, never the agent's own.

The agent's environment may hold where NATS is and its credentials (``JETRUN_NATS``,
``JETRUN_NATS_SEED``, ...), cloud keys of the node, tokens. A worker gets only the variables
named here (locale, paths, the accelerator selection), plus what its pipeline declares with
``@pipeline(env={...})`` (values written in the pipeline's own code), plus the names the
operator lets through in ``$JETRUN_WORKER_ENV``; and the OS user it runs as. Pure functions.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

PASS_ENV = "JETRUN_WORKER_ENV"  # names, comma-separated, the operator lets through to workers
# The OS user workers run as (the agent must be root to switch): then tenant code cannot read
# the agent's owner-only seed file, its /proc entries or signal it; and the interpreter that
# user runs (default: the agent's own, which that user may not be able to read)
USER_ENV = "JETRUN_WORKER_USER"
PYTHON_ENV = "JETRUN_WORKER_PYTHON"

ALLOWED = frozenset(
    {
        "PATH",
        "LANG",
        "LANGUAGE",
        "TZ",
        "PYTHONPATH",
        "PYTHONUNBUFFERED",
        "PYTHONDONTWRITEBYTECODE",
        "VIRTUAL_ENV",
        "LD_LIBRARY_PATH",
        "CUDA_VISIBLE_DEVICES",
        "NVIDIA_VISIBLE_DEVICES",
        "NVIDIA_DRIVER_CAPABILITIES",
        "CUDA_HOME",
    }
)
ALLOWED_PREFIXES = ("LC_",)
# jetrun's own settings and anything about NATS never reach tenant code, whoever asks
RESERVED_PREFIXES = ("JETRUN_", "NATS")
# which accelerators a worker may use is the agent's to say (a pipeline that named them itself
# could run on GPUs another team's replica holds)
AGENTS_OWN = frozenset({"CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "HOME"})


def is_reserved(name: str) -> bool:
    return name.upper().startswith(RESERVED_PREFIXES)


def check_declared(env: Mapping[str, str]) -> None:
    """Raise ``ValueError`` if a pipeline declares a reserved or malformed variable."""
    for name, value in env.items():
        if not name or "=" in name or "\0" in name or "\0" in str(value):
            raise ValueError(f"env: {name!r} is not a valid environment variable")
        if is_reserved(name):
            raise ValueError(f"env: {name} is reserved for jetrun itself")
        if name.upper() in AGENTS_OWN:
            raise ValueError(f"env: {name} is set by the agent, not by a pipeline")
        if not isinstance(value, str):
            raise ValueError(f"env: the value of {name} must be a string")


def worker_env(
    parent: Mapping[str, str],
    *,
    declared: Mapping[str, str] | None = None,
    passed: Iterable[str] = (),
    package_root: str,
    home: str,
) -> dict[str, str]:
    """The worker's environment: the allow-listed variables of ``parent``, the operator's
    ``passed`` names, the pipeline's ``declared`` values, ``HOME`` and the package root first
    on ``PYTHONPATH``. Reserved names never pass, whoever asks."""
    allowed = ALLOWED | {name for name in passed if not is_reserved(name)}
    env = {
        name: value
        for name, value in parent.items()
        if (name in allowed or name.startswith(ALLOWED_PREFIXES)) and not is_reserved(name)
    }
    env.update(
        {
            k: v
            for k, v in (declared or {}).items()
            if not is_reserved(k) and k.upper() not in AGENTS_OWN
        }
    )
    env["HOME"] = home
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = package_root + (os.pathsep + path if path else "")
    return env


def as_user(user: str | None, argv: list[str]) -> list[str]:
    """``argv`` run as ``user`` (util-linux ``setpriv``, which then execs it: the worker keeps
    its pid; the event loop's subprocess support cannot switch users itself)."""
    if user is None:
        return argv
    import pwd

    entry = pwd.getpwnam(user)
    ids = [f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--init-groups"]
    return ["setpriv", *ids, "--", *argv]


def home_of(user: str | None) -> str:
    """The workers' ``HOME``: the agent's, or that of the user they run as."""
    if user is None:
        return os.environ.get("HOME", "/")
    import pwd

    return pwd.getpwnam(user).pw_dir
