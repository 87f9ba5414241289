"""``Outputs``: the fold's outputs grow in O(1) per output and every version stays a value."""

from __future__ import annotations

import msgspec

from contracts.events import AnyEvent, RunOutputProduced
from contracts.machine import evolve, fold
from contracts.outputs import Outputs, encode_hook
from contracts.run import RunUpdate
from contracts.states import RunState
from contracts.values import IOType, RunIO, from_python
from tests.test_machine import PREFIXES, RUN

NONE = RunIO(type=IOType.none)
RUNNING: list[AnyEvent] = PREFIXES[RunState.running]["dispatched"]


def outputs_of(n: int, attempt: int = 1) -> list[RunOutputProduced]:
    return [
        RunOutputProduced(
            run_id=RUN, at=100.0 + i, attempt=attempt, index=i, output=from_python(f"o{i}")
        )
        for i in range(n)
    ]


def test_folding_n_outputs_shares_one_list_and_keeps_every_version() -> None:
    run = fold(RUNNING)
    versions = [run]
    for event in outputs_of(2000):
        versions.append(evolve(versions[-1], event))
    last = versions[-1].outputs
    assert isinstance(last, Outputs) and len(last) == 2000
    # no copy per output: every version views the same list (the old fold copied it each time)
    assert all(v.outputs._items is last._items for v in versions[2:])
    # and each version still sees only its own outputs
    assert [len(v.outputs) for v in versions] == list(range(2001))
    assert versions[10].outputs == [from_python(f"o{i}") for i in range(10)]


def test_changing_an_old_version_copies_and_leaves_the_newer_one_alone() -> None:
    old = Outputs([from_python("a")])
    new = old.put(1, from_python("b"))
    branch = old.put(1, from_python("c"))
    assert new == [from_python("a"), from_python("b")]
    assert branch == [from_python("a"), from_python("c")]
    assert old == [from_python("a")]
    assert new.put(0, from_python("z")) == [from_python("z"), from_python("b")]
    assert new == [from_python("a"), from_python("b")]


def test_gaps_are_placeholders_and_a_resend_changes_nothing() -> None:
    out = Outputs().put(2, from_python("c"))
    assert out == [NONE, NONE, from_python("c")]
    assert out.put(2, from_python("c")) is out
    assert out.extend_from(4, []) == [NONE, NONE, from_python("c"), NONE]
    assert out.extend_from(1, [from_python("x")]) == [NONE, from_python("x")]


def test_outputs_encode_as_a_list() -> None:
    run = fold([*RUNNING, *outputs_of(2)])
    data = msgspec.json.encode(run, enc_hook=encode_hook)
    assert msgspec.json.decode(data)["outputs"] == [
        {"type": "string", "value": "o0", "file": None},
        {"type": "string", "value": "o1", "file": None},
    ]


def test_a_stream_update_carries_only_the_new_outputs() -> None:
    run = fold([*RUNNING, *outputs_of(5)])
    update = RunUpdate.of_update(run, None, 3)
    assert update.outputs == [from_python("o3"), from_python("o4")]
    assert update.outputs_start == 3 and update.state == "running"
