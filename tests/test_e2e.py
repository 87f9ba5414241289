"""Runs end to end over HTTP: real nats-server, gateway, scheduler and agent processes."""

from __future__ import annotations

from pathlib import Path

import anyio
import httpx
import pytest

from runtime.infra.eventlog import EventLog
from tests import harness
from tests.harness import Stack, open_gate, wait_state

pytestmark = pytest.mark.anyio

ECHO = {
    "pipeline": "demo/echo:v1",
    "inputs": [{"type": "string", "value": "my_input_string"}, {"type": "integer", "value": 5}],
}


def client(stack: Stack, token: str = "jr_demo_token", gateway: int = 0) -> httpx.AsyncClient:
    return harness.client(stack, token, gateway)


async def event_count(stack: Stack) -> int:
    nc = await stack.connect()
    try:
        return await EventLog(nc).last_seq()
    finally:
        await nc.close()


# --- the seed's examples ------------------------------------------------------------------


async def test_sync_run_as_in_the_seed(stack: Stack) -> None:
    async with client(stack) as c:
        response = await c.post("/v4/runs", json=ECHO)
    assert response.status_code == 200, response.text
    run = response.json()
    assert run["state"] == "completed"
    assert run["pipeline"] == "demo/echo:v1"
    assert run["pipeline_id"] == "demo/echo"
    assert run["outputs"][0]["type"] == "string"
    assert run["outputs"][0]["value"] == "my_input_string" * 5
    assert run["queue_position"] is None and run["error"] is None
    assert isinstance(run["created_at"], float) and run["updated_at"] >= run["created_at"]


async def test_async_run_then_get_as_in_the_seed(stack: Stack) -> None:
    async with client(stack) as c:
        response = await c.post("/v4/runs", json={**ECHO, "async_run": True})
        assert response.status_code == 202, response.text
        run_id = response.json()["id"]
        assert response.headers["location"] == f"/v4/runs/{run_id}"
        run = await wait_state(c, run_id, {"completed"})
    assert run["outputs"][0]["value"] == "my_input_string" * 5


# --- failure modes ------------------------------------------------------------------------


async def test_inputs_not_matching_the_signature_fail_with_input_error(stack: Stack) -> None:
    body = {
        "pipeline": "demo/echo:v1",
        "inputs": [{"type": "string", "value": "a"}, {"type": "string", "value": "5"}],
    }
    async with client(stack) as c:
        response = await c.post("/v4/runs", json=body)
    run = response.json()
    assert response.status_code == 200
    assert run["state"] == "failed"
    assert run["error"]["type"] == "input_error"
    assert "times" in run["error"]["message"] and "integer" in run["error"]["message"]


async def test_a_raising_pipeline_fails_with_its_traceback(stack: Stack) -> None:
    async with client(stack) as c:
        response = await c.post("/v4/runs", json={"pipeline": "demo/fail:v1", "inputs": []})
    run = response.json()
    assert run["state"] == "failed"
    assert run["error"]["type"] == "pipeline_error"
    assert "ValueError" in run["error"]["message"]
    assert "Traceback" in run["error"]["traceback"]


async def test_no_replica_and_no_waiting_is_503_at_once(stack: Stack) -> None:
    async with client(stack) as c:
        response = await c.post("/v4/runs", json={"pipeline": "test/ghost:v1", "inputs": []})
    assert response.status_code == 503
    assert response.json()["state"] == "no_resources_available"


async def test_waiting_for_resources_gives_up_after_the_resource_wait_timeout(stack: Stack) -> None:
    async with client(stack) as c:
        response = await c.post(
            "/v4/runs", json={"pipeline": "test/ghost:v1", "inputs": [], "async_run": True}
        )
        assert response.status_code == 202
        run = response.json()
        assert run["state"] == "queued" and run["waiting_for"] == "resources"
        assert run["queue_position"] == 0
        run = await wait_state(c, run["id"], {"no_resources_available"}, timeout=20)
    assert run["queue_position"] is None


