"""Per-run logs end to end: real nats-server, scheduler, gateway and agent processes (the
services log JSON lines here), pipelines from tests/fixtures/log_pipelines.py."""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import pytest

from contracts.logs import LogChunk
from contracts.values import from_python
from runtime.infra.clock import SYSTEM_CLOCK
from runtime.infra.runlogs import AttemptLog, LogFlusher
from tests.harness import FIXTURES, Stack, client, open_gate, wait_replicas, wait_state

pytestmark = pytest.mark.anyio

LOGS = str(FIXTURES / "log_pipelines.py")


@pytest.fixture(scope="module")
async def logstack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    before = os.environ.get("JETRUN_LOG_FORMAT")
    os.environ["JETRUN_LOG_FORMAT"] = "json"  # the processes inherit it
    try:
        async with Stack(tmp_path_factory.mktemp("logs")) as stack:
            await stack.start_nats()
            stack.start_scheduler()
            await stack.start_gateway()
            stack.start_agent("agent-logs", LOGS, slots=3)
            await wait_replicas(stack.url, "tok_acme", "test/chatty:v1")
            await wait_replicas(stack.url, "tok_acme", "test/flood:v1")
            await wait_replicas(stack.url, "tok_acme", "test/say:v1")
            yield stack
    finally:
        if before is None:
            os.environ.pop("JETRUN_LOG_FORMAT", None)
        else:
            os.environ["JETRUN_LOG_FORMAT"] = before


def chatty(lines: int, fail: bool) -> dict:  # type: ignore[type-arg]
    return {
        "pipeline": "test/chatty:v1",
        "inputs": [{"type": "integer", "value": lines}, {"type": "boolean", "value": fail}],
    }


def by_stream(lines: list[dict[str, object]]) -> dict[object, list[object]]:
    """Each stream's lines in order (the order between two streams is the order read)."""
    found: dict[object, list[object]] = {}
    for line in lines:
        found.setdefault(line["stream"], []).append(line["text"])
    return found


async def test_a_failed_runs_logs_are_its_teams_only(logstack: Stack) -> None:
    async with client(logstack, "tok_acme") as c:
        run = (await c.post("/v4/runs", json=chatty(3, True))).json()
        assert run["state"] == "failed" and "chatty failed" in run["error"]["message"]
        response = await c.get(f"/v4/runs/{run['id']}/logs")
    assert response.status_code == 200, response.text
    logs = response.json()
    assert logs["run_id"] == run["id"] and logs["state"] == "failed"
    assert by_stream(logs["lines"]) == {
        "stdout": ["out 0", "out 1", "out 2"],
        "stderr": ["to stderr"],
    }
    assert {line["attempt"] for line in logs["lines"]} == {1}
    assert logs["truncated"] is False
    async with client(logstack, "tok_acme") as c:
        errors = (await c.get(f"/v4/runs/{run['id']}/logs?stream=stderr")).json()
        bad = await c.get(f"/v4/runs/{run['id']}/logs?stream=stdin")
    assert by_stream(errors["lines"]) == {"stderr": ["to stderr"]}
    assert bad.status_code == 422 and bad.json()["detail"]["field"] == "stream"
    async with client(logstack, "tok_rival") as rival:
        other = await rival.get(f"/v4/runs/{run['id']}/logs")
        missing = await rival.get("/v4/runs/run_nosuchrun/logs")
        followed = await rival.get(f"/v4/runs/{run['id']}/logs?follow=1")
    assert other.status_code == missing.status_code == followed.status_code == 404
    assert other.json()["detail"]["code"] == missing.json()["detail"]["code"] == "run_not_found"
    async with httpx.AsyncClient(base_url=logstack.url) as anonymous:
        assert (await anonymous.get(f"/v4/runs/{run['id']}/logs")).status_code == 401


