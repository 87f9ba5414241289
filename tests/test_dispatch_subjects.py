"""Dispatches name their agent in the subject: an agent's consumer receives only its own, while
a run's events (``jetrun.ev.<run_id>.>``) still include its dispatches."""

from __future__ import annotations

import anyio
import pytest
from nats.aio.client import Client

from contracts.events import AnyEvent, RunDispatched, RunSubmitted
from runtime.infra.eventlog import EventLog, agent_dispatches, dispatch_subject, kind_subjects

pytestmark = pytest.mark.anyio


def dispatch(run_id: str, agent_id: str) -> RunDispatched:
    return RunDispatched(run_id=run_id, at=1.0, attempt=1, agent_id=agent_id)


@pytest.mark.parametrize("agent_id", ["*", ">", "a.b", "a b", ""])
def test_an_agent_id_that_is_not_one_token_never_makes_a_subject(agent_id: str) -> None:
    with pytest.raises(ValueError, match="invalid agent id"):
        dispatch_subject("run_1", agent_id)
    with pytest.raises(ValueError, match="invalid agent id"):
        agent_dispatches(agent_id)


async def test_an_agent_receives_only_the_dispatches_addressed_to_it(nc: Client) -> None:
    log = EventLog(nc)
    await log.ensure()
    for i, agent_id in enumerate(["a1", "a2", "a1", "a3"]):
        run_id = f"run_{i}"
        await log.append(
            RunSubmitted(run_id=run_id, at=1.0, team="t", pipeline="t/p:v1", inputs=[])
        )
        await log.append(dispatch(run_id, agent_id))
    seen: list[AnyEvent] = []
    done = anyio.Event()

    async def on_event(seq: int, event: AnyEvent) -> None:
        seen.append(event)
        if len(seen) == 2:
            done.set()

    sub = await log.tail(on_event, subjects=[agent_dispatches("a1"), kind_subjects("cancelled")])
    try:
        with anyio.fail_after(10):
            await done.wait()
        await anyio.sleep(0.3)  # nothing else arrives
    finally:
        await sub.unsubscribe()
    assert [(e.run_id, getattr(e, "agent_id", None)) for e in seen] == [
        ("run_0", "a1"),
        ("run_2", "a1"),
    ]
    assert [s.event.kind for s in await log.read("run_1")] == ["submitted", "dispatched"]
    assert len(await log.read_subject(kind_subjects("dispatched"))) == 4
