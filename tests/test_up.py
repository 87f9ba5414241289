"""``jetrun up`` as a user runs it: one command, the seed's curls work, Ctrl-C stops it all,
and starting again keeps the run history. It tells the truth about itself: startup errors are
one line and a non-zero exit, the banner comes once the pipelines are ready, shutdown is
bounded, and its children die with it."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from runtime.infra.natsserver import free_port
from tests.harness import Proc, wait_ready, wait_replicas, wait_state

pytestmark = pytest.mark.anyio

JETRUN = str(Path(sys.executable).parent / "jetrun")
SEED = {
    "pipeline": "demo/echo:v1",
    "inputs": [{"type": "string", "value": "my_input_string"}, {"type": "integer", "value": 5}],
}


def up(tmp_path: Path, port: int, name: str, *args: str) -> Proc:
    argv = [JETRUN, "up", "--port", str(port), "--data-dir", str(tmp_path / "data"), "--slots", "2"]
    return Proc(name, [*argv, *args], tmp_path / f"{name}.log").start()


async def wait_output(proc: Proc, text: str, timeout: float = 60.0) -> str:
    """Wait (bounded) until ``text`` is in the process's output; the output then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        output = proc.output()
        if text in output:
            return output
        assert proc.popen is not None
        if proc.popen.poll() is not None:
            break
        await anyio.sleep(0.1)
    raise TimeoutError(f"{text!r} not printed within {timeout} s:\n{proc.output()}")


async def exit_code(proc: Proc, timeout: float) -> int:
    """The exit code, waiting at most ``timeout`` seconds (a hang fails the test)."""
    assert proc.popen is not None
    deadline = time.monotonic() + timeout
    while proc.popen.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError(f"{proc.name} still running after {timeout} s:\n{proc.output()}")
        await anyio.sleep(0.05)
    return proc.popen.returncode


