"""The access record (``runtime.infra.accesslog.write``): every record, the first of a thread
and the later ones made from its copy, carries what a ``LogRecord`` carries, its own time and
the request's fields; a record factory someone installed is honoured; nothing when INFO is off."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from runtime.infra import accesslog


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def collected() -> Iterator[list[logging.LogRecord]]:
    handler = Collect()
    log = logging.getLogger("jetrun.access")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield handler.records
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def scope(path: str, team: str | None = None) -> dict[str, Any]:
    state = {"team": team} if team else {}
    return {"method": "GET", "path": path, "client": ("10.0.0.1", 4242), "state": state}


def test_records_are_whole_and_each_their_own(collected: list[logging.LogRecord]) -> None:
    accesslog.write(scope("/a", "acme"), 200, 0.0012)
    time.sleep(0.01)
    accesslog.write(scope("/b"), 404, 0.5)
    first, second = collected
    reference = logging.LogRecord("jetrun.access", logging.INFO, __file__, 0, "m", (), None)
    for record in (first, second):
        assert set(vars(reference)) <= set(vars(record))
        assert (record.levelname, record.thread) == ("INFO", threading.get_ident())
        assert record.filename == "accesslog.py" and record.process == reference.process
    assert first.getMessage() == "GET /a 200" and second.getMessage() == "GET /b 404"
    assert (first.team, second.team) == ("acme", None)  # type: ignore[attr-defined]
    assert (first.duration_ms, second.duration_ms) == (1.2, 500.0)  # type: ignore[attr-defined]
    assert first.client == "10.0.0.1:4242"  # type: ignore[attr-defined]
    assert second.created - first.created >= 0.01
    assert second.relativeCreated - first.relativeCreated == pytest.approx(
        (second.created - first.created) * 1000, abs=0.01
    )
    assert second.msecs == int((second.created % 1) * 1000)
    assert getattr(second, "message", "GET /b 404") == "GET /b 404"  # not the first one's


def test_another_thread_and_a_record_factory(collected: list[logging.LogRecord]) -> None:
    accesslog.write(scope("/a"), 200, 0.001)
    done = threading.Thread(target=accesslog.write, args=(scope("/t"), 200, 0.001))
    done.start()
    done.join(5)
    assert collected[1].thread != collected[0].thread == threading.get_ident()
    made: list[str] = []
    factory = logging.getLogRecordFactory()

    def counting(*args: Any, **kwargs: Any) -> logging.LogRecord:
        made.append(args[0])
        return factory(*args, **kwargs)

    logging.setLogRecordFactory(counting)
    try:
        accesslog.write(scope("/f"), 200, 0.001)
        accesslog.write(scope("/g"), 200, 0.001)
    finally:
        logging.setLogRecordFactory(factory)
    assert made == ["jetrun.access", "jetrun.access"]


def test_nothing_when_info_is_off(collected: list[logging.LogRecord]) -> None:
    logging.getLogger("jetrun.access").setLevel(logging.WARNING)
    accesslog.write(scope("/a"), 200, 0.001)
    assert collected == []


def test_a_forked_child_names_its_own_process(collected: list[logging.LogRecord]) -> None:
    """The template of the parent's last record is forgotten in a forked child."""
    accesslog.write(scope("/parent"), 200, 0.001)
    assert collected[0].process == os.getpid()
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # the child: its record's process id, through the pipe
        try:
            accesslog.write(scope("/child"), 200, 0.001)
            os.write(write_end, str(collected[-1].process).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        deadline = time.monotonic() + 10
        while os.waitpid(child, os.WNOHANG) == (0, 0):
            assert time.monotonic() < deadline, "the forked child did not end"
            time.sleep(0.01)
        assert os.read(read_end, 64).decode() == str(child)
    finally:
        os.close(read_end)
