"""Demo pipelines, served by ``jetrun up``'s local agent (``--pipelines runtime.node.demo``).

| pointer | inputs | outputs |
|---|---|---|
| ``demo/echo:v1`` | text: string, times: integer (default 1) | text repeated ``times`` times |
| ``demo/sleep:v1`` | seconds: fp | the seconds actually slept |
| ``demo/fail:v1`` | message: string (optional) | prints 2 lines, fails: ``ValueError(message)`` |
| ``demo/slow-start:v1`` | text: string | ``"warm: " + text``, after a slow startup |
| ``demo/noop:v1`` | none | none (a ``none`` output); for benchmarks |
| ``demo/stream:v1`` | n: integer | streams ``"chunk 0"`` ... ``"chunk n-1"`` |
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator

from runtime.node.pipelines import pipeline

STARTUP_ENV = "JETRUN_DEMO_STARTUP_S"


@pipeline("demo/echo:v1")
def echo(text: str, times: int = 1) -> str:
    """``text`` repeated ``times`` times: ``echo("hi", 2) == "hihi"``; 0 gives ``""``.
    Raises ``ValueError`` for a negative ``times``."""
    if times < 0:
        raise ValueError(f"times must be >= 0, got {times}")
    return text * times


@pipeline("demo/sleep:v1")
def sleep(seconds: float) -> float:
    """Sleep ``seconds`` (blocking); return how long it actually slept."""
    start = time.monotonic()
    time.sleep(max(seconds, 0.0))
    return time.monotonic() - start


@pipeline("demo/fail:v1")
def fail(message: str = "demo/fail:v1 always fails") -> None:
    """Prints two lines, then raises ``ValueError(message)``: shows a ``pipeline_error`` with
    a traceback, and the run's logs."""
    print("loading the model")
    print(f"about to fail: {message}", file=sys.stderr)
    raise ValueError(message)


@pipeline("demo/slow-start:v1")
class SlowStart:
    """A slow cold start, like loading a model: ``startup`` sleeps ``$JETRUN_DEMO_STARTUP_S``
    seconds (default 2)."""

    prefix = ""

    def startup(self) -> None:
        time.sleep(float(os.environ.get(STARTUP_ENV, "2")))
        self.prefix = "warm: "

    def run(self, text: str) -> str:
        return self.prefix + text


@pipeline("demo/noop:v1")
def noop() -> None:
    """Does nothing: measures the runtime's own overhead."""


@pipeline("demo/stream:v1")
def stream(n: int) -> Iterator[str]:
    """Streams ``n`` outputs, ``"chunk 0"`` to ``"chunk n-1"``, one per yield."""
    for i in range(n):
        yield f"chunk {i}"
