"""Where the outbox reads runs' ends, and when it may acknowledge (pure)."""

from __future__ import annotations

from contracts.errors import ErrorType, RunError
from contracts.events import (
    RunCancelled,
    RunCompleted,
    RunDispatched,
    RunFailed,
    RunNoResourcesAvailable,
    RunPreempted,
    RunQueued,
    RunRequeued,
    RunTimedOut,
)
from runtime.control.webhook_outbox import AckWindow, subject_parts
from runtime.control.webhooks import outbox_config
from runtime.infra.eventlog import ack_sequences as sequences
from runtime.infra.eventlog import kind_filters, subject_of
from runtime.infra.nats_auth import permissions
from runtime.infra.streams import TERMINAL_KINDS


def test_subject_parts() -> None:
    assert subject_parts("jetrun.ev.run_1.completed") == ("run_1", "completed")
    assert subject_parts("jetrun.ev.run_1.completed.callback") == ("run_1", "completed")


ERROR = RunError(type=ErrorType.pipeline_error, message="x")
ENDS = [
    RunCompleted(run_id="run_1", at=1.0, attempt=1, outputs=[]),
    RunFailed(run_id="run_1", at=1.0, attempt=1, error=ERROR),
    RunTimedOut(run_id="run_1", at=1.0, attempt=1, timeout_s=1.0),
    RunPreempted(run_id="run_1", at=1.0, attempt=1, agent_id="a", reason="gone"),
    RunNoResourcesAvailable(run_id="run_1", at=1.0, attempt=1, reason="none"),
    RunCancelled(run_id="run_1", at=1.0),
]


def matches(subject: str, pattern: str) -> bool:
    """NATS subject matching: ``*`` one token, ``>`` one or more at the end."""
    got, want = subject.split("."), pattern.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(got) > i
        if i >= len(got) or (token != "*" and token != got[i]):
            return False
    return len(got) == len(want)


def test_only_the_ends_of_runs_with_a_callback_are_on_the_outbox_subjects() -> None:
    """Every terminal kind of a run with a callback is on a subject the outbox reads; no event
    of a run without one is, nor any other kind of a run with one. Whichever form, the run's
    subjects (``jetrun.ev.<run>.>``, what fencing and readers of a run use) and the readers of
    its kind see it, and the roles that append it may."""
    assert {e.kind for e in ENDS} == set(TERMINAL_KINDS)
    outbox = outbox_config().filter_subjects or []
    others = [
        RunQueued(run_id="run_1", at=1.0, attempt=1),
        RunDispatched(run_id="run_1", at=1.0, attempt=1, agent_id="callback", callback=True),
        RunRequeued(run_id="run_1", at=1.0, attempt=1, agent_id="a", reason="gone"),
    ]
    appenders = [permissions(role).publish for role in ("scheduler", "agent:a1")]
    for event in ENDS:
        for callback in (False, True):
            subject = subject_of(event, callback)
            assert any(matches(subject, f) for f in outbox) is callback, subject
            assert matches(subject, "jetrun.ev.run_1.>")
            assert any(matches(subject, f) for f in kind_filters(event.kind))
            assert any(matches(subject, p) for perms in appenders for p in perms), subject
    for event in others:
        for callback in (False, True):
            assert not any(matches(subject_of(event, callback), f) for f in outbox)
    assert subject_of(ENDS[0], True) == "jetrun.ev.run_1.completed.callback"
    assert subject_of(ENDS[0]) == "jetrun.ev.run_1.completed"


def test_the_window_acks_the_newest_handled_only_when_nothing_else_is_outstanding() -> None:
    window: AckWindow[str] = AckWindow()
    assert window.newest is None and not window.ready(0)  # nothing handled: nothing to ack
    window.handled(12, "m12")
    window.handled(10, "m10")  # a redelivery may come after newer ones
    assert window.newest == "m12" and len(window) == 2
    assert window.ready(2)
    assert not window.ready(3)  # one more outstanding (nak'd, lost, another process's): wait
    window.acked()
    assert window.floor == 12 and window.newest is None and len(window) == 0


def test_a_late_redelivery_of_an_acked_event_is_not_counted_as_outstanding() -> None:
    window: AckWindow[str] = AckWindow()
    window.handled(5, "m5")
    window.acked()
    window.handled(5, "m5 again")  # its ack came after its ack_wait: the server sent it again
    window.handled(7, "m7")
    assert len(window) == 1 and window.newest == "m7"
    assert window.ready(1) and not window.ready(2)


def test_an_event_handled_twice_counts_once() -> None:
    window: AckWindow[str] = AckWindow()
    window.handled(3, "m3")
    window.handled(3, "m3 redelivered")
    assert len(window) == 1 and window.ready(1)


def test_the_sequences_are_read_from_either_form_of_ack_subject() -> None:
    v1 = "$JS.ACK.JETRUN_EVENTS.webhooks-outbox.1.12345.67.1732600000000000000.17"
    v2 = "$JS.ACK.hub.ACCHASH.JETRUN_EVENTS.webhooks-outbox.2.12346.68.1732600000000000000.3.tok"
    assert sequences(v1) == (12345, 67)
    assert sequences(v2) == (12346, 68)
    assert sequences(v2.rsplit(".", 1)[0]) == (12346, 68)  # 11 tokens: no final token
    for other in (None, "", "_INBOX.x.y", "$JS.ACK.a.b.c", "$JS.ACK.S.C.1.x.2.3.4"):
        assert sequences(other) is None


def test_unbroken_deliveries_since_a_verified_start_need_no_question() -> None:
    window: AckWindow[str] = AckWindow()
    window.handled(10, "m10", delivery=1)
    assert not window.unbroken  # nothing known of what came before: ask the server
    assert window.ready(1)
    window.verified(delivered=1)
    window.acked()
    window.handled(11, "m11", delivery=2)
    window.handled(13, "m13", delivery=3)
    assert window.unbroken and window.newest == "m13"
    window.acked()
    window.handled(15, "m15", delivery=5)  # delivery 4 (14) went elsewhere, or was lost
    assert not window.unbroken
    assert not window.ready(2)  # 14 is still outstanding: no ack may cover it
    window.handled(14, "m14 again", delivery=6)  # delivered again
    assert not window.unbroken and window.ready(2) and window.newest == "m15"
    window.verified(delivered=6)
    window.acked()
    window.handled(16, "m16", delivery=7)
    assert window.unbroken
    window.failed(delivery=8)  # nak'd: outstanding and not handled
    window.handled(17, "m17", delivery=9)
    assert not window.unbroken and not window.ready(3)


def test_deliveries_made_before_the_verified_start_are_no_gap() -> None:
    window: AckWindow[str] = AckWindow()
    window.handled(5, "m5", delivery=4)
    assert window.ready(1)
    window.verified(delivered=6)  # two more were on their way (redeliveries of handled ones)
    window.acked()
    window.handled(5, "m5 again", delivery=5)
    window.handled(5, "m5 again", delivery=6)
    window.handled(8, "m8", delivery=7)
    assert window.unbroken and window.newest == "m8" and len(window) == 1


def test_an_ack_whose_answer_was_lost_is_learnt_from_the_ack_floor() -> None:
    window: AckWindow[str] = AckWindow()
    window.handled(10, "m10")
    window.handled(11, "m11")  # acked, but the answer never came: not ``acked``
    window.handled(14, "m14")
    # 12 is outstanding and was never handled here: counting 10 and 11 would hide it
    assert not window.ready(outstanding=2, acked_to=11)
    assert window.floor == 11 and len(window) == 1 and window.newest == "m14"
    assert window.ready(outstanding=1, acked_to=11)
