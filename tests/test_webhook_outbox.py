"""Where the outbox reads runs' ends, and when it may acknowledge (pure)."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

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
    dispatched_runs,
)
from runtime.control.webhook_outbox import AckWindow, ack_subject, subject_parts
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
        dispatched_runs(  # a batch of runs with a callback: on no outbox subject either
            [RunDispatched(run_id=r, at=1.0, attempt=1, agent_id="a", callback=True) for r in "xy"],
            1.0,
        ),
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


def test_the_window_acks_below_the_first_event_not_handled_when_nothing_else_is_outstanding() -> (
    None
):
    window: AckWindow[str] = AckWindow()
    assert window.target is None and not window.ready(0)  # nothing handled: nothing to ack
    assert window.received(10, 1) and window.received(12, 2) and window.received(14, 3)
    window.handled(12, "m12")
    assert window.target is None  # 10 is being handled: no ack may cover it
    window.handled(10, "m10")
    assert window.target == (12, "m12") and len(window) == 2 and window.busy == 1
    assert window.ready(3)  # 10, 12 handled, 14 being handled: all outstanding are known
    assert not window.ready(4)  # one more outstanding (lost, another process's): wait
    window.verified(delivered=3, acked_delivery=0)
    assert window.ack_delivery == 1
    window.acked(12, 1)
    assert window.floor == 12 and window.target is None and len(window) == 0
    window.failed(14)  # nak'd: it holds the ack until it comes again and is handled
    assert window.received(16, 4)
    window.handled(16, "m16")
    assert window.target is None and not window.unbroken
    assert window.received(14, 5)  # delivered again: handled again
    window.handled(14, "m14")
    assert window.target == (16, "m16") and window.ready(2)


def test_an_event_redelivered_while_handled_or_after_it_is_not_handled_twice() -> None:
    window: AckWindow[str] = AckWindow()
    assert window.received(5) and not window.received(5)  # its ack_wait passed meanwhile
    window.handled(5, "m5")
    assert not window.received(5) and window.ready(1)
    window.verified(delivered=2)
    window.acked(5, 1)
    assert not window.received(5)  # acked: its ack came after its ack_wait
    assert window.received(7) and len(window) == 0 and window.busy == 1


def test_an_ack_the_server_did_not_take_lets_what_comes_again_be_handled_again() -> None:
    window: AckWindow[str] = AckWindow()
    window.received(5, 1)
    window.handled(5, "m5")
    window.verified(delivered=1)
    window.acked(5, 1)
    assert not window.ready(outstanding=1, acked_to=0)  # the server's floor is still 0
    assert window.floor == 0 and window.received(5, 2)


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
    window.received(10, 1)
    window.handled(10, "m10")
    assert not window.unbroken  # nothing known of what came before: ask the server
    assert window.ready(1)
    window.verified(delivered=1)
    window.acked(10, 1)
    window.received(11, 2)
    window.received(13, 3)
    window.handled(13, "m13")
    window.handled(11, "m11")
    assert window.unbroken and window.target == (13, "m13")
    window.acked(13, 2)
    window.received(15, 5)  # delivery 4 (14) went elsewhere, or was lost
    window.handled(15, "m15")
    assert not window.unbroken
    assert not window.ready(2)  # 14 is still outstanding: no ack may cover it
    window.received(14, 6)  # delivered again
    window.handled(14, "m14 again")
    assert not window.unbroken and window.ready(2) and window.target == (15, "m15")
    window.verified(delivered=6, acked_delivery=2)
    window.acked(15, 3)
    window.received(16, 7)
    window.handled(16, "m16")
    assert window.unbroken
    window.received(17, 8)
    window.failed(17)  # nak'd: outstanding and not handled
    window.received(18, 9)
    window.handled(18, "m18")
    assert not window.unbroken and window.target == (16, "m16") and not window.ready(4)


def test_deliveries_made_before_the_verified_start_are_no_gap() -> None:
    window: AckWindow[str] = AckWindow()
    window.received(5, 4)
    window.handled(5, "m5")
    assert window.ready(1)
    window.verified(delivered=6)  # two more were on their way (redeliveries of handled ones)
    window.acked(5, 1)
    assert not window.received(5, 5) and not window.received(5, 6)
    window.received(8, 7)
    window.handled(8, "m8")
    assert window.unbroken and window.target == (8, "m8") and len(window) == 1


def test_an_ack_whose_answer_was_lost_is_learnt_from_the_ack_floor() -> None:
    window: AckWindow[str] = AckWindow()
    for seq in (10, 11, 14):
        window.received(seq)
        window.handled(seq, f"m{seq}")
    # 11 acked, but the answer never came; 12 is outstanding and was never handled here:
    # counting 10 and 11 would hide it
    assert not window.ready(outstanding=2, acked_to=11)
    assert window.floor == 11 and len(window) == 1 and window.target == (14, "m14")
    assert window.ready(outstanding=1, acked_to=11)


def test_each_ack_names_a_newer_delivery_than_the_last_and_none_past_the_newest() -> None:
    """The server ignores an ack (``AckPolicy.ALL``) whose delivery number is not above the
    last one it took: a redelivered event (a newer number) acked before later events
    delivered earlier would otherwise make their acks be ignored."""
    window: AckWindow[str] = AckWindow()
    for seq, delivery in ((1, 1), (2, 2), (3, 3)):
        window.received(seq, delivery)
    window.failed(1)
    window.handled(2, "m2")
    window.handled(3, "m3")
    window.received(1, 4)  # again, with the newest number
    window.handled(1, "m1")
    assert window.ready(3)
    window.verified(delivered=4, acked_delivery=0)
    assert window.ack_delivery == 1  # not 4: later acks could not name a newer one
    window.acked(3, 1)
    window.received(5, 5)
    window.received(6, 6)
    window.handled(5, "m5")
    assert window.ack_delivery == 2
    window.acked(5, 2)
    window.handled(6, "m6")
    assert window.ack_delivery == 3 and window.target == (6, "m6")
    window.acked(6, 3)
    assert window.ack_delivery == 4


def test_the_ack_subject_names_the_delivery_given() -> None:
    v1 = "$JS.ACK.JETRUN_EVENTS.webhooks-outbox.1.12345.67.1732600000000000000.17"
    v2 = "$JS.ACK.hub.ACCHASH.JETRUN_EVENTS.webhooks-outbox.2.12346.68.1732600000000000000.3.tok"
    assert sequences(ack_subject(v1, 3)) == (12345, 3)
    assert sequences(ack_subject(v2, 9)) == (12346, 9)
    assert ack_subject("_INBOX.x.y", 1) is None


@settings(max_examples=300, deadline=None)
@given(st.randoms(use_true_random=False), st.integers(1, 12))
def test_no_ack_ever_covers_an_event_not_handled(rnd: random.Random, n: int) -> None:
    """Events finishing in any order, some failing and coming again: every ack covers only
    handled events, names a newer delivery than the last, and none past the newest."""
    window: AckWindow[int] = AckWindow()
    queue = list(range(1, n + 1))  # stream sequences, in the order delivered
    delivery, open_, done = 0, set[int](), set[int]()
    acked_deliveries: list[int] = []
    window.verified(delivered=0, acked_delivery=0)
    while queue or open_:
        move = rnd.choice(["deliver"] * bool(queue) + ["finish"] * bool(open_) + ["ack"])
        if move == "deliver":
            seq = queue.pop(0)
            delivery += 1
            if window.received(seq, delivery):
                open_.add(seq)
        elif move == "finish":
            seq = rnd.choice(sorted(open_))
            open_.discard(seq)
            if rnd.random() < 0.7:
                window.handled(seq, seq)
                done.add(seq)
            else:
                window.failed(seq)
                queue.append(seq)  # the server delivers it again
        else:
            target, named = window.target, window.ack_delivery
            if target is None or named is None:
                continue
            assert all(s in done for s in range(window.floor + 1, target[0] + 1))
            assert named <= delivery and all(named > a for a in acked_deliveries)
            acked_deliveries.append(named)
            window.acked(target[0], named)
    assert window.target is None or window.ack_delivery is not None