async def test_up_serves_the_seed_examples_and_keeps_history(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": "Bearer jr_demo_token"}
    first = up(tmp_path, port, "up-1")
    try:
        banner = await wait_output(first, "Ctrl-C stops everything.")
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as c:
            # the banner comes once every demo pipeline is ready, the slow starter too
            scaling = await c.get("/v4/pipelines/demo/slow-start:v1/scaling")
            assert scaling.json()["current_replicas"] == 1, banner
            sync = await c.post("/v4/runs", json=SEED)
            assert sync.status_code == 200 and sync.json()["state"] == "completed"
            started = await c.post("/v4/runs", json={**SEED, "async_run": True})
            assert started.status_code == 202
            run_id = started.json()["id"]
            assert (await wait_state(c, run_id, {"completed"}))["outputs"]
        assert banner.count("jetrun is up") == 1
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


# --- startup errors: one line, a non-zero exit, no banner -----------------------------------


@pytest.fixture
def listener() -> Iterator[int]:
    """A port somebody else listens on (and never speaks NATS nor HTTP)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def assert_one_clear_line(proc: Proc, *words: str) -> None:
    output = proc.output()
    errors = [line for line in output.splitlines() if line.startswith("jetrun: ")]
    assert len(errors) == 1 and all(w in errors[0] for w in words), output
    assert "jetrun is up" not in output and "Traceback" not in output, output


@pytest.mark.parametrize("taken", ["--nats-port", "--port"])
async def test_a_port_in_use_fails_fast(tmp_path: Path, listener: int, taken: str) -> None:
    port = listener if taken == "--port" else free_port()
    args = ["--nats-port", str(listener)] if taken == "--nats-port" else []
    proc = up(tmp_path, port, "up", *args)
    assert await exit_code(proc, timeout=20) == 1
    what = "NATS" if taken == "--nats-port" else "HTTP"
    assert_one_clear_line(proc, f"{what} port {listener}", "not available")


async def test_a_health_port_in_use_fails_fast(tmp_path: Path, listener: int) -> None:
    proc = up(tmp_path, free_port(), "up", "--health-port", str(listener))
    assert await exit_code(proc, timeout=30) == 1
    assert_one_clear_line(proc, "serving /metrics and /healthz failed", str(listener))


async def test_a_bad_config_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[teams.acme]\ntier = "platinum"\ntokens = ["t"]\n')
    proc = up(tmp_path, free_port(), "up", "--config", str(config))
    assert await exit_code(proc, timeout=20) == 1
    lines = proc.output().strip().splitlines()
    assert len(lines) == 1 and "unknown tier 'platinum'" in lines[0], lines


async def test_a_pipeline_module_that_fails_to_import_fails_fast(tmp_path: Path) -> None:
    bad = tmp_path / "bad_pipelines.py"
    bad.write_text("import no_such_module_here\n")
    proc = up(tmp_path, free_port(), "up", "--pipelines", str(bad))
    assert await exit_code(proc, timeout=30) == 1
    assert_one_clear_line(proc, "local agent exited")
    assert "cannot load pipeline module" in proc.output()
    assert "No module named 'no_such_module_here'" in proc.output()


async def test_a_pipeline_whose_startup_fails_fails_fast(tmp_path: Path) -> None:
    broken = tmp_path / "broken_pipelines.py"
    broken.write_text(
        "from runtime.node.pipelines import pipeline\n\n\n"
        '@pipeline("mine/broken:v1")\n'
        "class Broken:\n"
        "    def startup(self) -> None:\n"
        '        raise RuntimeError("no model file")\n\n'
        "    def run(self, text: str) -> str:\n"
        "        return text\n"
    )
    proc = up(tmp_path, free_port(), "up", "--pipelines", str(broken))
    assert await exit_code(proc, timeout=30) == 1
    assert_one_clear_line(proc, "pipeline mine/broken:v1 failed to start", "no model file")


async def test_the_banner_names_a_pipeline_that_exists(tmp_path: Path) -> None:
    """And once it is printed, every pipeline of the modules is known (a scaled-to-zero one
    too, which no replica has loaded)."""
    mine = tmp_path / "my_pipelines.py"
    mine.write_text(
        "from contracts.scaling import ScalingSettings\n"
        "from runtime.node.pipelines import pipeline\n\n\n"
        '@pipeline("mine/hello:v1")\n'
        "def hello(name: str) -> str:\n"
        '    return "hello " + name\n\n\n'
        '@pipeline("mine/idle:v1", scaling=ScalingSettings(min_replicas=0))\n'
        "def idle(name: str) -> str:\n"
        "    return name\n"
    )
    port = free_port()
    proc = up(tmp_path, port, "up", "--pipelines", str(mine))
    try:
        banner = await wait_output(proc, "Ctrl-C stops everything.")
        assert '"pipeline": "mine/hello:v1"' in banner and "demo/echo" not in banner
        headers = {"Authorization": "Bearer jr_demo_token"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers) as c:
            for name in ("mine/hello:v1", "mine/idle:v1"):
                known = await c.get(f"/v4/pipelines/{name}/scaling")
                assert known.status_code == 200, known.text
    finally:
        proc.signal(signal.SIGINT)
        assert await exit_code(proc, timeout=30) == 0


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has a GPU")
async def test_no_banner_while_a_deployed_pipeline_cannot_be_registered(tmp_path: Path) -> None:
    """A module's GPU pipeline on a machine without a GPU: no agent here registers it, so its
    runs would be 404; up says so in one line instead of saying it is up."""
    mixed = tmp_path / "mixed_pipelines.py"
    mixed.write_text(
        "from runtime.node.pipelines import pipeline\n\n\n"
        '@pipeline("mine/cpu:v1")\n'
        "def cpu(name: str) -> str:\n"
        "    return name\n\n\n"
        '@pipeline("mine/gpu:v1", accelerator="gpu")\n'
        "def gpu(name: str) -> str:\n"
        "    return name\n"
    )
    proc = up(tmp_path, free_port(), "up", "--pipelines", str(mixed))
    assert await exit_code(proc, timeout=60) == 1
    assert_one_clear_line(proc, "pipeline mine/gpu:v1 needs a gpu slot", "404")
    assert "jetrun is up" not in proc.output()


# --- shutdown is bounded; children die with the parent ---------------------------------------


def children(pid: int) -> dict[int, str]:
    """Every descendant of ``pid``: pid -> command name (from /proc)."""
    parents: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        parents[int(entry.name)] = (int(stat[stat.rindex(")") + 2 :].split()[1]), name)
    found: dict[int, str] = {}
    frontier = {pid}
    while frontier:
        frontier = {p for p, (ppid, _) in parents.items() if ppid in frontier}
        found.update({p: parents[p][1] for p in frontier})
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


async def started_up(tmp_path: Path) -> tuple[Proc, str]:
    port = free_port()
    proc = up(tmp_path, port, "up")
    await wait_output(proc, "Ctrl-C stops everything.")
    return proc, f"http://127.0.0.1:{port}"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
async def test_sigkill_of_up_takes_nats_server_agent_and_workers_with_it(tmp_path: Path) -> None:
    proc, _ = await started_up(tmp_path)
    family = children(proc.pid)
    try:
        names = set(family.values())
        assert "nats-server" in names and sum(1 for n in names if n.startswith("python")) >= 1
        assert len(family) >= 4, family  # nats-server, the agent, its warm workers
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.popen is not None and proc.popen.wait(10) == -signal.SIGKILL
        deadline = time.monotonic() + 15
        while any(alive(p) for p in family) and time.monotonic() < deadline:
            await anyio.sleep(0.1)
        assert not [p for p in family if alive(p)], family
    finally:
        for pid in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
async def test_ctrl_c_is_bounded_when_nats_is_gone(tmp_path: Path) -> None:
    proc, url = await started_up(tmp_path)
    family = children(proc.pid)
    try:
        nats = next(p for p, name in family.items() if name == "nats-server")
        headers = {"Authorization": "Bearer jr_demo_token"}
        body = {"pipeline": "demo/sleep:v1", "async_run": True}
        body["inputs"] = [{"type": "fp", "value": 1.0}]  # type: ignore[assignment]
        await wait_replicas(url, "jr_demo_token", "demo/sleep:v1")
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as c:
            run = (await c.post("/v4/runs", json=body)).json()
            await wait_state(c, run["id"], {"running"})
        os.kill(nats, signal.SIGKILL)  # the run's result now has nowhere to go
        await anyio.sleep(2.0)  # the attempt ends and its report starts retrying
        proc.signal(signal.SIGINT)
        assert await exit_code(proc, timeout=30) == 0, proc.output()
        assert not [p for p in family if alive(p)], family
    finally:
        for pid in family:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
