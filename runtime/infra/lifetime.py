"""Child processes die with their parent, even when the parent is SIGKILLed.

On Linux a child asks the kernel for a signal when its parent dies (``PR_SET_PDEATHSIG``).
A program we do not control (nats-server) gets it set between fork and exec
(``die_with_parent``, a ``preexec_fn``); our own Python children set it themselves at start
from ``JETRUN_PARENT_PID`` (``honour_parent``), which also closes the race where the parent died
before the child got that far. Elsewhere these are no-ops: there a child notices its parent is
gone when its pipes close.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PARENT_ENV = "JETRUN_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def set_parent_death_signal(signum: int) -> bool:
    """Have the kernel send ``signum`` to this process when its parent dies. False where the
    platform cannot (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0)


def die_with_parent() -> None:
    """A ``preexec_fn`` for ``subprocess.Popen``: SIGTERM the child when this process dies.
    Call ``Popen`` from the main thread (the signal follows the thread that forked)."""
    set_parent_death_signal(signal.SIGTERM)


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) plus the variable ``honour_parent`` reads."""
    return {**(os.environ if env is None else env), PARENT_ENV: str(os.getpid())}


def honour_parent(signum: int = signal.SIGKILL) -> None:
    """In a child started with ``child_env``: get ``signum`` when the parent dies, and exit at
    once if it already has. Does nothing when the variable is not set."""
    parent = os.environ.pop(PARENT_ENV, None)
    if parent is None or not parent.isdigit():
        return
    set_parent_death_signal(signum)
    if os.getppid() != int(parent):
        os._exit(1)  # the parent died before we could ask to follow it
