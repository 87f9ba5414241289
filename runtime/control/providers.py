"""Node providers: how the autoscaler gets a node when no agent has room, and gives it back.

The interface (``NodeProvider``) is two calls, each idempotent per node id:

- ``await add(node_id, accelerator)``: start a node whose agent registers as ``node_id``
  (``jetrun agent --id <node_id>``). Returns once the request is made, not once the node is up:
  the autoscaler learns that from the agent's first heartbeat.
- ``await remove(node_id)``: stop that node (its agent gets SIGTERM, a preemption notice).

Shipped: ``LocalProvider`` (``jetrun agent`` processes on this machine, with an optional simulated
boot delay; what ``jetrun up`` and the tests use) and ``CommandProvider`` (operator commands,
e.g. a cloud CLI or ``kubectl``). Raising from either call is logged by the caller; the request
times out and is made again later.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

import anyio
import msgspec
from anyio.abc import Process

from contracts.agents import PipelineInfo
from runtime.infra.nats_auth import agent_role, seed_path

log = logging.getLogger("jetrun.providers")


class NodeProvider(Protocol):
    async def add(self, node_id: str, accelerator: str) -> None: ...

    async def remove(self, node_id: str) -> None: ...

    async def aclose(self) -> None:
        """Stop every node this provider started (a clean shutdown)."""
        ...


@dataclass
class LocalProvider:
    """Starts ``jetrun agent`` processes on this machine.

    ``boot_delay_s`` simulates a machine booting: the agent process starts that long after the
    request. Each agent gets ``cpu_slots`` slots (and a queue of ``cpu_queue`` dispatches
    waiting for one; None: the agent's default, ``QUEUE_PER_SLOT`` per slot) and serves
    ``modules``.
    ``node_env(node_id)``, if given, is the environment of that node's agent (its own NATS
    identity); else ``env``.
    """

    nats_url: str
    modules: Sequence[str]
    cpu_slots: int = 2
    cpu_queue: int | None = None
    boot_delay_s: float = 0.0
    heartbeat_s: float = 1.0
    extra_args: Sequence[str] = ()
    env: Mapping[str, str] | None = None
    node_env: Callable[[str], Awaitable[Mapping[str, str]]] | None = None
    log_dir: Path | None = None
    stop_timeout_s: float = 15.0
    procs: dict[str, Process] = field(default_factory=dict)
    _booting: set[str] = field(default_factory=set)
    _cancelled: set[str] = field(default_factory=set)
    _provides: frozenset[str] | None = None

    def command(self, node_id: str) -> list[str]:
        argv = [sys.executable, "-m", "runtime.cli", "agent", "--nats", self.nats_url]
        argv += ["--id", node_id, "--slots", str(self.cpu_slots)]
        if self.cpu_queue is not None:
            argv += ["--queue-depth", str(self.cpu_queue)]
        argv += ["--heartbeat", str(self.heartbeat_s), "--health-port", "0"]
        for module in self.modules:
            argv += ["--pipelines", module]
        return argv + list(self.extra_args)

    async def add(self, node_id: str, accelerator: str) -> None:
        """Idempotent: a node already starting or running is left alone. Returns after the
        boot delay, once the agent process is started."""
        if node_id in self.procs or node_id in self._booting:
            return
        self._booting.add(node_id)
        try:
            await anyio.sleep(self.boot_delay_s)
            if node_id in self._cancelled:
                return
            env = self.env if self.node_env is None else await self.node_env(node_id)
            out = self._log(node_id)
            try:
                self.procs[node_id] = await anyio.open_process(
                    self.command(node_id), stdout=out, stderr=subprocess.STDOUT, env=env
                )
            finally:
                if not isinstance(out, int):
                    out.close()  # the child has its own copy
            log.info("local provider started agent %s (%s)", node_id, accelerator)
        finally:
            self._booting.discard(node_id)
            self._cancelled.discard(node_id)

    def _log(self, node_id: str) -> int | BinaryIO:
        if self.log_dir is None:
            return subprocess.DEVNULL
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return (self.log_dir / f"{node_id}.log").open("ab")

    async def remove(self, node_id: str) -> None:
        """SIGTERM the agent (it drains and exits), SIGKILL after ``stop_timeout_s``.
        Idempotent; a node still booting is not started."""
        if node_id in self._booting:
            self._cancelled.add(node_id)
        proc = self.procs.pop(node_id, None)
        if proc is None:
            return
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            with anyio.move_on_after(self.stop_timeout_s):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        log.info("local provider stopped agent %s (exit %s)", node_id, proc.returncode)

    async def aclose(self) -> None:
        for node_id in list(self._booting):
            self._cancelled.add(node_id)
        for node_id in list(self.procs):
            await self.remove(node_id)

    async def provides(self) -> frozenset[str]:
        """The pipelines its agents serve. Pipeline code is never imported into this process
        (the control plane): a child with a minimal environment lists them, once."""
        if self._provides is None:
            try:
                infos = await list_pipelines(self.modules)
                self._provides = frozenset(info.pointer for info in infos)
            except Exception as err:  # its agents cannot load them either
                log.warning("local provider cannot list %s: %r", list(self.modules), err)
                self._provides = frozenset()
        return self._provides

    def running(self) -> list[str]:
        return sorted(n for n, p in self.procs.items() if p.returncode is None)


@dataclass
class CommandProvider:
    """Runs operator-given commands: ``add_command`` and ``remove_command`` are argument
    lists (or shell-like strings, split with ``shlex``) in which ``{node_id}`` and
    ``{accelerator}`` are replaced. No shell is involved: a placeholder is always one argument.

    Example (Kubernetes, one pod per node)::

        add:    kubectl run {node_id} --image=ghcr.io/acme/jetrun-agent \\
                  --restart=Never -- jetrun agent --id {node_id} --nats nats://nats:4222
        remove: kubectl delete pod {node_id} --wait=false
    """

    add_command: Sequence[str] | str
    remove_command: Sequence[str] | str
    timeout_s: float = 120.0
    added: set[str] = field(default_factory=set)

    def argv(self, template: Sequence[str] | str, node_id: str, accelerator: str) -> list[str]:
        parts = shlex.split(template) if isinstance(template, str) else list(template)
        return [
            p.replace("{node_id}", node_id).replace("{accelerator}", accelerator) for p in parts
        ]

    async def _call(self, argv: list[str]) -> None:
        with anyio.fail_after(self.timeout_s):
            result = await anyio.run_process(argv, check=False, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            output = result.stdout.decode(errors="replace")[-2000:]
            raise RuntimeError(f"{argv[0]} exited {result.returncode}: {output}")

    async def add(self, node_id: str, accelerator: str) -> None:
        """Raises ``RuntimeError`` when the command fails, ``TimeoutError`` past
        ``timeout_s``."""
        if node_id in self.added:
            return
        await self._call(self.argv(self.add_command, node_id, accelerator))
        self.added.add(node_id)

    async def remove(self, node_id: str) -> None:
        await self._call(self.argv(self.remove_command, node_id, ""))
        self.added.discard(node_id)

    async def aclose(self) -> None:
        """Nodes added by commands outlive this process; the operator's tooling owns them."""


