"""Bad input never reaches a node and never gets a 500; a bad attempt never kills an agent.

Real processes: nats-server, scheduler, gateway and an agent serving the demo pipelines and
tests/fixtures/output_pipelines.py.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import pytest

from contracts.events import RunAdmitted, RunCompleted, RunSubmitted
from contracts.values import INT_MAX, INT_MIN, MAX_DEPTH, IOType, RunIO
from runtime.infra.eventlog import EventLog
from tests import harness
from tests.harness import FIXTURES, ROOT, Stack, wait_replicas, wait_state

pytestmark = pytest.mark.anyio

OUTPUTS = str(FIXTURES / "output_pipelines.py")
BIG = 1180591620717411303424  # 2**70


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with Stack(tmp_path_factory.mktemp("bad-input")) as stack:
        await stack.start_nats()
        stack.start_scheduler()
        await stack.start_gateway()
        stack.start_agent("agent-input", "runtime.node.demo", OUTPUTS, slots=2)
        await wait_replicas(stack.url, "tok_big", "demo/echo:v1")
        await wait_replicas(stack.url, "tok_big", "test/big-chunks:v1")
        yield stack


def client(stack: Stack) -> httpx.AsyncClient:
    return harness.client(stack, "tok_big")


async def event_count(stack: Stack) -> int:
    nc = await stack.connect()
    try:
        return await EventLog(nc).last_seq()
    finally:
        await nc.close()


def nested(levels: int, leaf: Any = 1) -> Any:
    value = leaf
    for _ in range(levels):
        value = {"a": value}
    return value


def run_body(*inputs: dict[str, Any], pipeline: str = "test/any:v1", **extra: Any) -> bytes:
    return json.dumps({"pipeline": pipeline, "inputs": list(inputs), **extra}).encode()


async def post(stack: Stack, body: bytes, route: str = "/v4/runs") -> httpx.Response:
    async with client(stack) as c:
        return await c.post(route, content=body, headers={"Content-Type": "application/json"})


def assert_error(response: httpx.Response, status: int, code: str, field: str | None) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    detail = response.json()["detail"]
    assert detail["code"] == code
    assert detail.get("field") == field, detail


# --- 1. integers the wire cannot carry ----------------------------------------------------


@pytest.mark.parametrize(
    ("item", "field"),
    [
        ({"type": "integer", "value": BIG}, "inputs[0].value"),
        ({"type": "integer", "value": INT_MAX + 1}, "inputs[0].value"),
        ({"type": "integer", "value": INT_MIN - 1}, "inputs[0].value"),
        ({"type": "fp", "value": BIG}, "inputs[0].value"),
        ({"type": "dictionary", "value": {"a": [1, {"b": -BIG}]}}, "inputs[0].value.a[1].b"),
        ({"type": "array", "value": [0, [BIG]]}, "inputs[0].value[1][0]"),
        ({"type": "dictionary", "value": {"odd key": BIG}}, 'inputs[0].value["odd key"]'),
    ],
)
async def test_integers_out_of_range_are_422_naming_the_field(
    stack: Stack, item: dict[str, Any], field: str
) -> None:
    before = await event_count(stack)
    response = await post(stack, run_body(item))
    assert_error(response, 422, "invalid_field", field)
    assert "integer out of range" in response.json()["detail"]["message"]
    assert await event_count(stack) == before


async def test_the_largest_carried_integers_are_accepted(stack: Stack) -> None:
    value = {"lo": INT_MIN, "hi": INT_MAX}
    response = await post(stack, run_body({"type": "dictionary", "value": value}))
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "completed"


# --- 2. bytes that are not UTF-8 -----------------------------------------------------------


@pytest.mark.parametrize("route", ["/v4/runs", "/v4/runs/stream"])
@pytest.mark.parametrize(
    "body",
    [
        b'{"pipeline": "demo/echo:v1\xff", "inputs": []}',
        b'{"pipeline": "demo/echo:v1", "inputs": [{"type": "string", "value": "\xc3\x28"}]}',
        b"\xff\xfe{}",
    ],
)
async def test_invalid_utf8_is_422_invalid_json(stack: Stack, route: str, body: bytes) -> None:
    before = await event_count(stack)
    assert_error(await post(stack, body, route), 422, "invalid_json", None)
    assert await event_count(stack) == before


# --- 3. nesting ----------------------------------------------------------------------------


def deep_body(levels: int) -> bytes:
    """A dictionary input nested ``levels`` deep (built as bytes: too deep for ``json``)."""
    value = b'{"a": ' * levels + b"1" + b"}" * levels
    return b'{"pipeline": "test/any:v1", "inputs": [{"type": "dictionary", "value": %s}]}' % value


@pytest.mark.parametrize("levels", [MAX_DEPTH + 1, 968, 2000, 100_000])
async def test_values_nested_too_deep_are_422(stack: Stack, levels: int) -> None:
    before = await event_count(stack)
    response = await post(stack, deep_body(levels))
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail["code"] in {"invalid_field", "invalid_json"}
    assert "nested too deep" in detail["message"]
    if levels == MAX_DEPTH + 1:
        assert detail["field"] == "inputs[0].value" + ".a" * MAX_DEPTH
    assert await event_count(stack) == before


async def test_values_nested_up_to_the_limit_run(stack: Stack) -> None:
    response = await post(stack, run_body({"type": "dictionary", "value": nested(MAX_DEPTH)}))
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "completed"


# --- 4. the JSON error shape everywhere, one rule for keys, Mystic's body ------------------


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/nope", 404, "not_found"),
        ("GET", "/v4/runs/%2F..", 404, None),
        ("POST", "/v4/runs/%2F../cancel", 404, None),
        ("GET", "/v4/runs/%2F..%2F..%2Fhealthz", 404, None),
        ("DELETE", "/v4/runs/run_x", 405, "method_not_allowed"),
        ("PUT", "/v4/runs", 405, "method_not_allowed"),
    ],
)
async def test_every_route_answers_the_json_error_shape(
    stack: Stack, method: str, path: str, status: int, code: str | None
) -> None:
    async with client(stack) as c:
        response = await c.request(method, path)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    detail = response.json()["detail"]
    assert set(detail) >= {"code", "message"}
    assert detail["code"] == (code or detail["code"])
    assert detail["code"] in {"not_found", "run_not_found", "method_not_allowed"}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (run_body(colour="blue"), "colour"),
        (run_body({"type": "string", "value": "x", "colour": "blue"}), "inputs[0].colour"),
        (run_body({"type": "file", "file": {"url": "u", "colour": 1}}), "inputs[0].file.colour"),
        (run_body(run_id="run_mine"), "run_id"),
        (run_body({"type": "string", "value": "x", "file_url": "http://x"}), "inputs[0]"),
    ],
)
async def test_unknown_keys_are_422_at_every_level(stack: Stack, body: bytes, field: str) -> None:
    before = await event_count(stack)
    assert_error(await post(stack, body), 422, "invalid_field", field)
    assert await event_count(stack) == before


async def test_the_body_mystics_sdk_sends_is_accepted(stack: Stack) -> None:
    """pipeline-ai 2.8's ``run_pipeline("demo/echo:v1", "hi", 3)``, byte for byte."""
    body = (
        b'{"pipeline": "demo/echo:v1", "inputs": [{"type": "string", "value": "hi",'
        b' "file_name": null, "file_path": null, "file_url": null}, {"type": "integer",'
        b' "value": 3, "file_name": null, "file_path": null, "file_url": null}],'
        b' "async_run": false, "wait_for_resources": null, "run_id": null}'
    )
    response = await post(stack, body)
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["value"] == "hihihi"


