"""A run that waits says what it waits for as a node boots (``node``) and its replica loads
(``cold_start``), on ``jetrun up`` with a simulated boot delay; the added agent is stopped once
idle. ``jetrun scaling`` reads and changes the settings through the API."""

from __future__ import annotations

import json
import re
import signal
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import anyio
import httpx
import pytest

from runtime.infra.natsserver import free_port
from tests.harness import FIXTURES, Proc, wait_known, wait_ready

pytestmark = pytest.mark.anyio

JETRUN = str(Path(sys.executable).parent / "jetrun")
UP_LOG: list[Path] = []  # the module's jetrun up log (its banner names its NATS URL)
CONFIG = """
[teams.test]
tier = "pro"
tokens = ["tok_test"]

[settings]
heartbeat_interval_s = 0.5
scale_tick_s = 0.2
node_cooldown_s = 2
"""


@pytest.fixture(scope="module")
async def url(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    tmp = tmp_path_factory.mktemp("nodes")
    (tmp / "jetrun.toml").write_text(CONFIG)
    port = free_port()
    argv = [JETRUN, "up", "--port", str(port), "--data-dir", str(tmp / "data")]
    argv += ["--config", str(tmp / "jetrun.toml"), "--pipelines", str(FIXTURES / "node_needed.py")]
    argv += ["--slots", "1", "--boot-delay", "2"]
    proc = Proc("up", argv, tmp / "up.log").start()
    UP_LOG[:] = [tmp / "up.log"]
    try:
        await wait_ready(f"http://127.0.0.1:{port}")
        await wait_known(f"http://127.0.0.1:{port}", "tok_test", "test/later:v1")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.signal(signal.SIGINT)
        try:
            code = proc.popen.wait(30) if proc.popen else None
        finally:
            proc.stop()
        if code != 0:
            print(proc.output())


async def test_a_waiting_run_waits_for_a_node_then_the_cold_start(url: str) -> None:
    headers = {"Authorization": "Bearer tok_test"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as c:
        with anyio.fail_after(30):  # the filler takes the first agent's only slot
            while (await c.get("/v4/pipelines/test/filler:v1/scaling")).json().get(
                "current_replicas"
            ) != 1:
                await anyio.sleep(0.1)
        created = await c.post(
            "/v4/runs", json={"pipeline": "test/later:v1", "inputs": [], "async_run": True}
        )
        assert created.status_code == 202
        run_id = created.json()["id"]
        seen: list[str] = []
        states: list[str] = []
        with anyio.fail_after(60):
            while True:
                run = (await c.get(f"/v4/runs/{run_id}")).json()
                if run["waiting_for"] and run["waiting_for"] not in seen:
                    seen.append(run["waiting_for"])
                scaling = (await c.get("/v4/pipelines/test/later:v1/scaling")).json()
                states.extend(r["state"] for r in scaling["replicas"] if r["state"] not in states)
                if run["state"] in ("completed", "failed", "no_resources_available"):
                    break
                await anyio.sleep(0.05)
        assert run["state"] == "completed" and run["outputs"][0]["value"] == "served"
        assert seen.index("node") < seen.index("cold_start"), seen
        assert states[:3] == ["booting", "loading", "ready"], states
        node = next(r["agent_id"] for r in scaling["replicas"])
        # idle: the replica is unloaded after its cooldown, then the node after its own
        with anyio.fail_after(30):
            while True:
                history = (await c.get("/v4/pipelines/test/later:v1/scaling/history")).json()
                if any(e["event"] == "replica_unload" for e in history["events"]):
                    break
                await anyio.sleep(0.2)
        with anyio.fail_after(30):
            while _agent_running(node, UP_LOG[0]):
                await anyio.sleep(0.2)


def _agent_running(node_id: str, log: Path) -> bool:
    """Whether a ``jetrun agent --id node_id`` of this stack (the NATS URL in its banner) runs
    here: other stacks on the machine have their own ``node-1``."""
    found = re.search(r"embedded nats-server at (\S+),", log.read_text(errors="replace"))
    assert found is not None
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"agent" in argv and node_id.encode() in argv and found.group(1).encode() in argv:
                return True
    return False


async def test_the_scaling_command_reads_and_changes_settings(url: str) -> None:
    base = [JETRUN, "scaling", "test/later", "--url", url, "--token", "tok_test"]
    # a warm window twelve hours from now (UTC): one that held now would add a scaling event
    hour = (datetime.now(UTC).hour + 12) % 24
    start, end = f"{hour:02d}:00", f"{hour:02d}:59"
    with anyio.fail_after(90):
        changed = await anyio.run_process(
            [*base, "--cooldown", "7", "--warm", f"{start}-{end}=1"], check=False
        )
        assert changed.returncode == 0, changed.stderr.decode()
        body = json.loads(changed.stdout)
        assert body["pipeline"] == "test/later:v1"
        assert body["settings"]["cooldown_s"] == 7
        assert body["settings"]["warm"] == [{"start": start, "end": end, "replicas": 1}]
        history = await anyio.run_process([*base, "--history"], check=False)
        assert history.returncode == 0
        events = json.loads(history.stdout)["events"]
        assert events[-1]["event"] == "settings" and events[-1]["by"] == "test"
        wrong = await anyio.run_process([*base[:-1], "nope"], check=False)
        assert wrong.returncode != 0 and b"401" in wrong.stderr
