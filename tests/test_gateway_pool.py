"""``jetrun up`` uses the cores it has: several gateway processes share the HTTP port
(SO_REUSEPORT), each listening only once caught up, restarted when one dies."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from dataclasses import replace
from pathlib import Path

import anyio
import httpx
import pytest

from runtime.control.gateway_pool import (
    MANY_CORES,
    MANY_CORES_GATEWAYS,
    MORE_CORES,
    MORE_CORES_GATEWAYS,
    default_gateways,
    gateway_layout,
    listening_socket,
    until_served,
    usable_cores,
)
from runtime.control.views import RunViews
from runtime.infra.config import Config
from runtime.infra.nats_auth import Credentials
from runtime.infra.nats_conn import close, connect
from runtime.infra.natsserver import free_port
from runtime.up import UpOptions, health_address
from tests.harness import Proc
from tests.test_up import SEED, children, up, wait_output

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc"),
]


def test_ups_own_gateway_below_many_cores_then_two_dedicated_ones_then_three() -> None:
    assert [default_gateways(n) for n in (1, 2, 4, MANY_CORES - 1)] == [(1, False)] * 4
    assert (MANY_CORES_GATEWAYS, MORE_CORES_GATEWAYS) == (2, 3)
    for cores in (MANY_CORES, MORE_CORES - 1):
        assert default_gateways(cores) == (2, True)
    for cores in (MORE_CORES, 14, 16, 256):
        assert default_gateways(cores) == (3, True)
    assert default_gateways() == default_gateways(usable_cores())
    assert usable_cores() == len(os.sched_getaffinity(0))  # taskset and CPU sets count
    assert default_gateways() == default_gateways(os.cpu_count())


def test_up_serves_its_health_port_where_asked_or_where_it_serves_no_http() -> None:
    opts = UpOptions(
        data_dir=Path("/nonexistent"),
        config=Config(tiers={}, teams={}),
        host="127.0.0.1",
        port=8080,
        nats_url=None,
        nats_port=0,
        modules=[],
        slots=1,
    )
    assert health_address(opts) is None  # its HTTP port has /metrics
    assert health_address(replace(opts, gateways=2)) is None  # shared: still serves HTTP
    dedicated = replace(opts, gateways=2, dedicated_gateways=True)
    assert health_address(dedicated) == ("127.0.0.1", 0)
    assert health_address(replace(opts, health_port=9101)) == ("127.0.0.1", 9101)
    assert health_address(replace(dedicated, health_port=9101, health_host="::1")) == ("::1", 9101)


def test_a_gateway_count_given_keeps_ups_own_gateway_unless_told_otherwise() -> None:
    assert gateway_layout(None, None, cpus=2) == (1, False)
    assert gateway_layout(None, None, cpus=8) == (2, True)
    assert gateway_layout(None, None, cpus=16) == (3, True)
    assert gateway_layout(None, False, cpus=16) == (3, False)
    assert gateway_layout(3, None, cpus=16) == (3, False)
    assert gateway_layout(3, True, cpus=2) == (3, True)
    assert gateway_layout(1, None, cpus=16) == (1, False)


def listening_on(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds a TCP socket listening on ``port`` (from /proc); a process
    that exits while it is looked at (a gateway just killed) listens on nothing."""
    try:
        return _listening_on(pid, port)
    except FileNotFoundError:  # its /proc entry went away meanwhile
        return False


def _listening_on(pid: int, port: int) -> bool:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port and inode in inodes:
                return True
    return False


def gateways_of(pid: int) -> list[int]:
    found = []
    for child in children(pid):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            if b"gateway" in argv and b"--reuse-port" in argv:
                found.append(child)
    return found


