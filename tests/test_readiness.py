"""/readyz means a run can flow: real processes, real faults (a killed scheduler, a deleted
event-log stream, a full store disk)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from nats.aio.client import Client

from runtime.control.readiness import Readiness, SchedulerWatch
from runtime.infra.natsserver import free_port
from runtime.infra.streams import EVENTS_STREAM
from tests.harness import Proc, Stack

pytestmark = pytest.mark.anyio

ALL_CHECKS = {
    "nats_connected",
    "event_log_replayed",
    "event_log_stream",
    "store_writable",
    "scheduler_alive",
}


async def wait_readyz(url: str, want: int, timeout: float = 20.0) -> dict[str, bool]:
    """Poll /readyz until it answers ``want``; its checks then."""
    deadline = time.monotonic() + timeout
    body: dict[str, bool] = {}
    async with httpx.AsyncClient(timeout=5.0) as client:
        while time.monotonic() < deadline:
            response = await client.get(f"{url}/readyz")
            body = response.json()["checks"]
            if response.status_code == want:
                return body
            await anyio.sleep(0.1)
    raise TimeoutError(f"/readyz did not answer {want} within {timeout} s: {body}")


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with Stack(tmp_path / "stack", node_loss_timeout_s=2.0) as stack:
        stack.tmp.mkdir()
        await stack.start_nats()
        stack.start_scheduler()
        await stack.start_gateway()
        yield stack


async def test_ready_needs_a_live_scheduler(stack: Stack) -> None:
    checks = await wait_readyz(stack.url, 200)
    assert set(checks) == ALL_CHECKS and all(checks.values())
    scheduler = next(p for p in stack.procs if p.name == "scheduler")
    scheduler.kill()
    stack.procs.remove(scheduler)
    checks = await wait_readyz(stack.url, 503)
    assert checks == {**dict.fromkeys(ALL_CHECKS, True), "scheduler_alive": False}
    stack.start_scheduler()
    await wait_readyz(stack.url, 200)


async def test_ready_needs_the_event_log_stream(stack: Stack) -> None:
    await wait_readyz(stack.url, 200)
    nc = await stack.connect()
    try:
        await nc.jetstream().delete_stream(EVENTS_STREAM)
    finally:
        await nc.close()
    checks = await wait_readyz(stack.url, 503)
    assert checks["event_log_stream"] is False


@contextlib.contextmanager
def small_disk(path: Path, size: str = "24m") -> Iterator[Path]:
    """A tmpfs mounted at ``path``; skips the test where mounting is not allowed."""
    path.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path) -> None:
    """Write zeros to ``path`` until the disk is full."""
    with open(path, "wb") as out, contextlib.suppress(OSError):
        while True:
            out.write(b"\0" * (1 << 20))


async def test_ready_needs_a_writable_store_and_recovers_after_space_is_freed(
    tmp_path: Path,
) -> None:
    with small_disk(tmp_path / "disk") as disk:
        async with Stack(disk / "stack") as stack:
            stack.tmp.mkdir()
            await stack.start_nats()
            stack.start_scheduler()
            await stack.start_gateway()
            await wait_readyz(stack.url, 200)
            filler = disk / "filler"
            await anyio.to_thread.run_sync(fill, filler)
            checks = await wait_readyz(stack.url, 503)
            assert checks["store_writable"] is False
            filler.unlink()
            # nats-server keeps a stream that met a write error failing until it restarts;
            # the gateway recovers by itself once its server takes writes again
            assert stack.nats is not None
            await stack.nats.stop()
            await stack.start_nats()
            checks = await wait_readyz(stack.url, 200, timeout=30)
            assert all(checks.values())


async def test_jetrun_up_takes_writes_again_once_its_disk_has_room(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", size="48m") as disk:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        argv = [sys.executable, "-m", "runtime.cli", "up", "--port", str(port)]
        argv += ["--data-dir", str(disk / "data"), "--slots", "1"]
        up = Proc("up", argv, tmp_path / "up.log").start()
        try:
            deadline = time.monotonic() + 60
            while "Ctrl-C stops everything." not in up.output():
                assert time.monotonic() < deadline, up.output()
                await anyio.sleep(0.1)
            await anyio.to_thread.run_sync(fill, disk / "filler")
            checks = await wait_readyz(url, 503)
            assert checks["store_writable"] is False
            (disk / "filler").unlink()
            checks = await wait_readyz(url, 200, timeout=30)  # nothing restarted by hand
            headers = {"Authorization": "Bearer jr_demo_token"}
            body = {"pipeline": "demo/echo:v1", "inputs": [{"type": "string", "value": "ok"}]}
            async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as c:
                run = (await c.post("/v4/runs", json=body)).json()
            assert run["state"] == "completed", run
        finally:
            up.signal(signal.SIGINT)
            assert up.popen is not None
            try:
                up.popen.wait(30)
            finally:
                up.kill()


async def test_jetrun_up_on_a_full_disk_says_so_in_one_line(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", size="4m") as disk:
        await anyio.to_thread.run_sync(fill, disk / "filler")
        argv = [sys.executable, "-m", "runtime.cli", "up", "--port", str(free_port())]
        argv += ["--data-dir", str(disk / "data")]
        up = Proc("up", argv, tmp_path / "up.log").start()
        assert up.popen is not None
        code = await anyio.to_thread.run_sync(up.popen.wait, 30)
        lines = up.output().strip().splitlines()
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith("jetrun: ") and "No space left on device" in lines[0]


async def test_a_caught_up_process_reads_ready_on_the_next_probe(nc: Client) -> None:
    """The NATS checks are cached for a second; the process's own flags are not: a gateway
    that has just caught up is not held at 503 by an answer cached a moment before."""
    replayed = False
    watch = SchedulerWatch(time.monotonic, timeout_s=60.0)
    watch._heard_at = time.monotonic()  # a scheduler was heard just now
    readiness = Readiness(nc, nc.jetstream(), watch, replayed=lambda: replayed)
    assert (await readiness.checks())["event_log_replayed"] is False
    replayed = True
    checks = await readiness.checks()  # within the cache's second
    assert checks == dict.fromkeys(ALL_CHECKS, True)
