"""Admission against a real nats-server: exact under concurrency, permits given back."""

from __future__ import annotations

import anyio
import pytest
from nats.aio.client import Client

from contracts import RunSubmitted
from contracts.events import AdmissionSlot, RunCancelled
from contracts.machine import fold
from contracts.run import RunRecord
from runtime.control.admission import Admission, LimitReached

pytestmark = pytest.mark.anyio


async def test_fifty_concurrent_admissions_admit_exactly_the_limit(nc: Client) -> None:
    admission = Admission(nc.jetstream(), {3, 5}, lookback_s=3600)
    await admission.ensure()
    await admission.ensure()  # idempotent
    results: list[AdmissionSlot | LimitReached | None] = []

    async def admit(i: int) -> None:
        try:
            slot = await admission.try_admit(
                team="acme", tier="basic", limit=3, run_id=f"r{i}", now=1.0
            )
            results.append(slot)
        except LimitReached as full:
            results.append(full)

    async with anyio.create_task_group() as tg:
        for i in range(50):
            tg.start_soon(admit, i)
    slots = [r for r in results if isinstance(r, AdmissionSlot)]
    refused = [r for r in results if isinstance(r, LimitReached)]
    assert len(slots) == 3 and len(refused) == 47
    assert refused[0].tier == "basic" and refused[0].limit == 3 and refused[0].active == 3
    assert "basic tier's limit of 3" in str(refused[0])
    # another team, same tier: its own count
    assert await admission.try_admit(team="rival", tier="basic", limit=3, run_id="x", now=1.0)
    # unlimited tiers take no permit
    assert (
        await admission.try_admit(team="big", tier="startup", limit=None, run_id="y", now=1.0)
        is None
    )
    # giving one back admits the next; giving it back twice is harmless
    assert await admission.release(slots[0])
    assert not await admission.release(slots[0])
    assert await admission.try_admit(team="acme", tier="basic", limit=3, run_id="next", now=1.0)


async def test_a_retried_admission_of_the_same_run_takes_one_permit(nc: Client) -> None:
    admission = Admission(nc.jetstream(), {3}, lookback_s=3600)
    await admission.ensure()
    first = await admission.try_admit(team="acme", tier="basic", limit=3, run_id="r", now=1.0)
    again = await admission.try_admit(team="acme", tier="basic", limit=3, run_id="r", now=1.0)
    assert first == again
    assert len(await admission.holders(3, "acme")) == 1


async def test_permits_of_ended_runs_are_reclaimed_and_swept(nc: Client) -> None:
    records: dict[str, RunRecord] = {}
    admission = Admission(nc.jetstream(), {2}, lookback_s=3600, lookup=records.get)
    await admission.ensure()
    for run_id in ("a", "b"):
        await admission.try_admit(team="t", tier="x", limit=2, run_id=run_id, now=100.0)
    with pytest.raises(LimitReached):
        await admission.try_admit(team="t", tier="x", limit=2, run_id="c", now=100.0)
    # "a" ended but its permit was never given back: the next admission reclaims it
    records["a"] = fold(
        [
            RunSubmitted(run_id="a", at=1.0, team="t", pipeline="p/q:v1", inputs=[]),
            RunCancelled(run_id="a", at=2.0),
        ]
    )
    assert await admission.try_admit(team="t", tier="x", limit=2, run_id="c", now=100.0)
    # the sweep: "b" and "c" were never recorded (their gateway died, say): within the grace
    # nothing is given back; after it, both are
    assert await admission.sweep(now=101.0, grace_s=30.0) == 0
    assert await admission.sweep(now=200.0, grace_s=30.0) == 2
    assert [p.run_id for _, p in await admission.holders(2, "t")] == []


async def test_permits_are_given_back_together_and_one_already_gone_says_so(nc: Client) -> None:
    admission = Admission(nc.jetstream(), {4}, lookback_s=3600)
    await admission.ensure()
    slots = []
    for run_id in ("p", "q", "r"):
        slot = await admission.try_admit(team="g", tier="x", limit=4, run_id=run_id, now=1.0)
        assert slot is not None
        slots.append(slot)
    assert await admission.release(slots[1])  # given back before: gone
    gone = AdmissionSlot(stream=slots[0].stream, seq=slots[-1].seq + 1000)  # never existed
    assert await admission.release_all([*slots, gone]) == [True, False, True, False]
    assert await admission.holders(4, "g") == []
    assert await admission.release_all([]) == []
