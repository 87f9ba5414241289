"""The outbox's knowledge of live runs' callbacks, and when it may acknowledge (pure)."""

from __future__ import annotations

from contracts import RunSubmitted
from contracts.events import encode_event
from runtime.control.webhook_outbox import AckWindow, Callbacks, stream_seq, subject_parts


def submitted(run_id: str, url: str | None) -> bytes:
    event = RunSubmitted(run_id=run_id, at=1.0, team="t", pipeline="a/b:v1", inputs=[])
    if url is not None:
        event = RunSubmitted(
            run_id=run_id, at=1.0, team="t", pipeline="a/b:v1", inputs=[], callback_url=url
        )
    return encode_event(event)


def test_a_run_seen_submitted_ends_with_its_callback_or_none_and_is_forgotten() -> None:
    callbacks = Callbacks()
    callbacks.submitted("run_a", submitted("run_a", "https://example.com/hook"))
    callbacks.submitted("run_b", submitted("run_b", None))
    assert len(callbacks) == 2
    assert callbacks.ended("run_a") == (True, "https://example.com/hook")
    assert callbacks.ended("run_b") == (True, None)
    assert len(callbacks) == 0  # bounded by live runs
    assert callbacks.ended("run_a") == (False, None)  # a second end: ask the log


def test_a_run_never_seen_or_undecodable_is_unknown() -> None:
    callbacks = Callbacks()
    callbacks.submitted("run_x", b"{not json")
    assert callbacks.ended("run_x") == (False, None)
    assert callbacks.ended("run_never") == (False, None)


def test_subject_parts() -> None:
    assert subject_parts("jetrun.ev.run_1.completed") == ("run_1", "completed")


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


def test_the_stream_sequence_is_read_from_either_form_of_ack_subject() -> None:
    v1 = "$JS.ACK.JETRUN_EVENTS.webhooks-outbox.1.12345.67.1732600000000000000.17"
    v2 = "$JS.ACK.hub.ACCHASH.JETRUN_EVENTS.webhooks-outbox.2.12346.68.1732600000000000000.3.tok"
    assert stream_seq(v1) == 12345
    assert stream_seq(v2) == 12346
    assert stream_seq(v2.rsplit(".", 1)[0]) == 12346  # 11 tokens: no final token
    for other in (None, "", "_INBOX.x.y", "$JS.ACK.a.b.c", "$JS.ACK.S.C.1.x.2.3.4"):
        assert stream_seq(other) is None
