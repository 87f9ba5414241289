"""Service log records: fields bound per block, text and JSON shapes (no processes)."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging

import anyio
import pytest

from runtime.infra.logsetup import (
    ContextFilter,
    JsonFormatter,
    LineHandler,
    TextFormatter,
    bind,
    bound,
)


def record(message: str = "attempt ended: %s", *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord(
        "jetrun.agent", logging.INFO, __file__, 1, message, args or ("completed",), None
    )
    for key, value in extra.items():
        setattr(rec, key, value)
    ContextFilter().filter(rec)
    return rec


def test_bound_fields_reach_records_and_are_dropped_after_the_block() -> None:
    with bound(run_id="run_1", attempt=2):
        bind(team="acme")
        inside = record()
    outside = record()
    assert (inside.run_id, inside.attempt, inside.team) == ("run_1", 2, "acme")  # type: ignore[attr-defined]
    assert not hasattr(outside, "run_id") and not hasattr(outside, "team")


def test_json_lines_carry_the_fields_that_apply() -> None:
    with bound(run_id="run_1", agent_id="a1"):
        line = JsonFormatter().format(record(pipeline="demo/echo:v1"))
    entry = json.loads(line)
    assert entry["msg"] == "attempt ended: completed" and entry["level"] == "INFO"
    assert entry["logger"] == "jetrun.agent" and entry["ts"].endswith("Z")
    assert entry["run_id"] == "run_1" and entry["agent_id"] == "a1"
    assert entry["pipeline"] == "demo/echo:v1" and "team" not in entry


def test_text_lines_are_readable_with_fields_at_the_end() -> None:
    with bound(run_id="run_1", attempt=1):
        line = TextFormatter().format(record())
    assert line.endswith("INFO jetrun.agent: attempt ended: completed run_id=run_1 attempt=1")


@pytest.mark.anyio
async def test_tasks_started_in_a_block_inherit_its_fields() -> None:
    seen: list[object] = []

    async def child() -> None:
        seen.append(getattr(record(), "run_id", None))

    async with anyio.create_task_group() as tg:
        with bound(run_id="run_9"):
            tg.start_soon(child)
    assert seen == ["run_9"]


@pytest.mark.parametrize(
    "created",
    [1795677788.2089996, 1795677788.9999996, 1795677788.0000004, 1795677788.9995, 0.5, 1.0],
)
def test_timestamps_are_datetimes_isoformat_in_milliseconds(created: float) -> None:
    """The second is formatted once and kept; the milliseconds round as datetime does."""
    rec = record()
    for nearby in (created - 1.0, created, created + 0.25, created):  # the cache comes and goes
        at = datetime.datetime.fromtimestamp(nearby, datetime.UTC)
        want = at.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        rec.created = nearby
        assert TextFormatter().format(rec).split(" ")[0] == want
        assert json.loads(JsonFormatter().format(rec))["ts"] == want


class Writes:
    """A stream that keeps each write (one string per system call in a real one)."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> None:
        self.writes.append(text)

    def flush(self) -> None:
        pass


def line_handler() -> tuple[logging.Logger, Writes, LineHandler]:
    """A logger whose lines its handler batches (as the access log's)."""
    stream = Writes()
    name = f"test.lines.{id(stream)}"
    handler = LineHandler(stream, batched=[name])
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger(name)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.handlers[:] = [handler]
    return logger, stream, handler


@pytest.mark.anyio
async def test_a_loop_iterations_lines_are_one_write_after_it() -> None:
    logger, stream, _ = line_handler()
    logger.info("a")
    logger.debug("b")
    assert stream.writes == []  # not yet: at the end of this iteration
    await anyio.sleep(0.01)
    logger.info("c")
    await anyio.sleep(0.01)
    assert stream.writes == ["INFO a\nDEBUG b\n", "INFO c\n"]


@pytest.mark.anyio
async def test_a_warning_is_written_at_once_after_the_lines_before_it() -> None:
    logger, stream, _ = line_handler()
    logger.info("a")
    logger.warning("w")
    assert stream.writes == ["INFO a\nWARNING w\n"]
    logger.info("b")
    await anyio.sleep(0.01)
    assert stream.writes == ["INFO a\nWARNING w\n", "INFO b\n"]


@pytest.mark.anyio
async def test_other_loggers_lines_are_written_at_once_after_those_waiting() -> None:
    """A line about the process's own life is never left waiting (a kill loses it)."""
    logger, stream, handler = line_handler()
    other = logging.getLogger(f"{logger.name}.other.x")  # not named in batched
    other.propagate = False
    other.setLevel(logging.DEBUG)
    other.handlers[:] = [handler]
    logger.info("a")
    other.info("lifecycle")
    assert stream.writes == ["INFO a\nINFO lifecycle\n"]
    assert LineHandler().batched == {"jetrun.access"}  # configure()'s: the access log


def test_lines_off_a_loop_are_written_at_once() -> None:
    logger, stream, _ = line_handler()
    logger.info("a")
    assert stream.writes == ["INFO a\n"]


def test_lines_of_a_loop_that_ended_come_before_the_next_and_at_flush() -> None:
    logger, stream, handler = line_handler()

    def log_on_a_loop_that_stops() -> None:
        loop = asyncio.new_event_loop()

        def last() -> None:
            logger.info("last")  # due at the end of the iteration: the loop stops first
            loop.stop()

        loop.call_soon(last)
        loop.run_forever()
        loop.close()

    log_on_a_loop_that_stops()
    assert stream.writes == []
    logger.info("after")
    assert stream.writes == ["INFO last\nINFO after\n"]

    log_on_a_loop_that_stops()
    handler.flush()  # as logging.shutdown at exit
    assert stream.writes[-1] == "INFO last\n"