# --- bad input changes nothing ------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [
        (b"{not json", 422, "invalid_json", None),
        (b'{"pipeline": 5}', 422, "invalid_field", "pipeline"),
        (b'{"inputs": []}', 422, "invalid_field", None),
        (
            b'{"pipeline": "demo/echo:v1", "inputs": [{"type": "integer", "value": "x"}]}',
            422,
            "invalid_field",
            "inputs[0].value",
        ),
        (
            b'{"pipeline": "demo/echo:v1", "inputs": [{"type": "weird", "value": 1}]}',
            422,
            "invalid_field",
            "inputs[0].type",
        ),
        (b'{"pipeline": "demo/echo:v1", "async_run": "yes"}', 422, "invalid_field", "async_run"),
        (b'{"pipeline": "not a pointer"}', 422, "invalid_field", "pipeline"),
        (b'{"pipeline": "nobody/nothing:v1", "inputs": []}', 404, "pipeline_not_found", None),
        (b"x" * 2_000_000, 413, "body_too_large", None),
    ],
)
async def test_bad_requests_get_a_precise_error_and_change_nothing(
    stack: Stack, body: bytes, status: int, code: str, field: str | None
) -> None:
    before = await event_count(stack)
    async with client(stack, "tok_acme") as c:
        response = await c.post(
            "/v4/runs", content=body, headers={"Content-Type": "application/json"}
        )
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert detail["code"] == code
    if field is not None:
        assert detail["field"] == field
    assert await event_count(stack) == before


