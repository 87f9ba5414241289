"""Demo pipelines, served by ``jetrun up``'s local agent."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

from runtime.pipelines import pipeline


@pipeline("demo/echo:v1")
def echo(text: str, times: int) -> str:
    """A string and an integer in: the string repeated ``times`` times."""
    return text * times


@pipeline("demo/sleep:v1")
def sleep(seconds: float) -> float:
    """Sleeps ``seconds``; returns how long it slept."""
    start = time.monotonic()
    time.sleep(seconds)
    return time.monotonic() - start


@pipeline("demo/fail:v1")
def fail() -> None:
    """Always raises: shows a failed run with ``error.type = pipeline_error``."""
    raise ValueError("demo/fail:v1 always fails")


@pipeline("demo/noop:v1")
def noop() -> None:
    """Does nothing: for benchmarks."""


@pipeline("demo/stream:v1")
def stream(n: int) -> Iterator[str]:
    """Streams ``n`` outputs, one at a time."""
    for i in range(n):
        yield f"chunk {i}"


@pipeline("demo/slow-start:v1")
class SlowStart:
    """A pipeline with a slow startup step (``$JETRUN_DEMO_STARTUP_S``, default 2 s): the cold
    start a model load would be."""

    def startup(self) -> None:
        time.sleep(float(os.environ.get("JETRUN_DEMO_STARTUP_S", "2")))
        self.prefix = "warm: "

    def run(self, text: str) -> str:
        return self.prefix + text
