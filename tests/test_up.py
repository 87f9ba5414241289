"""``jetrun up`` as a user runs it: one command, the seed's curls work, Ctrl-C stops it all,
and starting again keeps the run history."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import httpx
import pytest

from runtime.natsserver import free_port
from tests.harness import Proc, wait_ready, wait_replicas, wait_state

pytestmark = pytest.mark.anyio

JETRUN = str(Path(sys.executable).parent / "jetrun")
SEED = {
    "pipeline": "demo/echo:v1",
    "inputs": [{"type": "string", "value": "my_input_string"}, {"type": "integer", "value": 5}],
}


def up(tmp_path: Path, port: int, name: str) -> Proc:
    argv = [JETRUN, "up", "--port", str(port), "--data-dir", str(tmp_path / "data"), "--slots", "2"]
    return Proc(name, argv, tmp_path / f"{name}.log").start()


async def test_up_serves_the_seed_examples_and_keeps_history(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": "Bearer jr_demo_token"}
    first = up(tmp_path, port, "up-1")
    try:
        await wait_ready(url)
        await wait_replicas(url, "jr_demo_token", "demo/echo:v1")
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as c:
            sync = await c.post("/v4/runs", json=SEED)
            assert sync.status_code == 200 and sync.json()["state"] == "completed"
            started = await c.post("/v4/runs", json={**SEED, "async_run": True})
            assert started.status_code == 202
            run_id = started.json()["id"]
            assert (await wait_state(c, run_id, {"completed"}))["outputs"]
        banner = first.output()
        assert f"jetrun is up: {url}" in banner and "jr_demo_token" in banner
        assert "curl -X POST" in banner
    finally:
        first.signal(signal.SIGINT)
        code = first.popen.wait(30) if first.popen else None
    assert code == 0, first.output()
    assert "shutting down" in first.output()

    second = up(tmp_path, port, "up-2")
    try:
        await wait_ready(url)
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as c:
            again = await c.get(f"/v4/runs/{run_id}")
            assert again.status_code == 200
            assert again.json()["state"] == "completed"
            assert (await c.get(f"/v4/runs/{sync.json()['id']}")).json()["outputs"][0][
                "value"
            ] == "my_input_string" * 5
    finally:
        second.signal(signal.SIGINT)
        assert second.popen is not None and second.popen.wait(30) == 0, second.output()
