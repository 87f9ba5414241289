"""Slow clients cannot take the gateway down (a real gateway process under a 1,024 file limit,
real slow-header connections on loopback), nor hold its shutdown; bounded everywhere."""

from __future__ import annotations

import resource
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from contracts.agents import PipelineInfo
from runtime.infra.catalog import Catalog
from runtime.infra.natsserver import free_port
from tests.harness import Proc, Stack, wait_ready

pytestmark = pytest.mark.anyio

FD_LIMIT = 1024
SLOW = 1100
HEADER_TIMEOUT_S = 3
# the gateway, exactly as `jetrun gateway` runs, with a 1,024 open-file limit
LIMITED = (
    "import resource, runpy, sys; "
    f"resource.setrlimit(resource.RLIMIT_NOFILE, ({FD_LIMIT}, {FD_LIMIT})); "
    "sys.argv = ['jetrun', *sys.argv[1:]]; "
    "runpy.run_module('runtime.cli', run_name='__main__')"
)


@pytest.fixture(scope="module")
async def gateway(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    tmp = tmp_path_factory.mktemp("limits")
    async with Stack(tmp) as stack:
        await stack.start_nats()
        config = stack.config_path.read_text()  # [settings] is the config's last table
        stack.config_path.write_text(config + f"http_header_timeout_s = {HEADER_TIMEOUT_S}\n")
        stack.start_scheduler()
        port = free_port()
        argv = [sys.executable, "-c", LIMITED, "gateway", *stack.nats_args("gateway")]
        argv += ["--config", str(stack.config_path), "--port", str(port)]
        stack.procs.append(Proc("gateway", argv, tmp / "gateway.log").start())
        url = f"http://127.0.0.1:{port}"
        await wait_ready(url)
        yield url


@pytest.fixture
def enough_files() -> Iterator[None]:
    """This test process holds 1,100 sockets: raise its own soft limit if it can."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = SLOW + 256
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip(f"open-file hard limit {hard} < {want}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def open_slow(url: str, n: int) -> list[socket.socket]:
    """``n`` connections that each send half a request head, then nothing."""
    port = int(url.rsplit(":", 1)[1])
    conns = []
    for _ in range(n):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        conns.append(sock)
    return conns


async def test_a_normal_request_succeeds_beside_1100_slow_header_connections(
    gateway: str, enough_files: None
) -> None:
    conns = await anyio.to_thread.run_sync(open_slow, gateway, SLOW)
    try:
        async with httpx.AsyncClient(timeout=5.0) as client:
            for _ in range(3):  # a fresh connection each time, while all 1,100 stay open
                response = await client.get(f"{gateway}/healthz", headers={"Connection": "close"})
                assert response.status_code == 200, response.text
                assert response.json()["status"] == "ok"
    finally:
        for sock in conns:
            sock.close()


async def test_a_connection_that_never_finishes_its_head_is_closed(gateway: str) -> None:
    [sock] = await anyio.to_thread.run_sync(open_slow, gateway, 1)
    with sock:
        sock.settimeout(HEADER_TIMEOUT_S + 10)
        started = time.monotonic()
        answer = await anyio.to_thread.run_sync(sock.recv, 1024)
        waited = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert waited < HEADER_TIMEOUT_S + 10


async def test_an_open_ndjson_stream_cannot_hold_shutdown(tmp_path: Path) -> None:
    async with Stack(tmp_path) as stack:
        await stack.start_nats()
        stack.start_scheduler()
        url = await stack.start_gateway()
        nc = await stack.connect()
        await Catalog(nc.jetstream()).register(PipelineInfo(pointer="test/ghost:v1"))
        await nc.close()
        gateway = next(p for p in stack.procs if p.name.startswith("gateway"))
        body = {"pipeline": "test/ghost:v1", "inputs": [], "wait_for_resources": True}
        headers = {"Authorization": "Bearer tok_big"}
        async with (
            httpx.AsyncClient(timeout=60.0) as client,
            client.stream("POST", f"{url}/v4/runs/stream", json=body, headers=headers) as stream,
        ):
            lines = stream.aiter_lines()
            first = await anext(lines)  # the run, queued: no replica will ever come
            assert '"state":"' in first
            gateway.signal(signal.SIGTERM)
            assert gateway.popen is not None
            code = await anyio.to_thread.run_sync(gateway.popen.wait, 30)
        assert code == 0, gateway.output()
