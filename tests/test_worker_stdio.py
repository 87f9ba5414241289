"""The worker's write routing (``runtime.node.worker_stdio``) in one process: a write from a
thread of an attempt that ended never reaches the next attempt's fds, however the thread and
the worker's main thread interleave."""

from __future__ import annotations

import threading
import time

import pytest

from runtime.node.worker_stdio import _TAG, PIPELINE, Attempts, Routed


class Recorder:
    """A stream that notes which attempt was under way at each write."""

    def __init__(self, attempts: Attempts) -> None:
        self.attempts = attempts
        self.writes: list[tuple[int, str]] = []

    def write(self, data: str) -> int:
        self.writes.append((self.attempts.current, data))
        return len(data)

    def flush(self) -> None:
        pass


@pytest.fixture(autouse=True)
def untagged(monkeypatch: pytest.MonkeyPatch) -> None:
    """Threads carry no attempt unless tagged (what ``Stdio.install`` sets up)."""
    monkeypatch.setattr(threading.Thread, _TAG, None, raising=False)


def test_a_thread_waiting_for_the_lock_as_its_attempt_ends_writes_nothing_into_the_next() -> None:
    attempts = Attempts()
    attempts.current, attempts.live = 1, True  # attempt 1 (team A's run) under way
    real, own = Recorder(attempts), Recorder(attempts)
    stream = Routed(real, own, attempts)

    def late() -> None:  # a thread attempt 1 started, printing just as it ends
        stream.write("late: team-a-secret\n")

    thread = threading.Thread(target=late, daemon=True)
    setattr(thread, _TAG, 1)
    with attempts.lock:  # the main thread ends attempt 1 and begins attempt 2 (team B's)
        thread.start()
        time.sleep(0.2)  # the thread has decided where its write goes and waits for the lock
        attempts.live = False
        attempts.current, attempts.live = 2, True
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert real.writes == [] and own.writes == []  # dropped: attempt 1 ended


def test_writes_go_to_the_attempt_under_way_or_the_pipelines_own_output() -> None:
    attempts = Attempts()
    real, own = Recorder(attempts), Recorder(attempts)
    stream = Routed(real, own, attempts)
    assert attempts.route() == PIPELINE  # the main thread, no attempt under way
    stream.write("loading\n")
    attempts.current, attempts.live = 1, True
    stream.write("now: team-a\n")  # the main thread's, during attempt 1
    assert own.writes == [(0, "loading\n")]
    assert real.writes == [(1, "now: team-a\n")]
