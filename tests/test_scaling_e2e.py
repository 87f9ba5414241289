"""Autoscaling with real processes on ``jetrun up``: scale to zero and back, the seed's 503 and
cold-start semantics, a burst up to ``max_replicas`` on a second agent the local provider
starts and stops, a startup that keeps failing, and settings changed through the API."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from runtime.infra.natsserver import free_port
from tests.harness import FIXTURES, Proc, wait_known, wait_ready, wait_state

pytestmark = pytest.mark.anyio

JETRUN = str(Path(sys.executable).parent / "jetrun")
SCALED = "demo/scaled:v1"
CONFIG = """
[teams.demo]
tier = "pro"
tokens = ["jr_demo_token"]

[teams.rival]
tier = "pro"
tokens = ["tok_rival"]

[settings]
heartbeat_interval_s = 0.5
node_loss_timeout_s = 5
scale_tick_s = 0.2
node_cooldown_s = 3
resource_wait_timeout_s = 60
"""


def sleep_run(seconds: float, **extra: Any) -> dict[str, Any]:
    return {"pipeline": SCALED, "inputs": [{"type": "fp", "value": seconds}], **extra}


async def poll(
    c: httpx.AsyncClient, pointer: str, done: Any, timeout: float = 30.0
) -> dict[str, Any]:
    """Poll the scaling endpoint until ``done(body)``; every body is checked to stay within
    the settings."""
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        body = (await c.get(f"/v4/pipelines/{pointer}/scaling")).json()
        if body.get("settings"):
            assert body["current_replicas"] <= body["settings"]["max_replicas"], body
            assert body["desired_replicas"] <= body["settings"]["max_replicas"], body
        if done(body):
            return body
        await anyio.sleep(0.1)
    raise TimeoutError(f"scaling of {pointer} never got there: {body}")


def agent_running(node_id: str, nats_url: str) -> bool:
    """Whether a ``jetrun agent --id node_id`` of this stack (its NATS URL) runs here: other
    stacks on the machine have their own ``node-1``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"agent" in argv and node_id.encode() in argv and nats_url.encode() in argv:
            return True
    return False


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@dataclass
class Up:
    url: str
    proc: Proc

    async def nats_url(self) -> str:
        """From the banner (printed once the agent is ready)."""
        with anyio.fail_after(30):
            while (
                found := re.search(r"embedded nats-server at (\S+),", self.proc.output())
            ) is None:
                await anyio.sleep(0.1)
        return found.group(1)


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Up]:
    tmp = tmp_path_factory.mktemp("scaling")
    (tmp / "jetrun.toml").write_text(CONFIG)
    port = free_port()
    argv = [JETRUN, "up", "--port", str(port), "--data-dir", str(tmp / "data"), "--slots", "2"]
    argv += ["--config", str(tmp / "jetrun.toml"), "--pipelines", str(FIXTURES / "scaled.py")]
    proc = Proc("up", argv, tmp / "up.log").start()
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(url)
        for pointer in (SCALED, "demo/broken:v1"):
            await wait_known(url, "jr_demo_token", pointer)
        yield Up(url, proc)
    finally:
        proc.signal(signal.SIGINT)
        try:
            code = proc.popen.wait(30) if proc.popen else None
        finally:
            proc.stop()
        if code != 0:
            print(proc.output())
            for log in sorted((tmp / "data" / "nodes").glob("*.log")):
                print(log.name, log.read_text(errors="replace"))


@pytest.fixture
def up(stack: Up) -> str:
    return stack.url


def client(url: str, token: str = "jr_demo_token") -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"}
    return httpx.AsyncClient(base_url=url, headers=headers, timeout=60)


async def test_scale_to_zero_503_then_cold_start_then_burst_and_back(stack: Up) -> None:
    up, nats_url = stack.url, await stack.nats_url()
    async with client(up) as c:
        # deployed, autoscaled, no replica at all: never a 404
        zero = await poll(c, SCALED, lambda b: b.get("autoscaled"))
        assert zero["current_replicas"] == 0 and zero["replicas"] == []
        by_id = (await c.get("/v4/pipelines/demo/scaled/scaling")).json()
        assert by_id["pipeline"] == SCALED
        for bad in ("a*b/c:v1", "demo/scaled:v1 >"):  # not a pointer: never a subject
            malformed = await c.get(f"/v4/pipelines/{bad}/scaling")
            assert malformed.status_code == 422, malformed.text
            assert malformed.json()["detail"]["code"] == "invalid_field"
        missing = await c.get("/v4/pipelines/nope/none:v1/scaling")
        assert missing.status_code == 404, missing.text
        assert missing.json()["detail"]["code"] == "pipeline_not_found"

        # a sync run without waiting: 503 at once, and a replica comes up in the background
        started = time.monotonic()
        refused = await c.post("/v4/runs", json=sleep_run(0.0))
        assert refused.status_code == 503, refused.text
        assert refused.json()["state"] == "no_resources_available"
        assert time.monotonic() - started < 10
        await poll(c, SCALED, lambda b: b["current_replicas"] == 1)
        ok = await c.post("/v4/runs", json=sleep_run(0.0))
        assert ok.status_code == 200 and ok.json()["state"] == "completed", ok.text
        worker_pid = ok.json()["outputs"][0]["value"]
        assert alive(worker_pid)

        # idle past the cooldown: scaled to zero, the worker process is gone
        await poll(c, SCALED, lambda b: b["current_replicas"] == 0 and not b["replicas"])
        with anyio.fail_after(10):
            while alive(worker_pid):
                await anyio.sleep(0.1)

        # a run that waits completes after the cold start, saying what it waited for
        waiting = await c.post("/v4/runs", json=sleep_run(0.0, async_run=True))
        assert waiting.status_code == 202
        run = await wait_state(c, waiting.json()["id"], {"completed", "failed"}, timeout=30)
        assert run["state"] == "completed", run

        # a burst: replicas up to max_replicas (2); the first agent holds one, the local
        # provider starts a second agent for the other
        burst = [
            (await c.post("/v4/runs", json=sleep_run(1.0, async_run=True))).json()["id"]
            for _ in range(8)
        ]
        two = await poll(c, SCALED, lambda b: b["current_replicas"] == 2, timeout=60)
        nodes = [r["agent_id"] for r in two["replicas"] if r["agent_id"].startswith("node-")]
        assert len(nodes) == 1 and agent_running(nodes[0], nats_url)
        for run_id in burst:
            assert (await wait_state(c, run_id, {"completed"}, timeout=60))["state"]

        # idle again: back to zero replicas, and the added agent is stopped
        await poll(c, SCALED, lambda b: b["current_replicas"] == 0, timeout=30)
        with anyio.fail_after(30):
            while agent_running(nodes[0], nats_url):
                await anyio.sleep(0.2)

        history = (await c.get(f"/v4/pipelines/{SCALED}/scaling/history")).json()["events"]
        kinds = [e["event"] for e in history]
        assert "replica_load" in kinds and "replica_ready" in kinds
        assert "replica_unload" in kinds and "node_requested" in kinds
        assert "node_released" in kinds  # the added agent's release is part of the history


