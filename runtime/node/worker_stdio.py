"""The worker's stdout and stderr, one attempt at a time (the child's side; imported by
``runtime.node.worker_process`` only).

Each attempt gets two fresh pipes from the agent (their write ends come in one message with
the attempt's request, ``SCM_RIGHTS``; ``runtime.node.worker_process``): the worker puts them on
fds 1 and 2 for the attempt and, when it ends, puts ``/dev/null`` there instead and drops
them. The agent reads the attempt's output from its own pipes and closes them once the reply
came, so a process the pipeline forked during the attempt that keeps printing writes into a
pipe nobody reads (and gets ``EPIPE``), never into a later attempt's, which may be another
team's run of the same pipeline. Between attempts fds 1 and 2 are ``/dev/null``.

The startup step's pipes (fds 1 and 2 at spawn) stay open for the worker's life as the
pipeline's own output: the agent logs what comes on them (``jetrun.worker``), never into a run.

Threads share the worker's fds, so Python-level writes are routed by thread: ``sys.stdout``
and ``sys.stderr`` (and ``sys.__stdout__``, ``sys.__stderr__``) become ``Routed`` streams, and
a program a thread starts with ``subprocess`` gets its stdout and stderr by the same rule
unless told otherwise. A thread started during an attempt (by
``threading.Thread`` or ``_thread.start_new_thread``, or by a thread that was) belongs to it:
what it writes goes to that attempt's pipes while it runs and is dropped once it ended; work
given to a ``ThreadPoolExecutor`` belongs to the attempt that submitted it, whichever thread
runs it. The main thread's writes go to the attempt under way. Threads started by the startup
step (a model loader's progress or heartbeat thread), and threads nobody tagged (started
before the worker began routing, or by C code calling into Python), belong to no attempt:
their writes go to the pipeline's own output. Writes to fds 1 and 2 that bypass ``sys.stdout``
(a C library's own thread, ``os.write``, ``os.system``) cannot be told apart and go to the
attempt under way.
"""

from __future__ import annotations

import _thread
import contextlib
import functools
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

_TAG = "_jetrun_attempt"  # the attribute a Thread carries: the attempt it belongs to
OWN = 0  # the tag of what belongs to no attempt (attempts are numbered from 1)
REAL, PIPELINE, DROP = "real", "pipeline", "drop"  # where a write goes (see ``Attempts.route``)


class _Local(threading.local):
    tag: int | None = None  # of a thread ``_thread.start_new_thread`` started


class Attempts:
    """Which attempt is under way, and which one the calling thread belongs to."""

    def __init__(self) -> None:
        self.lock = threading.RLock()  # held while fds 1 and 2 change, and around each write
        self.current = 0  # the latest attempt's number (0: none yet)
        self.live = False  # it is under way
        self.pid = os.getpid()  # the worker's (a forked process has another)
        self.local = _Local()
        self.main = threading.main_thread()

    def renew_lock(self) -> None:
        self.lock = threading.RLock()
        self.main = threading.main_thread()  # in a forked process, the thread that forked

    def orphaned(self) -> bool:
        """A write failed with EPIPE. In a process the pipeline forked, whose attempt (or
        startup step) ended and whose pipes were closed, what it prints from now on goes to
        /dev/null instead of raising (say, in the workers of a pool kept across runs): True.
        The worker's own fds are never closed pipes: there the error stands (False)."""
        if os.getpid() == self.pid:
            return False
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        os.close(null)
        return True

    def owner(self) -> int:
        """The attempt the calling thread's work belongs to, ``OWN`` if none: the main
        thread's is the attempt under way; a thread's, the one it was tagged with when it
        started; an untagged thread's (started before routing, or by C code) is ``OWN``."""
        tag = self.local.tag
        if tag is None:
            thread = threading.current_thread()
            tag = getattr(thread, _TAG)  # None unless tagged (a class attribute: no miss)
            if tag is None:
                return self.current if self.live and thread is self.main else OWN
        return tag

    def route(self) -> str:
        """Where the calling thread's writes go: ``REAL`` (fds 1 and 2: the attempt under
        way), ``PIPELINE`` (the pipeline's own output) or ``DROP`` (its attempt ended)."""
        tag = self.local.tag  # ``owner``, inlined: this runs for every write
        if tag is None:
            thread = threading.current_thread()
            tag = getattr(thread, _TAG)
            if tag is None:
                return REAL if self.live and thread is self.main else PIPELINE
        if tag == OWN:
            return PIPELINE
        return REAL if self.live and tag == self.current else DROP


