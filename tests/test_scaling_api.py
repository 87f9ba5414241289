"""The scaling view without a server: replica states and who sees startup errors."""

from __future__ import annotations

from types import SimpleNamespace

from contracts.agents import (
    Accelerator,
    AgentHeartbeat,
    LoadedPipeline,
    PipelineInfo,
    PipelineStatus,
)
from contracts.scaling import ReplicaState, ScalingSettings, WarmWindow
from runtime.control.scaling_api import ScalingApi, kept_over_limit
from runtime.infra.config import parse
from runtime.infra.fleet import Fleet
from runtime.infra.projection import RunIndex
from tests.fakes import FakeClock

POINTER = "acme/model:v1"


def api(*pipelines: LoadedPipeline) -> ScalingApi:
    clock = FakeClock()
    fleet = Fleet(clock.monotonic, 10.0)
    fleet.observe(
        AgentHeartbeat(
            agent_id="a1",
            at=0.0,
            started_at=0.0,
            accelerators=[Accelerator(kind="cpu", slots=2)],
            pipelines=list(pipelines),
        )
    )
    config = parse({"settings": {"scaling_operators": ["ops"]}})
    log = SimpleNamespace(js=None, settings=SimpleNamespace(replicas=1))
    gateway = SimpleNamespace(clock=clock, fleet=fleet, index=RunIndex(), config=config, log=log)
    return ScalingApi(gateway)  # type: ignore[arg-type]


def test_startup_errors_are_shown_only_to_the_pipeline_team_and_operators() -> None:
    failed = LoadedPipeline(pointer=POINTER, status=PipelineStatus.failed, error="secret path")
    scaling = api(failed)
    info = PipelineInfo(pointer=POINTER, scaling=ScalingSettings(max_replicas=2))
    assert scaling.manages("acme", POINTER) and scaling.manages("ops", POINTER)
    assert not scaling.manages("rival", POINTER)
    own = scaling.view(info, errors=True)
    assert [(r.agent_id, r.state, r.error) for r in own.replicas] == [
        ("a1", ReplicaState.failed, "secret path")
    ]
    other = scaling.view(info, errors=False)
    assert [(r.state, r.error) for r in other.replicas] == [(ReplicaState.failed, None)]
    assert other.current_replicas == 0 and other.autoscaled


def test_always_on_pipeline_desires_a_replica_only_while_runs_wait() -> None:
    ready = LoadedPipeline(pointer=POINTER, status=PipelineStatus.ready)
    view = api(ready).view(PipelineInfo(pointer=POINTER))
    assert view.current_replicas == 1 and view.desired_replicas == 1 and not view.autoscaled
    assert view.current_pipeline_states == {"ready": 1}


def test_a_team_keeps_no_more_idle_replicas_than_its_tier_runs_at_once() -> None:
    """min_replicas 1000 (or a warm window) would hold every node a provider can add."""
    other = PipelineInfo(
        pointer="acme/other:v1", scaling=ScalingSettings(min_replicas=2, max_replicas=2)
    )
    rivals = PipelineInfo(
        pointer="rival/big:v1", scaling=ScalingSettings(min_replicas=9, max_replicas=9)
    )
    catalog = SimpleNamespace(entries=lambda: [other, rivals])
    huge = ScalingSettings(min_replicas=1000, max_replicas=1000)
    assert "at most 3" in (kept_over_limit("acme", 3, POINTER, huge, catalog) or "")
    one = ScalingSettings(min_replicas=1, max_replicas=1000)  # 2 elsewhere + 1: within 3
    assert kept_over_limit("acme", 3, POINTER, one, catalog) is None
    window = WarmWindow(start="08:00", end="18:00", replicas=2)
    warm = ScalingSettings(max_replicas=5, warm=[window])
    assert kept_over_limit("acme", 3, POINTER, warm, catalog) is not None
    assert kept_over_limit("acme", None, POINTER, huge, catalog) is None  # unlimited tier
    same = SimpleNamespace(entries=lambda: [PipelineInfo(pointer=POINTER, scaling=huge)])
    assert kept_over_limit("acme", 3, POINTER, one, same) is None  # its own old settings
    scale_by_demand = ScalingSettings(max_replicas=1000)  # no floor: demand stays in the tier
    assert kept_over_limit("acme", 3, POINTER, scale_by_demand, catalog) is None
