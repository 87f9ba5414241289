"""The user-facing CLI as real processes against a live stack: ``jetrun run``, ``runs``,
``logs`` and ``events``; the live status line through a pseudo-terminal."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from tests.harness import FIXTURES, ROOT, Stack, client, open_gate, wait_replicas, wait_state

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
async def clistack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with Stack(tmp_path_factory.mktemp("cli")) as stack:
        await stack.start_nats()
        stack.start_scheduler()
        await stack.start_gateway()
        stack.start_agent("agent-demo", "runtime.node.demo", str(FIXTURES / "log_pipelines.py"))
        stack.start_agent("agent-gates", str(FIXTURES / "gate_pipelines.py"), slots=1)
        await wait_replicas(stack.url, "tok_acme", "demo/echo:v1")
        await wait_replicas(stack.url, "tok_acme", "test/chatty:v1")
        await wait_replicas(stack.url, "tok_acme", "test/gate:v1")
        yield stack


def env_for(stack: Stack, token: str | None = "tok_acme", **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JETRUN_")}
    env.update(PYTHONPATH=str(ROOT), JETRUN_URL=stack.url, NO_COLOR="1", COLUMNS="200")
    env["JETRUN_CLIENT_CONFIG"] = "/nonexistent/client.toml"
    if token:
        env["JETRUN_TOKEN"] = token
    env.update(extra)
    return env


async def jetrun(
    stack: Stack, *args: str, token: str | None = "tok_acme", **env: str
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "runtime.cli", *args]
    with anyio.fail_after(60):
        done = await anyio.run_process(argv, env=env_for(stack, token, **env), check=False)
    return subprocess.CompletedProcess(
        argv, done.returncode, done.stdout.decode(), done.stderr.decode()
    )


async def test_run_waits_and_prints_the_outputs(clistack: Stack) -> None:
    done = await jetrun(clistack, "run", "demo/echo:v1", "hello", "3")
    assert done.returncode == 0, done.stderr
    assert "completed" in done.stdout and "hellohellohello" in done.stdout
    assert "string" in done.stdout  # the output's type
    assert done.stderr.splitlines()[-1] == "completed"  # state changes as lines, no terminal


async def test_a_failed_run_shows_its_error_and_logs_in_one_command(clistack: Stack) -> None:
    done = await jetrun(clistack, "run", "test/chatty:v1", "2", "boolean:true")
    assert done.returncode == 1
    out = done.stdout
    assert "failed" in out and "pipeline_error: RuntimeError: chatty failed on purpose" in out
    assert "Traceback" in out
    assert "out 0\nout 1\n" in out and "to stderr\n" in out
    assert "jetrun logs run_" in out


async def test_async_then_get_logs_and_events(clistack: Stack) -> None:
    done = await jetrun(clistack, "run", "--async", "test/chatty:v1", "3", "false")
    assert done.returncode == 0, done.stderr
    run_id = done.stdout.strip()
    assert run_id.startswith("run_")
    async with client(clistack, "tok_acme") as c:
        await wait_state(c, run_id, {"completed"})
    got = await jetrun(clistack, "runs", "get", run_id, "--json")
    assert json.loads(got.stdout)["outputs"][0]["value"] == 3
    logs = await jetrun(clistack, "logs", run_id)
    assert logs.stdout == "out 0\nout 1\nout 2\n"  # the pipeline's stderr on stderr
    assert logs.stderr == "to stderr\n"
    only = await jetrun(clistack, "logs", "--stream", "stderr", run_id)
    assert only.stdout == "" and only.stderr == "to stderr\n"
    followed = await jetrun(clistack, "logs", "-f", "--timestamps", run_id)
    assert followed.returncode == 0
    assert [line.split(" ", 2)[2] for line in followed.stdout.splitlines()] == [
        "out 0", "out 1", "out 2"
    ]  # fmt: skip
    assert [line.split(" ", 2)[2] for line in followed.stderr.splitlines()] == ["to stderr"]
    assert clistack.nats is not None
    nats = clistack.nats_args("service")
    events = await jetrun(clistack, "events", run_id, *nats, "--json")
    kinds = [json.loads(line)["event"] for line in events.stdout.splitlines()]
    assert kinds[0] == "submitted" and kinds[-1] == "completed"
    assert "dispatched" in kinds  # (an attempt shorter than 50 ms appends no started)
    table = await jetrun(clistack, "events", run_id, *nats)
    assert "dispatched" in table.stdout and "agent_id=agent-demo" in table.stdout


async def test_typed_inputs_and_bad_inputs(clistack: Stack) -> None:
    done = await jetrun(clistack, "run", "demo/echo:v1", "string:5", '{"type":"integer","value":2}')
    assert done.returncode == 0 and "55" in done.stdout
    bad = await jetrun(clistack, "run", "demo/echo:v1", "x", "integer:many")
    assert bad.returncode == 2 and "input 2 ('integer:many')" in bad.stderr
    wrong = await jetrun(clistack, "run", "demo/echo:v1", "x", "string:2")
    assert wrong.returncode == 1 and "input_error" in wrong.stdout
    missing = await jetrun(clistack, "run", "nobody/nothing:v1")
    assert missing.returncode == 1 and "pipeline_not_found" in missing.stderr


async def test_ls_filters_and_other_teams_see_nothing(clistack: Stack) -> None:
    ok = (await jetrun(clistack, "run", "--async", "demo/echo:v1", "a")).stdout.strip()
    bad = (await jetrun(clistack, "run", "--async", "demo/fail:v1")).stdout.strip()
    async with client(clistack, "tok_acme") as c:
        await wait_state(c, bad, {"failed"})
        await wait_state(c, ok, {"completed"})
    listed = await jetrun(clistack, "runs", "ls", "--limit", "100")
    assert ok in listed.stdout and bad in listed.stdout
    failed = await jetrun(clistack, "runs", "ls", "--state", "failed", "--json", "--limit", "100")
    states = {json.loads(line)["state"] for line in failed.stdout.splitlines()}
    assert states == {"failed"} and bad in failed.stdout and ok not in failed.stdout
    rival = await jetrun(clistack, "runs", "get", ok, token="tok_rival")
    assert rival.returncode == 1 and "not found" in rival.stderr
    assert ok not in (await jetrun(clistack, "runs", "ls", token="tok_rival")).stdout
    logs = await jetrun(clistack, "logs", bad, token="tok_rival")
    assert logs.returncode == 1 and "not found" in logs.stderr


async def test_url_and_token_from_a_config_file(clistack: Stack, tmp_path: Path) -> None:
    config = tmp_path / "client.toml"
    config.write_text(f'url = "{clistack.url}"\ntoken = "tok_acme"\n')
    env = {"JETRUN_CLIENT_CONFIG": str(config), "JETRUN_URL": ""}
    done = await jetrun(clistack, "run", "demo/echo:v1", "cfg", token=None, **env)
    assert done.returncode == 0 and "cfg" in done.stdout, done.stderr
    flag = await jetrun(clistack, "runs", "ls", "--token", "nope", token=None, **env)
    assert flag.returncode == 1 and "unknown token" in flag.stderr
    none = await jetrun(clistack, "runs", "ls", token=None)
    assert none.returncode == 2 and "no API token" in none.stderr


async def test_cancel(clistack: Stack, tmp_path: Path) -> None:
    run_id = (
        await jetrun(clistack, "run", "--async", "test/gate:v1", str(tmp_path / "never"))
    ).stdout.strip()
    async with client(clistack, "tok_acme") as c:
        await wait_state(c, run_id, {"running"})
    done = await jetrun(clistack, "runs", "cancel", run_id)
    assert done.returncode == 0 and done.stdout.strip() == f"{run_id} cancelled"


def _within(seconds: float) -> float:
    """A deadline for one step (steps do not share one: the last would get what is left)."""
    return time.monotonic() + seconds


def _read_pty(fd: int, until: str, deadline: float, seen: list[str]) -> bool:
    while time.monotonic() < deadline:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            time.sleep(0.02)
            continue
        except OSError:
            return False
        seen.append(data.decode(errors="replace"))
        if re.search(until, "".join(seen)):
            return True
    return False


async def test_live_status_line_on_a_terminal(clistack: Stack, tmp_path: Path) -> None:
    """The gate agent has one slot: a second gate run queues behind the first, and the status
    line on a pseudo-terminal says so (state, position, what it waits for, elapsed)."""
    first, second = tmp_path / "first", tmp_path / "second"
    blocker = (await jetrun(clistack, "run", "--async", "test/gate:v1", str(first))).stdout
    async with client(clistack, "tok_acme") as c:
        await wait_state(c, blocker.strip(), {"running"})
    master, slave = os.openpty()
    os.set_blocking(master, False)
    argv = [sys.executable, "-m", "runtime.cli", "run", "test/gate:v1", str(second)]
    env = env_for(clistack, TERM="xterm", COLUMNS="120")
    proc = subprocess.Popen(argv, env=env, stdin=slave, stdout=slave, stderr=slave)  # noqa: ASYNC220
    os.close(slave)
    seen: list[str] = []
    try:
        queued = await anyio.to_thread.run_sync(
            _read_pty, master, "queued · position 0 · waiting for capacity", _within(30), seen
        )
        assert queued, "".join(seen)
        open_gate(first, "one")
        open_gate(second, "two")
        done = await anyio.to_thread.run_sync(_read_pty, master, "completed", _within(30), seen)
        assert done, "".join(seen)
        assert await anyio.to_thread.run_sync(proc.wait, 30) == 0
        await anyio.to_thread.run_sync(_read_pty, master, r"\btwo\b", _within(10), seen)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    screen = "".join(seen)
    elapsed = r"(\d+\.\ds|\d+m\d\ds)"
    assert re.search(r"queued · position 0 · waiting for capacity · " + elapsed, screen), screen
    assert "two" in screen  # then the outputs


async def test_watch_shows_a_live_table_of_the_teams_runs(clistack: Stack, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    run_id = (await jetrun(clistack, "run", "--async", "test/gate:v1", str(gate))).stdout.strip()
    master, slave = os.openpty()
    os.set_blocking(master, False)
    argv = [sys.executable, "-m", "runtime.cli", "runs", "watch", "--interval", "0.2"]
    env = env_for(clistack, TERM="xterm", COLUMNS="200")
    proc = subprocess.Popen(argv, env=env, stdin=slave, stdout=slave, stderr=slave)  # noqa: ASYNC220
    os.close(slave)
    seen: list[str] = []
    try:
        row = rf"{run_id}\s+test/gate:v1\s+"
        running = row + "running"
        assert await anyio.to_thread.run_sync(_read_pty, master, running, _within(30), seen)
        open_gate(gate, "open")  # the table follows the run to its end
        done = row + "completed"
        assert await anyio.to_thread.run_sync(_read_pty, master, done, _within(30), seen)
        proc.send_signal(2)
        assert await anyio.to_thread.run_sync(proc.wait, 10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