@pytest.mark.parametrize("header", [None, "Bearer nope", "Basic tok_acme", "Bearer"])
async def test_missing_or_unknown_tokens_are_401(stack: Stack, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    async with httpx.AsyncClient(base_url=stack.url) as c:
        for response in (
            await c.post("/v4/runs", json=ECHO, headers=headers),
            await c.get("/v4/runs/run_x", headers=headers),
        ):
            assert response.status_code == 401
            assert response.json()["detail"]["code"] == "unauthorized"


async def test_a_team_never_sees_another_teams_runs(stack: Stack) -> None:
    async with client(stack, "jr_demo_token") as mine, client(stack, "tok_rival") as theirs:
        run_id = (await mine.post("/v4/runs", json=ECHO)).json()["id"]
        assert (await theirs.get(f"/v4/runs/{run_id}")).status_code == 404
        assert (await theirs.post(f"/v4/runs/{run_id}/cancel")).status_code == 404
        assert (await mine.get(f"/v4/runs/{run_id}")).status_code == 200
        assert (await mine.get("/v4/runs/run_nope")).json()["detail"]["code"] == "run_not_found"


async def test_idempotency_key_returns_the_same_run(stack: Stack, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    body = {
        "pipeline": "test/gate:v1",
        "inputs": [{"type": "string", "value": str(gate)}],
        "async_run": True,
    }
    headers = {"Idempotency-Key": "order-42"}
    async with (
        client(stack, "tok_acme") as c,
        client(stack, "tok_acme", gateway=1) as c2,
        client(stack, "tok_rival") as rival,
    ):
        first = (await c.post("/v4/runs", json=body, headers=headers)).json()
        again = (await c2.post("/v4/runs", json=body, headers=headers)).json()
        assert again["id"] == first["id"]
        other_team = (await rival.post("/v4/runs", json=body, headers=headers)).json()
        assert other_team["id"] != first["id"]
        open_gate(gate, "open")
        assert (await wait_state(c, first["id"], {"completed"}))["outputs"][0]["value"] == "open"
        await wait_state(rival, other_team["id"], {"completed"})
        # a retry after the run ended still returns it, and runs nothing again
        retried = await c2.post("/v4/runs", json=body, headers=headers)
        assert retried.json()["id"] == first["id"] and retried.json()["state"] == "completed"
        # the same key for a different request is an error, and creates nothing
        before = await event_count(stack)
        other = await c.post("/v4/runs", json={**body, "async_run": False}, headers=headers)
        assert other.status_code == 422
        assert other.json()["detail"]["code"] == "idempotency_key_reused"
        assert await event_count(stack) == before


# --- cancellation -------------------------------------------------------------------------


async def test_cancel_a_running_and_a_queued_run(stack: Stack, tmp_path: Path) -> None:
    gates = [tmp_path / f"gate{i}" for i in range(2)]
    async with client(stack, "tok_big") as c:
        ids = []
        for gate in gates:
            body = {
                "pipeline": "test/gate:v1",
                "async_run": True,
                "inputs": [{"type": "string", "value": str(gate)}],
            }
            ids.append((await c.post("/v4/runs", json=body)).json()["id"])
        await wait_state(c, ids[0], {"running"})
        assert (await c.get(f"/v4/runs/{ids[1]}")).json()["state"] == "queued"
        for run_id in reversed(ids):
            response = await c.post(f"/v4/runs/{run_id}/cancel")
            assert response.status_code == 200
            assert response.json()["state"] == "cancelled"
        again = await c.post(f"/v4/runs/{ids[0]}/cancel")
        assert again.status_code == 409 and again.json()["detail"]["code"] == "not_cancellable"
        # the slot is free again: a new run goes through
        gate = tmp_path / "after"
        open_gate(gate, "ok")
        body = {"pipeline": "test/gate:v1", "inputs": [{"type": "string", "value": str(gate)}]}
        assert (await c.post("/v4/runs", json=body)).json()["state"] == "completed"


async def test_a_short_attempt_appends_its_end_alone_and_a_long_one_started_first(
    stack: Stack, tmp_path: Path
) -> None:
    gate = tmp_path / "held"
    async with client(stack, "tok_big") as c:
        quick = (await c.post("/v4/runs", json=ECHO)).json()
        assert quick["state"] == "completed"
        body = {"pipeline": "test/gate:v1", "inputs": [{"type": "string", "value": str(gate)}]}
        held = (await c.post("/v4/runs", json={**body, "async_run": True})).json()["id"]
        await wait_state(c, held, {"running"})
        nc = await stack.connect()
        try:
            log = EventLog(nc)
            with anyio.fail_after(10):  # appended once the attempt has run for 50 ms
                while "started" not in [s.event.kind for s in await log.read(held)]:
                    await anyio.sleep(0.05)
            open_gate(gate, "ok")
            assert (await wait_state(c, held, {"completed"}))["outputs"][0]["value"] == "ok"
            kinds = [s.event.kind for s in await log.read(held)]
            assert kinds[-3:] == ["dispatched", "started", "completed"]
            # the echo run most likely ended within 50 ms and appended no ``started`` (how
            # long it took is the machine's business: tests/test_agent_attempts.py pins it)
            kinds = [s.event.kind for s in await log.read(quick["id"])]
            shorter = ["submitted", "dispatched", "completed"]
            assert kinds in (shorter, ["submitted", "dispatched", "started", "completed"])
        finally:
            await nc.close()


# --- admission ----------------------------------------------------------------------------


async def test_fifty_simultaneous_submissions_admit_exactly_three(
    stack: Stack, tmp_path: Path
) -> None:
    gates = [tmp_path / f"gate{i}" for i in range(50)]
    responses: list[httpx.Response] = []

    async def submit(i: int, c: httpx.AsyncClient) -> None:
        body = {
            "pipeline": "test/gate:v1",
            "async_run": True,
            "inputs": [{"type": "string", "value": str(gates[i])}],
        }
        responses.append(await c.post("/v4/runs", json=body))

    async with client(stack, "tok_acme") as c0, client(stack, "tok_acme", gateway=1) as c1:
        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(submit, i, (c0, c1)[i % 2])
        admitted = [r for r in responses if r.status_code == 202]
        rejected = [r for r in responses if r.status_code == 429]
        assert len(admitted) == 3 and len(rejected) == 47
        detail = rejected[0].json()["detail"]
        assert detail == {
            **detail,
            "code": "concurrency_limit",
            "tier": "basic",
            "limit": 3,
            "active": 3,
        }
        assert rejected[0].headers["retry-after"]
        # another team is not affected
        async with client(stack, "tok_rival") as rival:
            assert (await rival.post("/v4/runs", json=ECHO)).status_code == 200
        # finish one (the one holding the gate pipeline's only slot): the next is admitted
        runs = [(await c0.get(f"/v4/runs/{r.json()['id']}")).json() for r in admitted]
        first = next(run for run in runs if run["state"] == "running")
        open_gate(Path(first["inputs"][0]["value"]), "done")
        await wait_state(c0, first["id"], {"completed"})
        late_gate = tmp_path / "late"
        body = {
            "pipeline": "test/gate:v1",
            "async_run": True,
            "inputs": [{"type": "string", "value": str(late_gate)}],
        }
        late = await c1.post("/v4/runs", json=body)
        assert late.status_code == 202, late.text
        assert (await c1.post("/v4/runs", json=body | {"inputs": []})).status_code == 429
        for response in [*admitted, late]:
            open_gate(Path(response.json()["inputs"][0]["value"]), "done")
        for response in [*admitted, late]:
            await wait_state(c0, response.json()["id"], {"completed"})


# --- queue positions ----------------------------------------------------------------------


async def test_queue_positions_are_exact_and_move_up(stack: Stack, tmp_path: Path) -> None:
    gates = [tmp_path / f"gate{i}" for i in range(20)]
    async with client(stack, "tok_big") as c, client(stack, "tok_big", gateway=1) as c1:
        ids = []
        for gate in gates:
            body = {
                "pipeline": "test/gate:v1",
                "async_run": True,
                "inputs": [{"type": "string", "value": str(gate)}],
            }
            ids.append((await c.post("/v4/runs", json=body)).json()["id"])
        await wait_state(c, ids[0], {"running"})
        for finished in range(20):
            for gateway in (c, c1):
                runs = [(await gateway.get(f"/v4/runs/{i}")).json() for i in ids[finished + 1 :]]
                assert [r["queue_position"] for r in runs] == list(range(len(runs)))
                assert all(r["state"] == "queued" for r in runs)
            open_gate(gates[finished], "go")
            await wait_state(c, ids[finished], {"completed"})
            if finished + 1 < len(ids):
                await wait_state(c, ids[finished + 1], {"running"})


# --- health ---------------------------------------------------------------------------------


async def test_health_and_scaling(stack: Stack) -> None:
    async with client(stack) as c:
        assert (await c.get("/healthz")).json()["status"] == "ok"
        ready = (await c.get("/readyz")).json()
        assert ready["status"] == "ok"
        assert ready["checks"] == {
            "nats_connected": True,
            "event_log_replayed": True,
            "event_log_stream": True,
            "store_writable": True,
            "scheduler_alive": True,
        }
        scaling = (await c.get("/v4/pipelines/demo/echo:v1/scaling")).json()
        assert scaling["current_replicas"] == 1
        assert scaling["current_pipeline_states"] == {"ready": 1}
        assert (await c.get("/v4/pipelines/nobody/x:v1/scaling")).status_code == 404


async def test_a_loading_replica_is_not_alive_and_a_failed_startup_says_so(stack: Stack) -> None:
    """wait_for_resources=false: a replica still in its cold start does not count (503 at
    once), and a pipeline whose startup() raised answers 503 with a startup_error naming it."""
    agent = stack.start_agent("agent-startup", str(harness.FIXTURES / "startup_pipelines.py"))
    try:
        async with client(stack, "tok_big") as c:
            await wait_states(c, "test/bad-start:v1", "failed")
            await wait_states(c, "test/slow-start:v1", "loading")
            slow = await c.post("/v4/runs", json={"pipeline": "test/slow-start:v1", "inputs": []})
            bad = await c.post("/v4/runs", json={"pipeline": "test/bad-start:v1", "inputs": []})
    finally:
        agent.stop()
    assert slow.status_code == 503 and slow.json()["state"] == "no_resources_available"
    assert slow.json()["error"]["type"] == "unknown"
    assert "still starting up" in slow.json()["error"]["message"]
    assert bad.status_code == 503 and bad.json()["state"] == "no_resources_available"
    error = bad.json()["error"]
    assert error["type"] == "startup_error"
    assert "raised on agent agent-startup" in error["message"]
    assert "model weights not found" in error["message"]


async def wait_states(c: httpx.AsyncClient, pointer: str, state: str) -> None:
    with anyio.fail_after(30):
        while True:
            response = await c.get(f"/v4/pipelines/{pointer}/scaling")
            if response.status_code == 200 and response.json()["current_pipeline_states"].get(
                state
            ):
                return
            await anyio.sleep(0.1)