def seed_env(
    credentials_dir: Path, base: Mapping[str, str]
) -> Callable[[str], Awaitable[dict[str, str]]]:
    """``node_env`` for agents whose seeds were minted ahead (``jetrun keys DIR --agent ID``):
    ``base`` plus ``JETRUN_NATS_SEED`` naming ``DIR/agents/<node_id>.nk``. Raises
    ``RuntimeError`` for a node with no seed there."""

    async def env(node_id: str) -> dict[str, str]:
        seed = seed_path(credentials_dir, agent_role(node_id))
        if not seed.is_file():
            raise RuntimeError(
                f"no seed for node {node_id} in {seed.parent}: mint it with `jetrun keys "
                f"{credentials_dir} --agent {node_id}` and reload the NATS servers"
            )
        return {**base, "JETRUN_NATS_SEED": str(seed)}

    return env


_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent.parent)


async def list_pipelines(modules: Sequence[str], timeout_s: float = 120.0) -> list[PipelineInfo]:
    """The catalogue entries the pipeline ``modules`` define, read by a child process with a
    minimal environment (pipeline code never runs in the caller). Raises ``RuntimeError`` with
    the child's output when a module does not load."""
    argv = [sys.executable, "-m", "runtime.control.providers", *modules]
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": _PACKAGE_ROOT}
    with anyio.fail_after(timeout_s):
        listed = await anyio.run_process(argv, env=env, check=False)
    if listed.returncode != 0:
        lines = listed.stderr.decode(errors="replace").strip().splitlines()
        raise RuntimeError(lines[-1] if lines else f"exit code {listed.returncode}")
    return msgspec.json.decode(listed.stdout, type=list[PipelineInfo])


if __name__ == "__main__":  # python -m runtime.control.providers MODULE...: their entries, as JSON
    from runtime.node.pipelines import load_module

    infos = [spec.info() for module in sys.argv[1:] for spec in load_module(module)]
    sys.stdout.buffer.write(msgspec.json.encode(infos))
