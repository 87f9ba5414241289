"""The extra gateway processes of ``jetrun up``: one Python event loop serves about one core, so
on a machine with many cores ``jetrun up`` runs gateway processes, every one on the same HTTP port
(``SO_REUSEPORT``: the kernel spreads new connections over them). Each is ``jetrun gateway
--reuse-port``, follows the event log into its own index and answers every run; it binds the
port only once it has caught up, so no connection reaches a gateway that is not ready. With
``--dedicated-gateways`` ``jetrun up``'s own gateway (in the scheduler's process, sharing its
index) serves no connection: that event loop, the one that cannot be spread over cores, is
left to the scheduler. One that exits is started again; all of them die with ``jetrun up``
(``PR_SET_PDEATHSIG``)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator

import anyio

from runtime.infra.lifetime import child_env

log = logging.getLogger("jetrun.up")

#: from this many usable cores ``jetrun up`` runs ``MANY_CORES_GATEWAYS`` dedicated gateways,
#: from ``MORE_CORES`` on ``MORE_CORES_GATEWAYS``; below it, its own gateway alone (measured on
#: 2 and 14 cores: docs/architecture.md, "Gateways on many cores")
MANY_CORES = 8
MANY_CORES_GATEWAYS = 2
MORE_CORES = 12
MORE_CORES_GATEWAYS = 3
RESTART_PAUSE_S = 1.0  # between a gateway's exit and its next start


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_gateways(cpus: int | None = None) -> tuple[int, bool]:
    """``(gateways, dedicated)`` for a machine with ``cpus`` cores (default: the cores this
    process may run on, so ``taskset`` and CPU sets count). Below ``MANY_CORES``: one, ``jetrun
    up``'s own. From ``MANY_CORES`` on: ``MANY_CORES_GATEWAYS`` gateway processes and none in
    ``jetrun up``, whose event loop is then the scheduler's alone; from ``MORE_CORES`` on,
    ``MORE_CORES_GATEWAYS``. Every gateway follows the whole log, so each one more costs CPU for
    every run whether or not it serves it: more pay only where the HTTP ingest is the ceiling."""
    cores = usable_cores() if cpus is None else cpus
    if (cores or 1) < MANY_CORES:
        return 1, False
    return (MORE_CORES_GATEWAYS if cores >= MORE_CORES else MANY_CORES_GATEWAYS), True


def gateway_layout(
    gateways: int | None, dedicated: bool | None, cpus: int | None = None
) -> tuple[int, bool]:
    """``(gateways, dedicated)`` from ``jetrun up``'s options (None: not given): a count given
    keeps ``jetrun up``'s own gateway unless ``dedicated`` says otherwise; neither given picks
    ``default_gateways``."""
    picked = default_gateways(cpus) if gateways is None else (gateways, False)
    return picked[0], picked[1] if dedicated is None else dedicated


def listening_socket(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    """A listening TCP socket on ``host:port``; with ``reuse_port`` other processes of this
    user may listen on the same port (Linux spreads connections over them). Raises OSError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


async def until_served(host: str, port: int, timeout: float) -> None:
    """Wait until something accepts TCP connections on ``host:port`` (a wildcard host is
    tried on loopback). Raises ``TimeoutError`` after ``timeout`` seconds."""
    target = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    with anyio.fail_after(timeout):
        while True:
            try:
                stream = await anyio.connect_tcp(target, port)
            except OSError:
                await anyio.sleep(0.1)
                continue
            await stream.aclose()
            return


def gateway_command(nats_url: str, host: str, port: int, config_path: str | None) -> list[str]:
    command = [sys.executable, "-m", "runtime.cli", "gateway", "--nats", nats_url]
    command += ["--host", host, "--port", str(port), "--reuse-port"]
    if config_path is not None:
        command += ["--config", config_path]
    return command


@contextlib.asynccontextmanager
async def extra_gateways(
    count: int,
    command: list[str],
    grace_s: float,
    env: dict[str, str] | None = None,
    what: str = "gateway",
) -> AsyncIterator[list[subprocess.Popen[bytes]]]:
    """``count`` ``what`` processes (gateways) running ``command``, kept running (restarted
    after an exit) while inside; stopped (SIGTERM, SIGKILL after ``grace_s``) on the way
    out."""
    env = env or child_env()
    procs = [_start(command, env) for _ in range(count)]
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_supervise, procs, command, env, what)
            yield procs
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            for proc in procs:
                if proc.poll() is None:
                    proc.terminate()
            for proc in procs:
                await _reap(proc, grace_s, what)


def _start(command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, env=env)


async def _supervise(
    procs: list[subprocess.Popen[bytes]], command: list[str], env: dict[str, str], what: str
) -> None:
    while True:
        await anyio.sleep(RESTART_PAUSE_S)
        for i, proc in enumerate(procs):
            code = proc.poll()
            if code is not None:
                log.error(
                    "%s process %d exited with code %d; starting it again", what, proc.pid, code
                )
                procs[i] = _start(command, env)


async def _reap(proc: subprocess.Popen[bytes], grace_s: float, what: str) -> None:
    try:
        await anyio.to_thread.run_sync(proc.wait, grace_s)
    except subprocess.TimeoutExpired:
        log.warning("%s process %d did not stop within %g s; killing it", what, proc.pid, grace_s)
        proc.kill()
        await anyio.to_thread.run_sync(proc.wait)


__all__ = [
    "default_gateways",
    "extra_gateways",
    "gateway_command",
    "gateway_layout",
    "listening_socket",
    "until_served",
]
