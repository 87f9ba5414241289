"""The worker's write routing (``runtime.node.worker_stdio``) in one process: a write from a
thread of an attempt that ended never reaches the next attempt's fds, however the thread and
the worker's main thread interleave."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

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


PROGRAM_RACE = """
import json, os, subprocess, sys, threading, time
from runtime.node.worker_stdio import Stdio

init = subprocess.Popen.__init__

def descheduled(popen, *args, **kwargs):  # the thread loses the CPU before it forks
    time.sleep(0.3)
    init(popen, *args, **kwargs)

subprocess.Popen.__init__ = descheduled
stdio = Stdio()
stdio.install()
a_out, a_err, b_out, b_err = os.pipe(), os.pipe(), os.pipe(), os.pipe()
stdio.begin([a_out[1], a_err[1]])  # attempt 1: team A's run
late = threading.Thread(target=subprocess.run, args=(["echo", "late: team-a-secret"],))
late.start()  # a thread of attempt 1 starts a program just as attempt 1 ends
time.sleep(0.1)
stdio.end()
stdio.begin([b_out[1], b_err[1]])  # attempt 2: team B's run of the same pipeline
late.join(10)
stdio.end()
got = {}
for name, (read, _) in {"a": a_out, "b": b_out}.items():
    os.set_blocking(read, False)
    try:
        got[name] = os.read(read, 4096).decode()
    except BlockingIOError:
        got[name] = ""
with open(sys.argv[1], "w") as out:
    json.dump({**got, "alive": late.is_alive()}, out)
"""


def test_a_program_a_thread_starts_as_its_attempt_ends_never_prints_into_the_next(
    tmp_path: Path,
) -> None:
    """The thread decides where its program's output goes while its attempt is under way, then
    forks only after the next attempt put its pipes on fds 1 and 2: the program still writes
    into its own attempt's pipe (a copy taken when it decided), never into the next one's."""
    out = tmp_path / "out.json"
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", PROGRAM_RACE, str(out)], env=env, timeout=60, check=True)
    got = json.loads(out.read_text())
    assert got == {"a": "late: team-a-secret\n", "b": "", "alive": False}
