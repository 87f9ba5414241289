"""``jetrun up --agents N``: several local agents, each with its own id and slots; runs land on
all of them; one killed is declared lost (its runs requeued onto the others, nothing lost) and
started again while the others keep serving; shutdown stops them all. The default count follows
the cores."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import httpx
import pytest

from runtime.control.gateway_pool import MANY_CORES, usable_cores
from runtime.infra.config import Config
from runtime.infra.natsserver import free_port
from runtime.up import UpOptions
from runtime.up_agents import (
    AGENT_CORES,
    MAX_AGENTS,
    LocalAgent,
    _keep,
    default_agents,
    local_agent_ids,
    stop_all,
)
from runtime.up_children import FENCED_EXIT, AgentExited
from tests.harness import CONFIG
from tests.test_up import alive, assert_one_clear_line, children, exit_code, up, wait_output

pytestmark = pytest.mark.anyio

ADMIN = {"Authorization": "Bearer tok_admin"}
DEMO = {"Authorization": "Bearer jr_demo_token"}
LOSS_S = 2.0
PIPELINES = """
import time

from runtime.node.pipelines import pipeline


@pipeline("mine/sleep:v1", max_retries=2)
def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@pipeline("mine/echo:v1")
def echo(text: str) -> str:
    return text
"""


def test_one_agent_below_many_cores_then_one_per_agent_cores() -> None:
    assert [default_agents(n) for n in (1, 2, 4, MANY_CORES - 1)] == [1] * 4
    assert AGENT_CORES == 7 and MAX_AGENTS == 4
    assert [default_agents(n) for n in (8, 13, 14, 16, 20, 21, 28)] == [1, 1, 2, 2, 2, 3, 4]
    assert default_agents(256) == MAX_AGENTS
    assert default_agents() == default_agents(usable_cores())


def test_every_local_agent_has_an_id_of_its_own() -> None:
    fresh = local_agent_ids(3, fresh=True)
    assert len(set(fresh)) == 3 and all(a.startswith("local-") for a in fresh)
    minted = local_agent_ids(3, fresh=False)  # the operator minted them ahead, by these names
    assert minted[1:] == [f"{minted[0]}-2", f"{minted[0]}-3"]
    assert local_agent_ids(1, fresh=False) == minted[:1]


async def agents(c: httpx.AsyncClient) -> dict[str, dict[str, int]]:
    """Live agents, as the dashboard says: id -> slot kind -> runs dispatched there."""
    answer = await c.get("/v4/dashboard", headers=ADMIN)
    assert answer.status_code == 200, answer.text
    return {a["agent_id"]: a["used_slots"] for a in answer.json()["agents"]}


async def until(what: str, check: object, timeout: float = 30.0) -> object:
    """Poll the coroutine function ``check`` until it returns something true (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = await check()  # type: ignore[operator]
        if found:
            return found
        await anyio.sleep(0.1)
    raise TimeoutError(f"{what} not seen within {timeout} s")


def agent_pids(up_pid: int) -> dict[str, int]:
    """The local agents' processes under ``up_pid``: agent id -> pid (from /proc)."""
    found = {}
    for pid in children(up_pid):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"agent" in argv and b"--id" in argv:
                found[argv[argv.index(b"--id") + 1].decode()] = pid
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
async def test_two_local_agents_serve_and_one_killed_is_replaced_with_nothing_lost(
    tmp_path: Path,
) -> None:
    config = tmp_path / "jetrun.toml"
    config.write_text(
        CONFIG.format(node_loss_timeout_s=LOSS_S, resource_wait_timeout_s=30, keep_ended_s=300)
    )
    module = tmp_path / "two_agents_pipelines.py"
    module.write_text(PIPELINES)
    port = free_port()
    args = ["--agents", "2", "--config", str(config), "--pipelines", str(module)]
    proc = up(tmp_path, port, "up", *args)  # --slots 2: each agent's
    family: dict[int, str] = {}
    try:
        banner = await wait_output(proc, "Ctrl-C stops everything.")
        assert banner.count("jetrun is up") == 1
        family = children(proc.pid)
        pids = agent_pids(proc.pid)
        assert len(pids) == 2, family
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            # the banner comes once both are ready: both heartbeat with their own slots
            assert set(await agents(c)) == set(pids)

            # four long runs on 2 + 2 slots: two land on each agent
            sleep = {"pipeline": "mine/sleep:v1", "inputs": [{"type": "fp", "value": 3.0}]}
            runs = []
            for _ in range(4):
                answer = await c.post("/v4/runs", json={**sleep, "async_run": True}, headers=DEMO)
                assert answer.status_code == 202, answer.text
                runs.append(answer.json()["id"])

            async def both_busy() -> bool:
                return {a: u.get("cpu", 0) for a, u in (await agents(c)).items()} == dict.fromkeys(
                    pids, 2
                )

            await until("two runs on each agent", both_busy)

            # one agent killed: the other keeps serving
            victim, survivor = sorted(pids)
            os.kill(pids[victim], signal.SIGKILL)
            echo = {"pipeline": "mine/echo:v1", "inputs": [{"type": "string", "value": "hi"}]}
            sync = await c.post("/v4/runs", json=echo, headers=DEMO)
            assert sync.status_code == 200 and sync.json()["state"] == "completed", sync.text

            # declared lost: its two runs are requeued onto the survivor; every run completes
            async def all_completed() -> list[dict[str, object]] | None:
                states = [(await c.get(f"/v4/runs/{r}", headers=DEMO)).json() for r in runs]
                assert all(s["state"] not in ("failed", "preempted") for s in states), states
                return states if all(s["state"] == "completed" for s in states) else None

            ended = await until("every run completed", all_completed, timeout=40)
            assert sorted(s["attempt"] for s in ended) == [1, 1, 2, 2], ended  # type: ignore[attr-defined]

            # and the killed one is started again, with the same id, and serves
            async def back() -> bool:
                return set(await agents(c)) == set(pids)

            await until("the killed agent back", back, timeout=20)
            restarted = agent_pids(proc.pid)
            assert restarted[survivor] == pids[survivor] and restarted[victim] != pids[victim]
            family.update(children(proc.pid))
        assert "local agent" in proc.output() and "declared lost" in proc.output()

        proc.signal(signal.SIGINT)  # shutdown stops both (bounded)
        assert await exit_code(proc, timeout=30) == 0, proc.output()
        deadline = time.monotonic() + 10
        while any(alive(p) for p in family) and time.monotonic() < deadline:
            await anyio.sleep(0.1)
        assert not [p for p in family if alive(p)], family
    finally:
        proc.kill()
        for pid in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def test_any_agent_that_cannot_start_is_one_clear_startup_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad_pipelines.py"
    bad.write_text("import no_such_module_here\n")
    proc = up(tmp_path, free_port(), "up", "--agents", "2", "--pipelines", str(bad))
    assert await exit_code(proc, timeout=30) == 1
    assert_one_clear_line(proc, "local agent exited", "before it was ready")


class Exits(LocalAgent):
    """A stand-in local agent whose processes exit with ``codes`` in turn, then sleep."""

    def __init__(self, codes: list[int]) -> None:
        self.codes, self.starts = codes, 0
        opts = UpOptions(
            data_dir=Path("/nonexistent"),
            config=Config(tiers={}, teams={}),
            host="127.0.0.1",
            port=0,
            nats_url=None,
            nats_port=0,
            modules=[],
            slots=1,
        )
        super().__init__(opts, "local-test", {})

    def start(self) -> subprocess.Popen[bytes]:
        code = self.codes[self.starts] if self.starts < len(self.codes) else None
        self.starts += 1
        script = "import time; time.sleep(30)" if code is None else f"raise SystemExit({code})"
        self.proc = subprocess.Popen([sys.executable, "-c", script])
        return self.proc


async def test_the_only_agent_exiting_stops_up_and_one_of_several_comes_back_once_lost() -> None:
    stopping = anyio.Event()
    alone = Exits([7])
    with anyio.fail_after(10), pytest.raises(AgentExited, match="exited with code 7"):
        await _keep(alone, False, stopping, lambda _: False)

    fenced = Exits([FENCED_EXIT])  # declared lost: back at once, alone or not
    several = Exits([-9])
    gone: set[str] = set()
    try:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(_keep, fenced, False, stopping, lambda _: False)
                tg.start_soon(_keep, several, True, stopping, gone.__contains__)
                while fenced.starts < 2:
                    await anyio.sleep(0.05)
                await anyio.sleep(0.5)
                assert several.starts == 1  # not before the scheduler declared it lost
                gone.add(several.agent_id)
                while several.starts < 2:
                    await anyio.sleep(0.05)
                stopping.set()
    finally:
        await stop_all([fenced.proc, several.proc], 5.0)
    assert fenced.proc.returncode is not None and several.proc.returncode is not None
