"""The fleet ignores an agent declared lost until it restarts; pure, no NATS."""

from __future__ import annotations

from contracts.agents import Accelerator, AgentHeartbeat
from runtime.infra.fleet import Fleet


def beat(agent_id: str, started_at: float, running: list[str] | None = None) -> AgentHeartbeat:
    return AgentHeartbeat(
        agent_id=agent_id,
        at=started_at,
        started_at=started_at,
        accelerators=[Accelerator(kind="cpu", slots=1)],
        pipelines=[],
        running=running or [],
    )


def fleet() -> Fleet:
    return Fleet(lambda: 0.0, loss_timeout_s=10.0)


def test_the_process_declared_lost_stays_ignored_and_a_restarted_one_is_taken_back() -> None:
    f = fleet()
    assert f.observe(beat("a", started_at=100.0))
    f.forget("a")
    assert f.is_gone("a")
    assert not f.observe(beat("a", started_at=100.0))  # the zombie itself
    assert f.get("a") is None
    assert f.observe(beat("a", started_at=200.0))  # restarted with the same id
    assert not f.is_gone("a") and f.get("a") is not None


def test_an_agent_lost_before_it_was_heard_comes_back_once_it_holds_nothing() -> None:
    f = fleet()
    f.suspect("a")  # known only from the log: it holds runs
    f.forget("a")
    assert not f.observe(beat("a", started_at=100.0, running=["run_1"]))
    assert f.observe(beat("a", started_at=100.0))
