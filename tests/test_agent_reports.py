"""An attempt's report: its first try is a plain publish awaited without a cancel scope; a
first try that fails, or is cancelled while it waits for its ack, is made again shielded and
retrying, with the same message id (stored once)."""

from __future__ import annotations

import anyio
import nats.errors
import pytest

from contracts.events import Event, RunCompleted, encode_event
from contracts.values import from_python
from runtime.infra.eventlog import PUBLISH_TIMEOUT_S
from runtime.node import attempts
from runtime.node.attempts import REPORT_GRACE_S, Reporter

pytestmark = pytest.mark.anyio

DONE = RunCompleted(run_id="run_r", at=1.0, attempt=1, outputs=[from_python(1)])


class Pending:
    def __init__(self, log: FakeLog) -> None:
        self.log = log

    async def ack(self) -> None:
        self.log.acks_awaited += 1
        if self.log.first_try == "hangs":
            await anyio.sleep_forever()
        if self.log.first_try == "times out":
            raise nats.errors.TimeoutError
        if self.log.first_try == "times out when told":
            await self.log.time_out.wait()
            raise nats.errors.TimeoutError


class FakeLog:
    """What ``Reporter`` uses of ``EventLog``: ``send`` (the first try) and ``append``."""

    def __init__(self, first_try: str = "stored") -> None:
        self.first_try = first_try
        self.sent: list[tuple[Event, bytes | None, bool]] = []
        self.appended: list[tuple[Event, bytes | None, bool]] = []
        self.acks_awaited = 0
        self.append_cancelled = False
        self.append_forever = False
        self.time_out = anyio.Event()

    async def send(self, event: Event, *, payload: bytes | None, callback: bool) -> Pending:
        self.sent.append((event, payload, callback))
        return Pending(self)

    async def append(self, event: Event, *, payload: bytes | None, callback: bool) -> None:
        try:
            await anyio.sleep(3600 if self.append_forever else 0.05)  # shielded: never cut short
        except anyio.get_cancelled_exc_class():
            self.append_cancelled = True
            raise
        self.appended.append((event, payload, callback))


async def test_a_report_stored_at_the_first_try_is_sent_once() -> None:
    log = FakeLog()
    with anyio.fail_after(5):
        await Reporter(log).report(DONE, encode_event(DONE), callback=True)  # type: ignore[arg-type]
    assert log.sent == [(DONE, encode_event(DONE), True)]
    assert log.acks_awaited == 1 and log.appended == []


async def test_a_report_whose_first_try_fails_is_made_again_until_stored() -> None:
    log = FakeLog(first_try="times out")
    with anyio.fail_after(5):
        await Reporter(log).report(DONE, encode_event(DONE))  # type: ignore[arg-type]
    assert len(log.sent) == 1
    assert log.appended == [(DONE, encode_event(DONE), False)]


async def test_a_report_cancelled_while_it_awaits_its_ack_is_stored_and_the_cancel_goes_on() -> (
    None
):
    log = FakeLog(first_try="hangs")
    after_report = False

    async def report() -> None:
        nonlocal after_report
        await Reporter(log).report(DONE, encode_event(DONE))  # type: ignore[arg-type]
        after_report = True  # never: the task was cancelled

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(report)
            while not log.acks_awaited:
                await anyio.sleep(0.001)
            tg.cancel_scope.cancel()  # the agent stopping while the ack is awaited
    assert log.appended == [(DONE, encode_event(DONE), False)]  # made again, shielded
    assert not log.append_cancelled
    assert not after_report


async def test_after_a_preemption_notice_reports_go_the_bounded_way_at_once() -> None:
    log = FakeLog()
    reporter = Reporter(log)  # type: ignore[arg-type]
    reporter.bound()
    with anyio.fail_after(5):
        await reporter.report(DONE, encode_event(DONE))
    assert log.sent == []  # no unbounded first try
    assert log.appended == [(DONE, encode_event(DONE), False)]


def test_a_first_try_waits_for_its_ack_no_longer_than_a_notice_grace() -> None:
    assert PUBLISH_TIMEOUT_S <= REPORT_GRACE_S


async def test_a_report_in_flight_at_a_notice_retries_only_until_the_notice_grace_is_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(attempts, "REPORT_GRACE_S", 0.3)
    log = FakeLog(first_try="times out when told")
    log.append_forever = True  # an outage: the retries would go on for the append deadline
    reporter = Reporter(log)  # type: ignore[arg-type]
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(reporter.report, DONE)
            while not log.acks_awaited:
                await anyio.sleep(0.001)
            reporter.bound()
            noticed = anyio.current_time()
            await anyio.sleep(0.2)
            log.time_out.set()  # the first try fails 0.2 s into the grace
    assert anyio.current_time() - noticed < 0.3 + 0.15  # gave up at the notice's grace
    assert log.append_cancelled and log.appended == []
