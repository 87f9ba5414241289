"""The child processes of ``jetrun up`` but its local agents (``runtime.up_agents``): the
agents the autoscaler adds (``LocalProvider``), the webhook deliverer; the NATS identity,
environment and command line of each child, how one is stopped (bounded), and the banner."""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from runtime.control.providers import LocalProvider
from runtime.infra.config import DEMO_TOKEN, Config
from runtime.infra.lifetime import child_env
from runtime.infra.nats_auth import Credentials, agent_role
from runtime.infra.natsserver import NatsServer
from runtime.up_ready import DEMO_POINTER, StartupError

if TYPE_CHECKING:
    from runtime.up import UpOptions

log = logging.getLogger("jetrun")

FENCED_EXIT = 3  # the agent was declared lost; it may come straight back


class AgentExited(Exception):
    """The local agent stopped on its own after startup."""


@contextlib.asynccontextmanager
async def _webhooks(opts: UpOptions, nats_url: str) -> AsyncIterator[None]:
    """The webhook deliverer (``jetrun webhooks``) as a child process while the body runs."""
    command = [sys.executable, "-m", "runtime.cli", "webhooks", "--nats", nats_url]
    if opts.config_path is not None:
        command += ["--config", opts.config_path]
    env = agent_env(nats_url, opts.credentials("webhooks"))
    proc = subprocess.Popen(command, env=env)  # noqa: ASYNC220 (returns at once)
    try:
        yield
    finally:
        await _stop_child(proc, opts.config.settings.shutdown_grace_s + 5.0)


async def agent_identity(
    opts: UpOptions, server: NatsServer | None, agent_id: str
) -> Credentials | None:
    """Agent ``agent_id``'s own NATS identity. The embedded server mints it and reloads; with
    ``--nats`` and ``--nats-credentials DIR`` it must have been minted ahead (``jetrun keys DIR
    --agent ID``, servers reloaded): raises ``StartupError`` if DIR has no seed for it."""
    if server is not None:
        return await anyio.to_thread.run_sync(server.add_agent, agent_id)
    credentials = opts.credentials(agent_role(agent_id))
    if credentials is None or credentials.seed_file is None:
        return credentials
    if not credentials.seed_file.is_file():
        raise StartupError(
            f"no seed for agent {agent_id} in {credentials.seed_file.parent}: mint it with "
            f"`jetrun keys {opts.credentials_dir} --agent {agent_id}` and reload the NATS servers"
        )
    return credentials


def _provider(opts: UpOptions, nats_url: str, server: NatsServer | None) -> LocalProvider:
    """More local agents when the autoscaler finds no room, each with its own identity; their
    logs in ``<data>/nodes``."""

    async def node_env(node_id: str) -> dict[str, str]:
        return agent_env(nats_url, await agent_identity(opts, server, node_id))

    return LocalProvider(
        nats_url,
        opts.modules,
        cpu_slots=opts.slots if opts.node_slots is None else opts.node_slots,
        cpu_queue=opts.queue_depth,
        boot_delay_s=opts.boot_delay_s,
        heartbeat_s=opts.config.settings.heartbeat_interval_s,
        node_env=node_env,
        log_dir=opts.data_dir / "nodes",
    )


async def _exited(proc: subprocess.Popen[bytes], stopping: anyio.Event) -> int | None:
    """The agent's exit code once it exits; None if this process is stopping first."""
    while not stopping.is_set():
        code = proc.poll()
        if code is not None:
            return code
        with anyio.move_on_after(0.2):
            await stopping.wait()
    return None


async def _stop_child(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM (the agent's preemption notice), SIGKILL after ``grace`` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        await anyio.to_thread.run_sync(proc.wait, grace)
    except subprocess.TimeoutExpired:
        log.warning("the local agent did not stop within %g s; killing it", grace)
        proc.kill()
        proc.wait()


def agent_env(nats_url: str, credentials: Credentials | None) -> dict[str, str]:
    """A child's environment (agent, extra gateway, webhook deliverer): where NATS is and its
    role's seed file path go here, not on its command line (which every local user can
    read)."""
    env = child_env()
    env["JETRUN_NATS"] = nats_url
    if credentials is not None and credentials.seed_file is not None:
        env["JETRUN_NATS_SEED"] = str(credentials.seed_file)
    if credentials is not None and credentials.ca_file is not None:
        env["JETRUN_NATS_CA"] = str(credentials.ca_file)
    return env


def recorder_command(nats_url: str, config_path: str | None) -> list[str]:
    command = [sys.executable, "-m", "runtime.cli", "recorder", "--nats", nats_url]
    return command + (["--config", config_path] if config_path is not None else [])


def agent_command(
    modules: list[str], slots: int, agent_id: str, queue_depth: int | None = None
) -> list[str]:
    command = [sys.executable, "-m", "runtime.cli", "agent"]
    command += ["--slots", str(slots), "--id", agent_id, "--health-port", "0"]
    if queue_depth is not None:
        command += ["--queue-depth", str(queue_depth)]
    for module in modules:
        command += ["--pipelines", module]
    return command


_INPUTS = '{"type":"string","value":"my_input_string"},{"type":"integer","value":5}'


def _banner(
    host: str, port: int, nats_url: str, data_dir: Path | None, config: Config, pointer: str
) -> None:
    url = f"http://{host}:{port}"
    token = DEMO_TOKEN if config.team_for_token(DEMO_TOKEN) else "<a token from your config>"
    where = (
        f"embedded nats-server at {nats_url}, data in {data_dir}, one nkey per role in "
        f"{data_dir / 'credentials'}"
        if data_dir
        else nats_url
    )
    inputs = _INPUTS if pointer == DEMO_POINTER else "...its inputs..."
    print(
        f"""jetrun is up: {url}
  NATS:  {where}
  token: {token}
  try:   curl -X POST '{url}/v4/runs' \\
           --header 'Authorization: Bearer {token}' \\
           --header 'Content-Type: application/json' \\
           --data '{{"pipeline": "{pointer}", "inputs": [{inputs}]}}'
Ctrl-C stops everything.""",
        flush=True,
    )