def mystic_python() -> Path | None:
    """The interpreter of the virtual environment holding Mystic's SDK (``pipeline-ai``):
    ``$JETRUN_MYSTIC_PYTHON``, or ``.venv-mystic`` (``.ci/run`` makes it)."""
    given = os.environ.get("JETRUN_MYSTIC_PYTHON")
    path = Path(given) if given else ROOT / ".venv-mystic" / "bin" / "python"
    return path if path.exists() else None


async def test_mystics_own_sdk_runs_and_streams_against_jetrun(
    stack: Stack, tmp_path: Path
) -> None:
    python = mystic_python()
    if python is None:
        make = "python3 -m venv .venv-mystic && .venv-mystic/bin/pip install 'pipeline-ai==2.8.0'"
        if os.environ.get("CI"):
            pytest.fail(f"Mystic's SDK is missing: {make}")
        pytest.skip(f"Mystic's SDK is not installed here; to run this test: {make}")
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "PIPELINE_DIR": str(tmp_path / "pipeline"),
        "PIPELINE_API_URL": stack.url,
        "PIPELINE_API_TOKEN": "tok_big",
    }
    script = str(ROOT / "tests" / "clients" / "mystic_run.py")
    done = await anyio.run_process([str(python), script], env=env, check=False)
    assert done.returncode == 0, done.stderr.decode()[-4000:]
    got = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert got["state"] == "completed" and got["outputs"] == ["hihihi"], got
    async with client(stack) as c:
        assert (await c.get(f"/v4/runs/{got['id']}")).json()["outputs"][0]["value"] == "hihihi"
    assert got["stream_states"][-1] == "completed"
    streamed = [value for outputs in got["stream_outputs"] for value in outputs]
    assert streamed == ["chunk 0", "chunk 1", "chunk 2"], got


# --- 5. pointers never reach a subject unchecked -------------------------------------------


@pytest.mark.parametrize(
    "pointer", ["*", "%3E", "demo/*:v1", "demo/echo:*", "demo/echo:v1%20x", "a.b", "demo/%3E"]
)
async def test_pointers_with_wildcards_are_422_on_scaling(stack: Stack, pointer: str) -> None:
    async with client(stack) as c:
        response = await c.get(f"/v4/pipelines/{pointer}/scaling")
    assert_error(response, 422, "invalid_field", "pointer")