async def test_follow_streams_lines_as_printed_and_ends_with_the_run(
    logstack: Stack, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    body = {
        "pipeline": "test/chatty-gate:v1",
        "async_run": True,
        "inputs": [{"type": "string", "value": str(gate)}],
    }
    async with client(logstack, "tok_acme") as c:
        run_id = (await c.post("/v4/runs", json=body)).json()["id"]
        seen: list[str] = []
        with anyio.fail_after(30):
            async with c.stream("GET", f"/v4/runs/{run_id}/logs?follow=1") as response:
                assert response.headers["content-type"].startswith("application/x-ndjson")
                async for line in response.aiter_lines():
                    if not line:
                        continue
                    seen.append(json.loads(line)["text"])
                    if seen == ["before the gate"]:
                        # streamed while it runs (the gateway may hear the line before the
                        # dispatch: they come on different subjects)
                        await wait_state(c, run_id, {"running"}, timeout=10)
                        open_gate(gate, "go")
        assert seen == ["before the gate", "after the gate"]
        assert (await c.get(f"/v4/runs/{run_id}")).json()["state"] == "completed"


async def test_follow_as_server_sent_events(logstack: Stack) -> None:
    async with client(logstack, "tok_acme") as c:
        run_id = (await c.post("/v4/runs", json=chatty(2, False))).json()["id"]
        headers = {"Accept": "text/event-stream"}
        with anyio.fail_after(30):
            response = await c.get(f"/v4/runs/{run_id}/logs?follow=1", headers=headers)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [block for block in response.text.split("\n\n") if block]
    assert [e.split("\n")[0] for e in events] == ["event: line"] * 3 + ["event: end"]
    lines = [json.loads(e.split("data: ", 1)[1]) for e in events[:-1]]
    assert by_stream(lines) == {"stdout": ["out 0", "out 1"], "stderr": ["to stderr"]}
    assert json.loads(events[-1].split("data: ", 1)[1]) == {"state": "completed"}


async def test_a_flood_of_output_is_capped_and_hurts_no_one(logstack: Stack) -> None:
    flood = {
        "pipeline": "test/flood:v1",
        "async_run": True,
        "inputs": [{"type": "integer", "value": 24}],
    }
    async with client(logstack, "tok_acme") as c:
        flood_id = (await c.post("/v4/runs", json=flood)).json()["id"]
        # another run on the same agent, while the flood is being read
        other = (await c.post("/v4/runs", json=chatty(1, False))).json()
        assert other["state"] == "completed", other
        run = await wait_state(c, flood_id, {"completed", "failed"}, timeout=60)
        assert run["state"] == "completed" and run["outputs"][0]["value"] == "flooded"
        logs = (await c.get(f"/v4/runs/{flood_id}/logs")).json()
    assert logs["truncated"] is True
    assert logs["lines"][-1]["text"].startswith("[jetrun: output truncated: ")
    kept = sum(len(line["text"]) for line in logs["lines"])
    assert kept <= 1_048_576 and len(logs["lines"]) > 100
    agent = next(p for p in logstack.procs if p.name == "agent-logs")
    assert agent.popen is not None and agent.popen.poll() is None
    await wait_replicas(logstack.url, "tok_acme", "test/chatty:v1")


async def test_printed_marker_text_cannot_cut_a_runs_logs(logstack: Stack) -> None:
    fake = "\x1ejetrun-end 0123456789abcdef"
    body = {"pipeline": "test/say:v1", "inputs": [{"type": "string", "value": fake}]}
    async with client(logstack, "tok_acme") as c:
        run = (await c.post("/v4/runs", json=body)).json()
        assert run["state"] == "completed"
        logs = (await c.get(f"/v4/runs/{run['id']}/logs")).json()
        nxt = (await c.post("/v4/runs", json=chatty(1, False))).json()
        next_logs = (await c.get(f"/v4/runs/{nxt['id']}/logs")).json()
    assert [line["text"] for line in logs["lines"]] == [fake, "last line"]
    assert by_stream(next_logs["lines"]) == {"stdout": ["out 0"], "stderr": ["to stderr"]}


async def test_services_log_json_with_run_fields_and_an_access_log(logstack: Stack) -> None:
    async with client(logstack, "tok_acme") as c:  # a failure: the agent logs it (INFO)
        run = (await c.post("/v4/runs", json=chatty(1, True))).json()
        await c.get(f"/v4/runs/{run['id']}")
    gateway = next(p for p in logstack.procs if p.name.startswith("gateway"))
    agent = next(p for p in logstack.procs if p.name == "agent-logs")
    with anyio.fail_after(10):
        while f'"attempt ended: failed","run_id":"{run["id"]}"' not in agent.output():
            await anyio.sleep(0.05)
        # the access line is written once the answer has gone out: it may come a little later
        while f'"path":"/v4/runs/{run["id"]}"' not in gateway.output():
            await anyio.sleep(0.05)
    records = [json.loads(line) for line in gateway.output().splitlines() if line.strip()]
    access = [r for r in records if r["logger"] == "jetrun.access"]
    get = next(r for r in access if r["path"] == f"/v4/runs/{run['id']}")
    assert get["method"] == "GET" and get["status"] == 200 and get["team"] == "acme"
    assert get["duration_ms"] >= 0 and "ts" in get
    assert all("Bearer" not in json.dumps(r) for r in records)
    lines = [json.loads(line) for line in agent.output().splitlines() if line.startswith("{")]
    ended = next(r for r in lines if r.get("run_id") == run["id"] and "ended" in r["msg"])
    assert ended["attempt"] == 1 and ended["agent_id"] == "agent-logs"
    assert ended["team"] == "acme" and ended["pipeline"] == "test/chatty:v1"
    # a completed attempt is in the event log, not a line per run in the agent's (DEBUG)
    assert "attempt ended: completed" not in agent.output()


async def test_a_pipeline_that_closes_its_stderr_keeps_its_worker_and_its_next_logs() -> None:
    """Each attempt gets fresh pipes: closing fd 2 ends nothing but that attempt's stderr
    (the worker used to wait 5 s under uvloop for an end marker that never came, then
    retire the worker)."""
    from runtime.infra.capture import LogCapture
    from runtime.node.worker import PipelineWorker

    async with PipelineWorker(LOGS, "test/mute:v1") as worker:
        for text in ("said once", "said twice"):
            capture = LogCapture(time.time)
            with anyio.fail_after(30):
                result = await worker.run([from_python(text)], output=capture)
            assert result.ok, result
            lines = [(line.stream, line.text) for line in capture.take()]
            assert sorted(lines) == [("stderr", f"err: {text}"), ("stdout", text)]
            assert worker.alive


async def test_the_sdk_reads_and_follows_a_runs_logs(logstack: Stack) -> None:
    from runtime.clients.sdk import AsyncClient, JetrunError

    async with AsyncClient(logstack.url, "tok_acme") as sdk:
        run = await sdk.run_pipeline("test/chatty:v1", 2, False, async_run=True)
        with anyio.fail_after(30):
            followed = [line.text async for line in sdk.follow_run_logs(run.id)]
        logs = await sdk.get_run_logs(run.id)
    assert followed == [line.text for line in logs.lines]
    assert [(line.stream, line.text) for line in logs.lines if line.stream == "stdout"] == [
        ("stdout", "out 0"),
        ("stdout", "out 1"),
    ]
    async with AsyncClient(logstack.url, "tok_acme") as sdk:
        errors = await sdk.get_run_logs(run.id, stream="stderr")
        with anyio.fail_after(30):
            followed_errors = [line.text async for line in sdk.follow_run_logs(run.id, "stderr")]
    assert [line.text for line in errors.lines] == followed_errors == ["to stderr"]
    assert logs.state == "completed" and not logs.truncated
    async with AsyncClient(logstack.url, "tok_rival") as rival:
        with pytest.raises(JetrunError) as refused:
            await rival.get_run_logs(run.id)
    assert refused.value.status == 404


class RecordingStore:
    """Stands in for the log store: records the chunks it is given."""

    def __init__(self) -> None:
        self.chunks: list[LogChunk] = []

    async def append(self, chunk: LogChunk) -> None:
        self.chunks.append(chunk)


async def test_one_flusher_publishes_open_attempts_while_they_run_and_silent_ones_never() -> None:
    store = RecordingStore()
    flusher = LogFlusher(flush_s=0.05)
    clock = SYSTEM_CLOCK
    async with anyio.create_task_group() as tg:
        tg.start_soon(flusher.run)
        chatty = flusher.open(AttemptLog(store, "run_chatty", 1, clock))  # type: ignore[arg-type]
        silent = flusher.open(AttemptLog(store, "run_silent", 1, clock))  # type: ignore[arg-type]
        chatty.capture.feed(b"one\n", "stdout")
        with anyio.fail_after(5):  # published while the attempt is still open
            while not store.chunks:
                await anyio.sleep(0.01)
        chatty.capture.feed(b"two\n", "stdout")
        await flusher.close(chatty)
        await flusher.close(silent)
        tg.cancel_scope.cancel()
    assert [c.run_id for c in store.chunks] == ["run_chatty", "run_chatty"]
    assert [c.index for c in store.chunks] == [0, 1]
    assert [line.text for c in store.chunks for line in c.lines] == ["one", "two"]
