"""The outbox's knowledge of live runs' callbacks (pure)."""

from __future__ import annotations

from contracts import RunSubmitted
from contracts.events import encode_event
from runtime.control.webhook_outbox import Callbacks, subject_parts


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