def _tag_pool_work(attempts: Attempts) -> None:
    """Work given to a thread pool belongs to the attempt of the thread that submitted it,
    whichever attempt started the pool's thread that runs it (pools are reused)."""
    submit = ThreadPoolExecutor.submit

    def tagged_submit(pool: ThreadPoolExecutor, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        tag = attempts.owner()

        def run(*args: Any, **kwargs: Any) -> Any:
            thread = threading.current_thread()
            before = getattr(thread, _TAG, None)
            setattr(thread, _TAG, tag)
            try:
                return fn(*args, **kwargs)
            finally:
                setattr(thread, _TAG, before)

        return submit(pool, run, *args, **kwargs)

    ThreadPoolExecutor.submit = tagged_submit  # type: ignore[method-assign,assignment]


def _tag_raw_threads(attempts: Attempts) -> None:
    """A thread started with ``_thread.start_new_thread`` (not through ``threading.Thread``,
    which ``threading`` calls by its own reference) belongs to its starter's attempt too."""
    start_new_thread = _thread.start_new_thread

    def tagged(function: Callable[..., Any], args: Any, kwargs: Any = None) -> int:
        tag = attempts.owner()

        @functools.wraps(function)
        def run(*args: Any, **kwargs: Any) -> Any:
            attempts.local.tag = tag
            return function(*args, **kwargs)

        if kwargs is None:
            return start_new_thread(run, args)
        return start_new_thread(run, args, kwargs)

    _thread.start_new_thread = tagged
    _thread.start_new = tagged  # its old alias


def _route_programs(attempts: Attempts, own: tuple[int, int]) -> None:
    """A program started with ``subprocess`` (or asyncio's subprocesses, built on it) by a
    thread that is not the attempt's own gets no share of the attempt's fds 1 and 2 unless
    asked: its stdout and stderr default to the pipeline's own output (a thread of no attempt)
    or to ``/dev/null`` (a thread of an ended attempt). A thread of the attempt under way gives
    it copies of the attempt's pipes, taken under the lock: fds 1 and 2 as they are at the fork
    may already be the next attempt's (maybe another team's run), if the attempt ended meanwhile."""
    init = subprocess.Popen.__init__

    def routed_init(popen: subprocess.Popen[Any], *args: Any, **kwargs: Any) -> None:
        if len(args) >= 5:  # stdout is the 5th positional parameter: the caller chose
            init(popen, *args, **kwargs)
            return
        fds: list[Any] = []  # none: inherit fds 1 and 2 (the main thread, which moves them)
        with attempts.lock:
            route = attempts.route()
            if route == REAL and threading.current_thread() is not attempts.main:
                fds = held = [os.dup(1), os.dup(2)]  # this attempt's pipes, whatever comes next
            else:
                held = []
        if route == PIPELINE:
            fds = list(own)
        elif route == DROP:
            fds = [subprocess.DEVNULL, subprocess.DEVNULL]
        try:
            for name, fd in zip(("stdout", "stderr"), fds, strict=False):
                if kwargs.get(name) is None:
                    kwargs[name] = fd
            init(popen, *args, **kwargs)
        finally:
            for fd in held:
                os.close(fd)

    subprocess.Popen.__init__ = routed_init  # type: ignore[method-assign,assignment]


class Routed:
    """A stream whose writes go where ``Attempts.route`` says: the real stream's (fds 1 and
    2), the pipeline's own output, or nowhere. Everything else is the real stream's."""

    def __init__(self, real: Any, own: Any, attempts: Attempts) -> None:
        self._real, self._own, self._attempts = real, own, attempts
        self._buffer: Routed | None = None

    def write(self, data: Any) -> int:
        attempts = self._attempts
        if attempts.route() == PIPELINE:  # a thread's route to its pipeline never changes
            with contextlib.suppress(BrokenPipeError):  # the agent let go of the worker
                self._own.write(data)
            return len(data)
        with attempts.lock:
            # decided again under the lock: the attempt this thread belongs to may have ended
            # (and the next one, maybe another team's, begun) while it waited for the lock
            if attempts.route() == REAL:
                try:
                    return int(self._real.write(data))
                except BrokenPipeError:
                    if not attempts.orphaned():
                        raise
        return len(data)

    def writelines(self, lines: Iterable[Any]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if self._attempts.route() == PIPELINE:
            with contextlib.suppress(BrokenPipeError):
                self._own.flush()
            return
        with self._attempts.lock:
            try:
                self._real.flush()
            except BrokenPipeError:
                if not self._attempts.orphaned():
                    raise

    @property
    def buffer(self) -> Routed:
        if self._buffer is None:
            self._buffer = Routed(self._real.buffer, self._own.buffer, self._attempts)
        return self._buffer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class Stdio:
    """fds 1 and 2 of the worker: the startup step's pipes, then each attempt's, with
    ``/dev/null`` between attempts; the startup step's pipes stay the pipeline's own."""

    def __init__(self) -> None:
        self.attempts = Attempts()
        self._null = os.open(os.devnull, os.O_WRONLY)
        self._real: list[Any] = [sys.stdout, sys.stderr]
        self._routed: list[Any] = list(self._real)
        self._own: list[Any] = []

    def install(self) -> None:
        """Route ``sys.stdout``, ``sys.stderr`` and the threads started from now on."""
        attempts, start = self.attempts, threading.Thread.start
        setattr(threading.Thread, _TAG, None)

        def tagged_start(thread: threading.Thread) -> None:
            setattr(thread, _TAG, attempts.owner())
            start(thread)

        threading.Thread.start = tagged_start  # type: ignore[method-assign,assignment]
        _tag_pool_work(attempts)
        _tag_raw_threads(attempts)
        # a process forked while another thread writes must not inherit the lock held
        os.register_at_fork(after_in_child=attempts.renew_lock)
        self._own = [_own_stream(stream) for stream in self._real]
        self._routed = [Routed(r, o, attempts) for r, o in zip(self._real, self._own, strict=True)]
        sys.stdout, sys.stderr = self._routed
        sys.__stdout__, sys.__stderr__ = self._routed  # type: ignore[misc]  # the same, by name
        _route_programs(attempts, (self._own[0].fileno(), self._own[1].fileno()))

    def begin(self, fds: list[int]) -> None:
        """Put this attempt's pipes (sent by the agent with its request) on fds 1 and 2."""
        out, err = self._pipes(fds)
        with self.attempts.lock:
            self._flush()
            os.dup2(out, 1)
            os.dup2(err, 2)
            self.attempts.current += 1
            self.attempts.live = True
        if out != self._null:  # both came, or neither
            os.close(out)
            os.close(err)

    def end(self) -> None:
        """Flush what the attempt printed into its pipes and let go of them."""
        with self.attempts.lock:
            self._flush()
            os.dup2(self._null, 1)
            os.dup2(self._null, 2)
            self.attempts.live = False
        if self.attempts.current == 0:  # the startup step's: what it printed with no newline
            for stream in self._own:
                with contextlib.suppress(Exception):
                    stream.flush()

    def _pipes(self, fds: list[int]) -> tuple[int, int]:
        """The two write ends the agent sent; /dev/null for both unless two came."""
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            return self._null, self._null
        return fds[0], fds[1]

    def _flush(self) -> None:
        streams = self._real
        if sys.stdout is not self._routed[0] or sys.stderr is not self._routed[1]:
            streams = [*streams, sys.stdout, sys.stderr]  # the pipeline replaced them: theirs too
        for stream in streams:
            try:
                stream.flush()
            except Exception:  # a pipeline may have replaced or closed it
                continue


def _own_stream(real: Any) -> Any:
    """A line-buffered text stream on a copy of ``real``'s fd (at startup: the startup step's
    pipe, kept for the worker's life); ``/dev/null`` if it has none (never fds 1 and 2)."""
    try:
        fd = os.dup(real.fileno())  # not inheritable: only the worker writes to it
    except (AttributeError, OSError, ValueError):
        fd = os.open(os.devnull, os.O_WRONLY)
    encoding, errors = getattr(real, "encoding", None), getattr(real, "errors", None)
    return open(fd, "w", buffering=1, encoding=encoding, errors=errors)  # for the worker's life
