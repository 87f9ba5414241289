"""Names that reach NATS subjects are checked where they enter: no wildcard, no extra token."""

from __future__ import annotations

import pytest

from contracts.names import check_pointer, check_token, is_pointer
from runtime.infra.catalog import pipeline_subject
from runtime.infra.eventlog import event_subject, run_subjects

BAD_POINTERS = ["*", ">", "demo/*:v1", "demo/echo:>", "demo/echo", "a b/c:d", "x/y:v1 ", ""]


@pytest.mark.parametrize("pointer", BAD_POINTERS)
def test_a_pointer_with_a_wildcard_or_the_wrong_shape_never_makes_a_subject(pointer: str) -> None:
    assert not is_pointer(pointer)
    with pytest.raises(ValueError, match="invalid pipeline pointer"):
        check_pointer(pointer)
    with pytest.raises(ValueError):
        pipeline_subject(pointer)


def test_a_pointer_with_dots_is_one_escaped_token() -> None:
    assert pipeline_subject("acme/sd.xl:v1.0") == "jetrun.pipelines.acme~ssd~dxl~cv1~d0"


@pytest.mark.parametrize("run_id", ["*", ">", "run.x", "run x", "", "a" * 201])
def test_a_run_id_that_is_not_one_token_never_makes_a_subject(run_id: str) -> None:
    with pytest.raises(ValueError, match="invalid run id"):
        event_subject(run_id, "submitted")
    with pytest.raises(ValueError, match="invalid run id"):
        run_subjects(run_id)


def test_plain_ids_are_tokens() -> None:
    check_token("run_0123abcd", "run id")
    check_token("agent-gpu-1", "agent id")
    assert event_subject("run_1", "output") == "jetrun.ev.run_1.output"