async def test_startup_that_keeps_failing_ends_waiting_runs_with_startup_error(up: str) -> None:
    async with client(up) as c:
        created = await c.post(
            "/v4/runs", json={"pipeline": "demo/broken:v1", "inputs": [], "async_run": True}
        )
        assert created.status_code == 202
        run = await wait_state(c, created.json()["id"], {"failed", "completed"}, timeout=30)
        assert run["error"]["type"] == "startup_error", run
        assert "weights missing" in run["error"]["message"]
        history = (await c.get("/v4/pipelines/demo/broken:v1/scaling/history")).json()["events"]
        assert [e["event"] for e in history].count("replica_failed") == 2  # 1 + 1 retry
        assert "startup_gave_up" in [e["event"] for e in history]
    async with client(up, "tok_rival") as rival:  # another team: no history
        denied = await rival.get("/v4/pipelines/demo/broken:v1/scaling/history")
        assert denied.status_code == 403


async def test_settings_change_through_the_api_applies_without_restart(up: str) -> None:
    async with client(up) as c, client(up, "tok_rival") as rival:
        denied = await rival.patch(f"/v4/pipelines/{SCALED}/scaling", json={"min_replicas": 1})
        assert denied.status_code == 403 and denied.json()["detail"]["code"] == "forbidden"
        bad = await c.patch(f"/v4/pipelines/{SCALED}/scaling", json={"min_replicas": 5})
        assert bad.status_code == 422 and "min_replicas" in bad.text
        greedy = {"min_replicas": 1000, "max_replicas": 1000}  # every node the provider has
        hoard = await c.patch(f"/v4/pipelines/{SCALED}/scaling", json=greedy)
        assert hoard.status_code == 422 and hoard.json()["detail"]["code"] == "replica_limit"
        changed = await c.patch(f"/v4/pipelines/{SCALED}/scaling", json={"min_replicas": 1})
        assert changed.status_code == 200, changed.text
        assert changed.json()["settings"]["min_replicas"] == 1
        # the floor brings a replica up with no traffic at all
        await poll(c, SCALED, lambda b: b["current_replicas"] == 1, timeout=30)
        back = await c.patch(f"/v4/pipelines/{SCALED}/scaling", json={"min_replicas": 0})
        assert back.status_code == 200
        await poll(c, SCALED, lambda b: b["current_replicas"] == 0, timeout=30)


async def test_deployed_pipeline_without_any_agent_is_503_not_404(stack: Up) -> None:
    admin = re.search(r"one nkey per role in (\S+)", stack.proc.output())
    assert admin is not None
    argv = [JETRUN, "deploy", "--nats", await stack.nats_url(), str(FIXTURES / "deploy_only.py")]
    argv += ["--nats-seed", f"{admin.group(1)}/admin.nk"]
    argv += ["--max-replicas", "3", "--cooldown", "30"]
    done = await anyio.run_process(argv, check=False, stderr=subprocess.STDOUT)
    assert done.returncode == 0, done.stdout.decode()
    assert b"deployed demo/elsewhere:v1" in done.stdout
    async with client(stack.url) as c:
        body = {"pipeline": "demo/elsewhere:v1", "inputs": [{"type": "string", "value": "x"}]}
        refused = await c.post("/v4/runs", json=body)
        assert refused.status_code == 503, refused.text
        scaling = await poll(c, "demo/elsewhere:v1", lambda b: b.get("autoscaled"))
        assert scaling["settings"]["max_replicas"] == 3 and scaling["current_replicas"] == 0
        await anyio.sleep(1.0)  # several ticks: the local provider's nodes cannot serve it
        history = (await c.get("/v4/pipelines/demo/elsewhere:v1/scaling/history")).json()
        kinds = [e["event"] for e in history["events"]]
        assert kinds[0] == "settings" and "node_requested" not in kinds