def stop_with_children(proc: Proc) -> None:
    """Stops ``jetrun up`` and SIGKILLs what it had started, should any outlive it."""
    family = list(children(proc.pid))
    proc.stop()
    for pid in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def listening_gateways(pid: int, port: int, count: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [g for g in gateways_of(pid) if listening_on(g, port)]
        if len(found) == count:
            return found
        await anyio.sleep(0.2)
    raise TimeoutError(f"not {count} extra gateways listening on {port}: {gateways_of(pid)}")


async def test_extra_gateways_share_the_port_and_one_that_dies_is_replaced(
    tmp_path: Path,
) -> None:
    port = free_port()
    proc = up(tmp_path, port, "up", "--gateways", "3")
    headers = {"Authorization": "Bearer jr_demo_token"}
    try:
        await wait_output(proc, "Ctrl-C stops everything.")
        assert listening_on(proc.pid, port)
        first = await listening_gateways(proc.pid, port, 2, timeout=30)

        async def sync_run() -> None:  # a new connection each: spread over the gateways
            async with httpx.AsyncClient(headers=headers, timeout=30) as c:
                r = await c.post(f"http://127.0.0.1:{port}/v4/runs", json=SEED)
                assert r.status_code == 200 and r.json()["state"] == "completed", r.text

        with anyio.fail_after(60):
            for _ in range(3):  # the demo team may have 12 runs at once
                async with anyio.create_task_group() as tg:
                    for _ in range(8):
                        tg.start_soon(sync_run)

        os.kill(first[0], signal.SIGKILL)
        with anyio.fail_after(10):  # the signal is sent; the process is gone a moment later
            while listening_on(first[0], port):
                await anyio.sleep(0.05)
        again = await listening_gateways(proc.pid, port, 2, timeout=30)
        assert first[0] not in again and first[1] in again
        with anyio.fail_after(60):
            for _ in range(6):
                await sync_run()
    finally:
        stop_with_children(proc)


async def test_dedicated_gateways_leave_up_serving_no_connection(tmp_path: Path) -> None:
    """``--dedicated-gateways``: the gateway processes serve the port and ``jetrun up`` (the
    scheduler's event loop) none; the banner comes once one of them accepts connections, and
    runs go through them end to end."""
    port = free_port()
    proc = up(tmp_path, port, "up", "--gateways", "2", "--dedicated-gateways")
    headers = {"Authorization": "Bearer jr_demo_token"}
    try:
        await wait_output(proc, "Ctrl-C stops everything.")
        assert not listening_on(proc.pid, port)
        await listening_gateways(proc.pid, port, 2, timeout=30)
        with anyio.fail_after(60):
            for _ in range(4):  # a new connection each: spread over the gateways
                async with httpx.AsyncClient(headers=headers, timeout=30) as c:
                    r = await c.post(f"http://127.0.0.1:{port}/v4/runs", json=SEED)
                    assert r.status_code == 200 and r.json()["state"] == "completed", r.text
                    got = await c.get(f"http://127.0.0.1:{port}/v4/runs/{r.json()['id']}")
                    assert got.status_code == 200 and got.json()["state"] == "completed"
        # the scheduler's metrics and health are on a port of their own (any free one, logged)
        found = re.search(r"metrics and health on (http://127\.0\.0\.1:\d+)", proc.output())
        assert found is not None, proc.output()
        async with httpx.AsyncClient(base_url=found.group(1), timeout=30) as health:
            assert (await health.get("/readyz")).status_code == 200
            metrics = (await health.get("/metrics")).text
            assert 'jetrun_run_phase_seconds_count{phase="execution"' in metrics
            assert "jetrun_nodes_lost_total" in metrics
            with anyio.fail_after(30):  # the recorder child stores the checkpoint: its age shows
                while "jetrun_checkpoint_age_seconds NaN" in metrics:
                    await anyio.sleep(0.2)
                    metrics = (await health.get("/metrics")).text
            assert "jetrun_checkpoint_age_seconds " in metrics
    finally:
        stop_with_children(proc)


async def test_until_served_waits_for_a_listener_and_is_bounded() -> None:
    port = free_port()
    with pytest.raises(TimeoutError):
        await until_served("127.0.0.1", port, 0.3)  # nothing listens: bounded
    sock = listening_socket("127.0.0.1", port, reuse_port=True)
    try:
        await until_served("0.0.0.0", port, 5.0)  # a wildcard host is tried on loopback
    finally:
        sock.close()


def recorders_of(pid: int) -> list[int]:
    found = []
    for child in children(pid):
        with contextlib.suppress(OSError):
            if b"recorder" in Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0"):
                found.append(child)
    return found


async def views_stored(views: RunViews, run_ids: list[str], timeout: float) -> None:
    with anyio.fail_after(timeout):
        for run_id in run_ids:
            while (view := await views.get(run_id)) is None:
                await anyio.sleep(0.1)
            assert view.state.is_terminal


async def test_dedicated_up_stores_views_in_a_recorder_started_again_after_a_kill(
    tmp_path: Path,
) -> None:
    """With dedicated gateways the scheduler keeps no views: a recorder child process stores
    each ended run's view and the checkpoint. SIGKILLed, it is started again, and the views
    of the runs that ended meanwhile are stored (its tail starts from the checkpoint)."""
    port, nats_port = free_port(), free_port()
    args = ["--gateways", "2", "--dedicated-gateways", "--nats-port", str(nats_port)]
    proc = up(tmp_path, port, "up", *args)
    headers = {"Authorization": "Bearer jr_demo_token"}
    nc = None

    async def sync_run() -> str:
        async with httpx.AsyncClient(headers=headers, timeout=30) as c:
            r = await c.post(f"http://127.0.0.1:{port}/v4/runs", json=SEED)
            assert r.status_code == 200 and r.json()["state"] == "completed", r.text
            return str(r.json()["id"])

    try:
        await wait_output(proc, "Ctrl-C stops everything.")
        admin = Credentials.from_dir(tmp_path / "data" / "credentials", "admin")
        nc = await connect(f"nats://127.0.0.1:{nats_port}", "test", admin)
        views = RunViews(nc.jetstream())
        await views.require()
        first = recorders_of(proc.pid)
        assert len(first) == 1
        with anyio.fail_after(60):
            before = [await sync_run() for _ in range(2)]
        await views_stored(views, before, timeout=30)
        os.kill(first[0], signal.SIGKILL)
        with anyio.fail_after(60):
            meanwhile = [await sync_run() for _ in range(2)]
        with anyio.fail_after(30):
            while not (again := recorders_of(proc.pid)) or again == first:
                await anyio.sleep(0.1)
        await views_stored(views, meanwhile, timeout=30)
        with anyio.fail_after(30):  # every 5 s by default
            while await views.checkpoint() is None:
                await anyio.sleep(0.2)
    finally:
        if nc is not None:
            await close(nc)
        stop_with_children(proc)
