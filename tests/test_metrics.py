"""Metrics and health ports, scraped from real processes: a gateway, a scheduler and agents
(with their own /metrics, /healthz, /readyz), through runs, a queue, an admission refusal, an
agent SIGKILL and a nats-server outage."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest
from nats.errors import NoRespondersError
from prometheus_client import Counter
from prometheus_client.parser import text_string_to_metric_families

from runtime.infra.jsretry import retrying
from runtime.infra.metrics import LOG_FAILURES, LOG_RETRIES
from tests.harness import FIXTURES, Stack, client, open_gate, wait_ready, wait_replicas, wait_state

pytestmark = pytest.mark.anyio
GATES = str(FIXTURES / "gate_pipelines.py")
ADMIN = "tok_admin"  # the gateway's /metrics holds every team's counts: admin tokens only

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(url: str, token: str | None = None) -> Samples:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(timeout=10, headers=headers) as http:
        response = await http.get(f"{url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name`` over the samples that carry ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


async def eventually(url: str, check: object, timeout: float = 20.0) -> Samples:
    deadline = time.monotonic() + timeout
    while True:
        samples = await scrape(url)
        if check(samples):  # type: ignore[operator]
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"{url}/metrics never satisfied the check:\n{samples}")
        await anyio.sleep(0.2)


@pytest.fixture(scope="module")
async def mstack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with Stack(tmp_path_factory.mktemp("metrics")) as stack:
        await stack.start_nats()
        stack.start_scheduler()
        await stack.start_gateway()
        stack.start_agent("agent-demo", "runtime.node.demo", slots=2)
        stack.start_agent("agent-gates", GATES, slots=1)
        await wait_replicas(stack.url, "tok_big", "demo/echo:v1")
        await wait_replicas(stack.url, "tok_big", "test/gate:v1")
        for name in ("scheduler", "agent-demo", "agent-gates"):
            await wait_ready(stack.health_urls[name])
        yield stack


def gate_body(path: Path) -> dict[str, object]:
    return {
        "pipeline": "test/gate:v1",
        "inputs": [{"type": "string", "value": str(path)}],
        "async_run": True,
    }


async def test_runs_queues_phases_slots_and_refusals(mstack: Stack, tmp_path: Path) -> None:
    echo = {
        "pipeline": "demo/echo:v1",
        "inputs": [{"type": "string", "value": "m"}, {"type": "integer", "value": 2}],
    }
    gates = [tmp_path / f"gate{i}" for i in range(3)]
    async with client(mstack, "tok_big") as big, client(mstack, "tok_acme") as acme:
        for _ in range(3):
            assert (await big.post("/v4/runs", json=echo)).status_code == 200
        held = [(await acme.post("/v4/runs", json=gate_body(g))).json()["id"] for g in gates]
        refused = await acme.post("/v4/runs", json=gate_body(tmp_path / "never"))
        assert refused.status_code == 429
        await wait_state(acme, held[0], {"running"})
        await wait_state(acme, held[2], {"queued"})
        with anyio.fail_after(30):  # its ``started`` is stored (the attempt ran 50 ms) before
            while (await acme.get(f"/v4/runs/{held[0]}")).json()["waiting_for"] != "execution":
                await anyio.sleep(0.05)  # its gate opens, however slow the machine

        for i in range(3):  # odd methods and paths do not make new label values
            await big.request(f"BREW{i}", f"/no/such/path/{i}")
        gateway = await scrape(mstack.url, ADMIN)
        assert value(gateway, "jetrun_runs", state="completed", pipeline="demo/echo:v1") >= 3
        assert value(gateway, "jetrun_runs", state="running", pipeline="test/gate:v1") == 1
        assert value(gateway, "jetrun_queue_depth", pipeline="test/gate:v1") == 2
        assert value(gateway, "jetrun_queue_oldest_wait_seconds", pipeline="test/gate:v1") > 0
        assert value(gateway, "jetrun_admission_refusals_total", team="acme") == 1
        assert value(gateway, "jetrun_admission_refusals_total", team="big") == 0
        post = {"route": "/v4/runs", "method": "POST"}
        assert value(gateway, "jetrun_http_request_duration_seconds_count", **post) >= 7
        assert value(gateway, "jetrun_http_request_duration_seconds_count", status="429") == 1
        assert value(gateway, "jetrun_slots", kind="cpu", state="used") == 1
        assert value(gateway, "jetrun_slots", kind="cpu", state="free") == 2
        assert value(gateway, "jetrun_replicas", pipeline="test/gate:v1", status="ready") == 1
        assert value(gateway, "jetrun_index_lag_events") >= 0
        labels = {label for _, ls in gateway for _, label in ls}
        assert not any("BREW" in label or "/no/such" in label for label in labels)
        assert not any(re.search(r"run_[0-9a-f]{8}", label) for label in labels), "no run ids"

        for g in gates:
            open_gate(g, "open")
        for run_id in held:
            await wait_state(acme, run_id, {"completed"})

    def phases_seen(samples: Samples) -> bool:
        """Each gate run was placed (queue_wait counts from admission, so a run that went
        straight to the free slot is measured too) and executed; the first, held by its gate,
        reported ``started`` (the other two, ending within STARTED_AFTER_S, need not)."""
        count = "jetrun_run_phase_seconds_count"
        least = {"queue_wait": 3, "start": 1, "execution": 3}
        return all(
            value(samples, count, phase=p, pipeline="test/gate:v1") >= n for p, n in least.items()
        )

    scheduler = await eventually(mstack.health_urls["scheduler"], phases_seen)
    drained = ("jetrun_queue_depth", frozenset({("pipeline", "test/gate:v1")}))
    assert scheduler[drained] == 0  # a drained queue reads 0, it does not vanish
    waited = value(scheduler, "jetrun_run_phase_seconds_sum", phase="queue_wait")
    assert waited > 0  # two of the gate runs waited in the queue for the only slot
    assert value(scheduler, "jetrun_runs", state="completed", pipeline="test/gate:v1") >= 3
    assert value(scheduler, "jetrun_agents") == 2
    gateway = await scrape(mstack.url, ADMIN)
    assert value(gateway, "jetrun_run_phase_seconds_count") == 0, "phases are the scheduler's"

    agent = await scrape(mstack.health_urls["agent-gates"])
    assert value(agent, "jetrun_agent_slots", kind="cpu") == 1
    assert value(agent, "jetrun_agent_cold_start_seconds_count", pipeline="test/gate:v1") >= 1
    assert value(agent, "jetrun_agent_pipelines", pipeline="test/gate:v1", status="ready") == 1


async def test_health_ports_answer_and_say_why_not_ready(mstack: Stack) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        assert (await http.get(f"{mstack.url}/metrics")).status_code == 401
        as_team = {"Authorization": "Bearer tok_acme"}
        refused = await http.get(f"{mstack.url}/metrics", headers=as_team)
        assert refused.status_code == 403 and refused.json()["detail"]["code"] == "forbidden"
        for name in ("scheduler", "agent-demo"):
            url = mstack.health_urls[name]
            assert (await http.get(f"{url}/healthz")).json()["status"] == "ok"
            ready = (await http.get(f"{url}/readyz")).json()
            assert ready["status"] == "ok" and all(ready["checks"].values())


async def test_a_lost_node_and_a_nats_outage_are_counted(mstack: Stack, tmp_path: Path) -> None:
    victim = mstack.start_agent("agent-victim", GATES, slots=1)
    await wait_replicas(mstack.url, "tok_big", "test/gate:v1", n=2)
    gate = tmp_path / "never"
    async with client(mstack, "tok_big") as big:
        ids = [(await big.post("/v4/runs", json=gate_body(gate))).json()["id"] for _ in range(2)]
        for run_id in ids:
            await wait_state(big, run_id, {"running"})
        victim.kill()
        deadline = time.monotonic() + 20
        states: list[str] = []
        while "node_preempted" not in states:
            assert time.monotonic() < deadline, f"no run preempted: {states}"
            states = [(await big.get(f"/v4/runs/{r}")).json()["state"] for r in ids]
            await anyio.sleep(0.1)
        assert sorted(states) == ["node_preempted", "running"]
        for run_id, state in zip(ids, states, strict=True):
            if state == "running":
                assert (await big.post(f"/v4/runs/{run_id}/cancel")).status_code == 200

    def node_lost(samples: Samples) -> bool:
        return (
            value(samples, "jetrun_nodes_lost_total") == 1
            and value(samples, "jetrun_attempts_lost_total", reason="node_lost") == 1
        )

    await eventually(mstack.health_urls["scheduler"], node_lost)

    assert mstack.nats is not None
    before = value(await scrape(mstack.url, ADMIN), "jetrun_log_failures_total", operation="append")
    mstack.nats.kill()
    async with httpx.AsyncClient(timeout=10) as http:
        deadline = time.monotonic() + 20
        while (await http.get(f"{mstack.health_urls['scheduler']}/readyz")).status_code != 503:
            assert time.monotonic() < deadline, "scheduler stayed ready without NATS"
            await anyio.sleep(0.1)
        checks = (await http.get(f"{mstack.health_urls['scheduler']}/readyz")).json()["checks"]
        assert checks["nats_connected"] is False
        async with client(mstack, "tok_big") as big:
            refused = await big.post("/v4/runs", json=gate_body(gate))
        assert refused.status_code == 503
    await mstack.start_nats()
    gateway = await scrape(mstack.url, ADMIN)
    # the refused run's submitted event could not be appended (tok_big's tier has no limit:
    # no admission step); counted from before the outage, so earlier tests' failures do not count
    after = value(gateway, "jetrun_log_failures_total", operation="append")
    assert after >= before + 1
    await wait_ready(mstack.health_urls["scheduler"])


async def test_a_busy_health_port_fails_the_process_loudly(mstack: Stack) -> None:
    busy = mstack.url.rsplit(":", 1)[1]  # the gateway holds it
    proc = mstack._cli(
        "scheduler-clash", "scheduler", *mstack.nats_args("scheduler"), "--health-port", busy
    )
    assert proc.popen is not None
    code = await anyio.to_thread.run_sync(lambda: proc.popen.wait(30))  # type: ignore[union-attr]
    assert code != 0
    assert f"cannot serve /metrics on 127.0.0.1:{busy}" in proc.output()


async def test_retries_and_failures_of_nats_calls_are_counted() -> None:
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise NoRespondersError
        return "stored"

    def count(counter: Counter) -> float:
        return counter.labels("test-op")._value.get()

    retries, failures = count(LOG_RETRIES), count(LOG_FAILURES)
    assert await retrying("test-op jetrun.ev.x.queued", flaky, deadline_s=5.0) == "stored"
    assert count(LOG_RETRIES) == retries + 2
    calls = -100
    with pytest.raises(NoRespondersError):
        await retrying("test-op jetrun.ev.x.queued", flaky, deadline_s=0.0)
    assert count(LOG_FAILURES) == failures + 1
