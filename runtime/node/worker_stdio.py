"""The worker's stdout and stderr, one attempt at a time (the child's side; imported by
``runtime.node.worker_process`` only).

Each attempt gets two fresh pipes from the agent (their write ends come over the worker's
output socket, ``SCM_RIGHTS``, just before the attempt's request): the worker puts them on
fds 1 and 2 for the attempt and, when it ends, puts ``/dev/null`` there instead and drops
them. The agent reads the attempt's output from its own pipes and closes them once the reply
came, so a process the pipeline forked during the attempt that keeps printing writes into a
pipe nobody reads (and gets ``EPIPE``), never into a later attempt's, which may be another
team's run of the same pipeline. Between attempts fds 1 and 2 are ``/dev/null``.

Threads share the worker's fds, so Python-level writes are routed by thread: ``sys.stdout``
and ``sys.stderr`` become ``Routed`` streams, and a thread started during an attempt (or by a
thread that was) belongs to it: what it writes goes to that attempt's pipes while it runs and
is dropped once it ended; work given to a ``ThreadPoolExecutor`` belongs to the attempt that
submitted it, whichever thread runs it. Threads started by the startup step, and the main
thread, write to whatever fds 1 and 2 are. Writes to fds 1 and 2 that bypass ``sys.stdout``
(a C library's own thread, ``os.write``) cannot be told apart and go to the attempt under way.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import sys
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

_FDS_SPACE = socket.CMSG_SPACE(2 * array.array("i").itemsize)
_TAG = "_jetrun_attempt"  # the attribute a Thread carries: the attempt it belongs to


class Attempts:
    """Which attempt is under way, and which one the calling thread belongs to."""

    def __init__(self) -> None:
        self.lock = threading.RLock()  # held while fds 1 and 2 change, and around each write
        self.current = 0  # the latest attempt's number (0: none yet)
        self.live = False  # it is under way
        self.pid = os.getpid()  # the worker's (a forked process has another)

    def renew_lock(self) -> None:
        self.lock = threading.RLock()

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

    def started_by(self, parent: threading.Thread) -> int | None:
        """The attempt a thread started by ``parent`` belongs to (None: the pipeline's own)."""
        tag: int | None = getattr(parent, _TAG, None)
        if tag is None and self.live and parent is threading.main_thread():
            return self.current
        return tag

    def may_write(self) -> bool:
        """The calling thread's output goes to the attempt under way (or to /dev/null)."""
        tag = getattr(threading.current_thread(), _TAG, None)
        return tag is None or (self.live and tag == self.current)


def _tag_pool_work(attempts: Attempts) -> None:
    """Work given to a thread pool belongs to the attempt of the thread that submitted it,
    whichever attempt started the pool's thread that runs it (pools are reused)."""
    submit = ThreadPoolExecutor.submit

    def tagged_submit(pool: ThreadPoolExecutor, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        tag = attempts.started_by(threading.current_thread())

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


class Routed:
    """A stream whose writes from a thread of an ended attempt are dropped (see above).
    Everything else is the real stream's."""

    def __init__(self, real: Any, attempts: Attempts) -> None:
        self._real, self._attempts = real, attempts
        self._buffer: Routed | None = None

    def write(self, data: Any) -> int:
        with self._attempts.lock:
            if self._attempts.may_write():
                try:
                    return int(self._real.write(data))
                except BrokenPipeError:
                    if not self._attempts.orphaned():
                        raise
        return len(data)

    def writelines(self, lines: Iterable[Any]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        with self._attempts.lock:
            try:
                self._real.flush()
            except BrokenPipeError:
                if not self._attempts.orphaned():
                    raise

    @property
    def buffer(self) -> Routed:
        if self._buffer is None:
            self._buffer = Routed(self._real.buffer, self._attempts)
        return self._buffer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class Stdio:
    """fds 1 and 2 of the worker: the startup step's pipes, then each attempt's, with
    ``/dev/null`` between attempts."""

    def __init__(self, output: socket.socket | None) -> None:
        self.output = output  # where each attempt's pipes come from
        self.attempts = Attempts()
        self._null = os.open(os.devnull, os.O_WRONLY)
        self._real: list[Any] = [sys.stdout, sys.stderr]
        self._routed: list[Any] = list(self._real)

    def install(self) -> None:
        """Route ``sys.stdout``, ``sys.stderr`` and the threads started from now on."""
        attempts, start = self.attempts, threading.Thread.start

        def tagged_start(thread: threading.Thread) -> None:
            setattr(thread, _TAG, attempts.started_by(threading.current_thread()))
            start(thread)

        threading.Thread.start = tagged_start  # type: ignore[method-assign,assignment]
        _tag_pool_work(attempts)
        # a process forked while another thread writes must not inherit the lock held
        os.register_at_fork(after_in_child=attempts.renew_lock)
        self._routed = [Routed(sys.stdout, attempts), Routed(sys.stderr, attempts)]
        sys.stdout, sys.stderr = self._routed

    def begin(self) -> None:
        """Put this attempt's pipes (sent by the agent with its request) on fds 1 and 2."""
        fds = self._receive()
        with self.attempts.lock:
            self._flush()
            for target, fd in zip((1, 2), fds, strict=True):
                os.dup2(fd, target)
            self.attempts.current += 1
            self.attempts.live = True
        for fd in set(fds) - {self._null}:
            os.close(fd)

    def end(self) -> None:
        """Flush what the attempt printed into its pipes and let go of them."""
        with self.attempts.lock:
            self._flush()
            os.dup2(self._null, 1)
            os.dup2(self._null, 2)
            self.attempts.live = False

    def _receive(self) -> tuple[int, int]:
        """The two write ends the agent sent; /dev/null for any that did not come."""
        fds = array.array("i")
        if self.output is not None:
            try:
                _, ancillary, _, _ = self.output.recvmsg(1, _FDS_SPACE)
            except OSError:
                ancillary = []
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            return self._null, self._null
        return fds[0], fds[1]

    def _flush(self) -> None:
        streams = [sys.stdout, sys.stderr]
        if streams != self._routed:  # the pipeline replaced them: ours too
            streams += self._real
        for stream in streams:
            with contextlib.suppress(Exception):  # a pipeline may have replaced or closed it
                stream.flush()
