"""Golden histories: every ``tests/histories/*.json`` log must fold to the run it expects.

Each file is ``{"description": ..., "events": [...], "expect": {...}}``: the events exactly as
``encode_event`` writes them, and a subset of the ``RunRecord`` fields (nested objects such as
``error`` may be given in part). Add one for every bug found in the state machine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from contracts.events import (
    QueueWaitChanged,
    RunsDispatched,
    RunsEnded,
    RunsQueued,
    SchedulerElected,
    decode_events,
    encode_event,
)
from contracts.machine import fold
from contracts.outputs import encode_hook
from contracts.run import RunRecord

HISTORIES = Path(__file__).parent / "histories"
# a queue, the batches, the fence
NOT_A_RUNS = (QueueWaitChanged, RunsQueued, RunsDispatched, RunsEnded, SchedulerElected)
FILES = sorted(HISTORIES.glob("*.json"))

#: One per failure mode of SPEC section 3, one per happy path, and the cancel/stale cases.
REQUIRED = {
    "failed_input_error",
    "failed_pipeline_error",
    "node_preempted",
    "no_resources_wait_timeout",
    "no_resources_immediate",
    "failed_execution_timeout",
    "happy_sync",
    "happy_async",
    "retried_after_preemption",
    "cancelled_while_queued",
    "cancelled_while_running",
    "stale_completion_ignored",
}


def load(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def mismatches(expected: Any, actual: Any, where: str = "") -> list[str]:
    """Where ``actual`` differs from ``expected``; objects in ``expected`` may be partial."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        found = []
        for key, value in expected.items():
            if key not in actual:
                found.append(f"{where}.{key}: missing")
            else:
                found += mismatches(value, actual[key], f"{where}.{key}")
        return found
    if isinstance(expected, list) and isinstance(actual, list) and len(expected) == len(actual):
        return [
            m
            for i, pair in enumerate(zip(expected, actual, strict=True))
            for m in mismatches(*pair, f"{where}[{i}]")
        ]
    if expected != actual or type(expected) is not type(actual):
        return [f"{where}: expected {expected!r}, got {actual!r}"]
    return []


def test_there_are_golden_histories() -> None:
    assert FILES, f"no golden histories in {HISTORIES}"
    assert {path.stem for path in FILES} >= REQUIRED


@pytest.mark.parametrize("path", FILES, ids=lambda path: path.stem)
def test_history_folds_to_its_expected_run(path: Path) -> None:
    doc = load(path)
    assert set(doc) == {"description", "events", "expect"}
    assert doc["description"].strip()
    assert doc["events"], "a golden history needs events"
    events = decode_events(json.dumps(doc["events"]).encode())

    run = fold(events)
    expect = doc["expect"]
    assert expect, "a golden history must expect something"
    assert set(expect) <= set(RunRecord.__struct_fields__), "unknown RunRecord fields"
    assert "state" in expect
    problems = mismatches(expect, msgspec.to_builtins(run, enc_hook=encode_hook))
    assert not problems, f"{path.name}: " + "; ".join(problems)


@pytest.mark.parametrize("path", FILES, ids=lambda path: path.stem)
def test_history_is_written_as_encode_event_writes(path: Path) -> None:
    raw = load(path)["events"]
    events = decode_events(json.dumps(raw).encode())
    assert [json.loads(encode_event(event)) for event in events] == raw
    runs = {event.run_id for event in events if not isinstance(event, NOT_A_RUNS)}
    assert len(runs) == 1, "one run per history (queue events and fence markers aside)"


def test_mismatches_reports_differences() -> None:
    actual = {"state": "failed", "error": {"type": "timeout", "message": "m"}, "outputs": [1]}
    assert mismatches({"error": {"type": "timeout"}}, actual) == []
    assert mismatches({"state": "completed"}, actual) == [
        ".state: expected 'completed', got 'failed'"
    ]
    assert mismatches({"outputs": []}, actual)
    assert mismatches({"outputs": [1.0]}, actual)  # 1.0 is not the integer 1
    assert mismatches({"error": None}, actual)
    assert mismatches({"error": {"traceback": None}}, actual) == [".error.traceback: missing"]