async def test_a_well_formed_unknown_pointer_is_404(stack: Stack) -> None:
    async with client(stack) as c:
        response = await c.get("/v4/pipelines/nobody/x.y:v1/scaling")
    assert_error(response, 404, "pipeline_not_found", None)


# --- 1. defence in depth: a crafted payload that reaches an agent fails its attempt alone ---


async def submit_as_admin(stack: Stack, run_id: str, inputs: list[RunIO]) -> None:
    """Append a run straight to the event log, as an admin (or a bug) could: the gateway's
    checks are bypassed, so the agent gets exactly these inputs."""
    nc = await stack.connect()
    try:
        log = EventLog(nc)
        now = time.time()
        await log.append(
            RunSubmitted(run_id=run_id, at=now, team="big", pipeline="test/any:v1", inputs=inputs)
        )
        await log.append(RunAdmitted(run_id=run_id, at=now, tier="startup"))
    finally:
        await nc.close()


async def test_a_crafted_payload_fails_its_attempt_and_the_agent_carries_on(
    stack: Stack,
) -> None:
    agent = next(p for p in stack.procs if p.name == "agent-input")
    crafted = {
        # cannot be framed for the worker (msgpack ints stop at 64 bits): killed the agent
        "run_bigint": ([RunIO(type=IOType.dictionary, value={"n": BIG})], "cannot be sent"),
        "run_bigint_top": ([RunIO(type=IOType.integer, value=-BIG)], "cannot be sent"),
        # decodes, but deeper than the wire's limit: the worker refuses it
        "run_deep": ([RunIO(type=IOType.dictionary, value=nested(500))], "nested too deep"),
    }
    for run_id, (inputs, _) in crafted.items():
        await submit_as_admin(stack, run_id, inputs)
    # too deep for any service to decode: skipped (and logged) by every reader of the log
    deepest = msgspec.Raw(b'{"a": ' * 5000 + b"1" + b"}" * 5000)
    await submit_as_admin(stack, "run_undecodable", [RunIO(type=IOType.dictionary, value=deepest)])
    async with client(stack) as c:
        for run_id, (_, why) in crafted.items():
            run = await wait_state(c, run_id, {"failed", "completed", "node_preempted"})
            assert run["state"] == "failed", run
            assert run["error"]["type"] == "input_error", run
            assert why in run["error"]["message"], run
        assert (await c.get("/v4/runs/run_undecodable")).status_code == 404
        assert agent.popen is not None and agent.popen.poll() is None, agent.output()
        echo = {"pipeline": "demo/echo:v1", "inputs": [{"type": "string", "value": "ok"}]}
        after = await c.post("/v4/runs", json=echo)
        assert after.json()["state"] == "completed", after.text
    for proc in stack.procs:
        assert proc.popen is not None and proc.popen.poll() is None, proc.output()


# --- 6. results larger than the wire, and streams that stay linear ------------------------


async def test_a_result_over_the_max_payload_fails_the_run_with_a_clear_error(
    stack: Stack,
) -> None:
    body = {
        "pipeline": "demo/echo:v1",
        "inputs": [{"type": "string", "value": "x" * 10_000}, {"type": "integer", "value": 900}],
    }
    async with client(stack) as c:
        response = await c.post("/v4/runs", json=body)
    run = response.json()
    assert run["state"] == "failed", run
    assert run["error"]["type"] == "pipeline_error"
    assert run["error"]["message"].startswith("output too large")


async def test_a_streamed_output_over_the_max_payload_fails_the_run(stack: Stack) -> None:
    body = {
        "pipeline": "test/big-chunks:v1",
        "inputs": [{"type": "integer", "value": 2}, {"type": "integer", "value": 9_000_000}],
    }
    async with client(stack) as c:
        run = (await c.post("/v4/runs", json=body)).json()
    assert run["state"] == "failed", run
    assert run["error"]["message"].startswith("output too large: an output is")


async def test_a_streamed_run_costs_linear_bytes_in_the_stream_and_the_log(stack: Stack) -> None:
    n = 2000
    body = {"pipeline": "demo/stream:v1", "inputs": [{"type": "integer", "value": n}]}
    lines: list[dict[str, Any]] = []
    size = 0
    async with client(stack) as c, c.stream("POST", "/v4/runs/stream", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            size += len(line) + 1
            lines.append(json.loads(line))
    assert lines[-1]["state"] == "completed"
    outputs = [o["value"] for line in lines for o in line["outputs"]]
    assert outputs == [f"chunk {i}" for i in range(n)]  # each output exactly once, in order
    starts = [line["outputs_start"] for line in lines]
    assert starts == sorted(starts)
    # every line is one run (~500 bytes) plus its new outputs: linear; repeating every output
    # so far on every line (the old shape) gave 42.7 MB here
    assert size < len(lines) * 600 + n * 60, size

    nc = await stack.connect()
    try:
        stored = await EventLog(nc).read(lines[-1]["id"])
    finally:
        await nc.close()
    completed = [s.event for s in stored if isinstance(s.event, RunCompleted)]
    assert completed and completed[0].outputs == [] and completed[0].streamed == n
