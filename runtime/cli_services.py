"""``jetrun up / gateway / scheduler / agent``: the commands that start the long-running
service processes."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import anyio
import click

from runtime.cli_auth import agent_identity, ca_option, credentials_for, seed_option
from runtime.cli_options import _config, config_option, nats_option, replicas_option
from runtime.infra.eventlog import LogSettings
from runtime.infra.gctune import tune_for_service

DEMO_MODULE = "runtime.node.demo"


def _first(group: BaseExceptionGroup[Exception]) -> BaseException:
    """The first leaf exception of a (nested) group."""
    found: BaseException = group
    while isinstance(found, BaseExceptionGroup):
        found = found.exceptions[0]
    return found


def _run(main: object, *args: object) -> None:
    tune_for_service()
    anyio.run(main, *args, backend="asyncio", backend_options={"use_uvloop": True})  # type: ignore[arg-type]


def _nats_args(seed: Path | None, ca: Path | None) -> list[str]:
    """Credential options for a ``jetrun`` process this one starts."""
    args = ["--nats-seed", str(seed)] if seed is not None else []
    return args + (["--nats-ca", str(ca)] if ca is not None else [])


def health_options(
    default_port: int | None,
    port_help: str = "Port of /metrics, /healthz and /readyz (0: any free port, logged).",
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    def wrap(command: Callable[..., None]) -> Callable[..., None]:
        command = click.option(
            "--health-port",
            default=default_port,
            show_default=default_port is not None,
            type=click.IntRange(0, 65535),
            help=port_help,
        )(command)
        return click.option(
            "--health-host", default="127.0.0.1", show_default=True, help="Its address."
        )(command)

    return wrap


def _sync_interval(value: str | None) -> str | None:
    from runtime.infra.natsserver import SYNC_VALUE

    if value is not None and not SYNC_VALUE.match(value):
        raise click.BadParameter("expected always or a duration such as 500ms, 1s, 2m")
    return value


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int, help="HTTP port.")
@click.option(
    "--data-dir", default="./jetrun-data", show_default=True, type=click.Path(path_type=Path)
)
@config_option
@click.option("--nats", "nats_url", default=None, help="Use this NATS instead of an embedded one.")
@click.option(
    "--nats-port", default=0, type=int, help="Port of the embedded nats-server (0: free)."
)
@click.option(
    "--nats-sync",
    default=None,
    metavar="INTERVAL|always",
    callback=lambda _ctx, _param, value: _sync_interval(value),
    help="How often the embedded nats-server syncs its store to disk: a duration such as 1s, "
    "or always (fsync on every write). Default: nats-server's own (every 2 minutes).",
)
@click.option(
    "--nats-monitor-port",
    default=None,
    type=click.IntRange(1, 65535),
    help="Serve the embedded nats-server's monitoring endpoints (/varz, /connz) on this "
    "loopback port. Default: off.",
)
@click.option(
    "--pipelines",
    "modules",
    multiple=True,
    default=[DEMO_MODULE],
    show_default=True,
    help="Pipeline module (dotted name or .py path) for the local agent; repeatable.",
)
@click.option(
    "--slots", default=4, show_default=True, type=int, help="CPU slots of each local agent."
)
@click.option(
    "--agents",
    default=None,
    type=click.IntRange(1, 64),
    help="Local agent processes, each with its own id and --slots CPU slots (default: 1 below "
    "8 cores; from 8 cores one per 7 cores, at most 4).",
)
@click.option(
    "--queue-depth",
    default=None,
    type=click.IntRange(0),
    help="CPU dispatches each agent (the local one and those the autoscaler adds) holds "
    "waiting for a busy slot (short runs only, within the scheduler's agent_queue_wait_s; "
    "default: 16 per CPU slot; 0: none).",
)
@click.option(
    "--gateways",
    default=None,
    type=click.IntRange(1, 64),
    help="Gateway processes sharing the HTTP port (default: 1 below 8 cores; 2 dedicated ones "
    "from 8 cores, 3 from 12).",
)
@click.option(
    "--dedicated-gateways/--shared-gateway",
    default=None,
    help="With --gateways N > 1: all N are gateway processes and this one (the scheduler's "
    "event loop) serves no connection; its /metrics (the scheduler's phase histograms and "
    "node losses) is then on --health-port (default: dedicated only where --gateways is not "
    "given and 8 or more cores pick 2).",
)
@health_options(
    None,
    "Port of this process's /metrics (the scheduler's too), /healthz and /readyz, no token "
    "asked (default: none while it serves the HTTP port, which has them; with dedicated "
    "gateways, any free port, logged).",
)
@click.option(
    "--boot-delay",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0),
    help="Seconds an agent the autoscaler adds takes to 'boot' (simulates a machine).",
)
@click.option(
    "--node-slots",
    default=None,
    type=int,
    help="CPU slots of each agent the autoscaler adds (default: --slots).",
)
@click.option(
    "--nats-credentials",
    "credentials_dir",
    default=None,
    type=click.Path(file_okay=False, path_type=Path),
    help="With --nats: a directory of role seeds (jetrun keys); the embedded server makes its own.",
)
def up(
    host: str,
    port: int,
    data_dir: Path,
    config_path: str | None,
    nats_url: str | None,
    nats_port: int,
    nats_sync: str | None,
    nats_monitor_port: int | None,
    modules: tuple[str, ...],
    slots: int,
    agents: int | None,
    queue_depth: int | None,
    gateways: int | None,
    dedicated_gateways: bool | None,
    health_port: int | None,
    health_host: str,
    boot_delay: float,
    node_slots: int | None,
    credentials_dir: Path | None,
) -> None:
    """Start everything: nats-server, gateway, scheduler and local agents; more local agents
    are started (and stopped) as the autoscaler needs room."""
    from runtime.control.gateway_pool import gateway_layout
    from runtime.up import UpOptions, serve_up
    from runtime.up_agents import default_agents
    from runtime.up_children import AgentExited
    from runtime.up_ready import StartupError

    gateways, dedicated_gateways = gateway_layout(gateways, dedicated_gateways)
    options = UpOptions(
        data_dir=data_dir.resolve(),
        config=_config(config_path),
        host=host,
        port=port,
        nats_url=nats_url,
        nats_port=nats_port,
        nats_sync=nats_sync,
        nats_monitor_port=nats_monitor_port,
        modules=list(modules),
        slots=slots,
        agents=default_agents() if agents is None else agents,
        queue_depth=queue_depth,
        boot_delay_s=boot_delay,
        node_slots=slots if node_slots is None else node_slots,
        gateways=gateways,
        dedicated_gateways=dedicated_gateways,
        health_port=health_port,
        health_host=health_host,
        config_path=None if config_path is None else str(Path(config_path).resolve()),
        credentials_dir=credentials_dir,
    )
    try:
        _run(serve_up, options)
    except* (StartupError, AgentExited) as group:
        click.echo(f"jetrun: {_first(group)}", err=True)
        raise SystemExit(1) from None


@click.command()
@nats_option
@seed_option
@ca_option
@config_option
@replicas_option
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int)
@click.option(
    "--reuse-port",
    is_flag=True,
    help="Share the port with other gateways (SO_REUSEPORT); listen only once caught up.",
)
def gateway(
    nats_url: str,
    nats_seed: Path | None,
    nats_ca: Path | None,
    config_path: str | None,
    replicas: int,
    host: str,
    port: int,
    reuse_port: bool,
) -> None:
    """Serve the v4 HTTP API (NATS role: gateway)."""
    from runtime.infra.lifetime import honour_parent
    from runtime.services import serve_gateway

    honour_parent()  # started by `jetrun up`: die with it
    credentials = credentials_for("gateway", nats_seed, nats_ca)
    settings = LogSettings(replicas=replicas)
    config = _config(config_path)
    serve = partial(serve_gateway, credentials=credentials)
    _run(serve, nats_url, config, host, port, settings, reuse_port)


@click.command()
@nats_option
@seed_option
@ca_option
@config_option
@replicas_option
@click.option(
    "--provider",
    type=click.Choice(["none", "local", "command"]),
    default="none",
    show_default=True,
    help="How the autoscaler adds nodes when no agent has room.",
)
@click.option(
    "--node-pipelines",
    multiple=True,
    default=[DEMO_MODULE],
    show_default=True,
    help="local: pipeline modules of the agents it starts; repeatable.",
)
@click.option(
    "--node-slots",
    default=2,
    show_default=True,
    type=int,
    help="local: CPU slots of the agents it starts.",
)
@click.option(
    "--node-queue-depth",
    default=None,
    type=click.IntRange(0),
    help="local: CPU dispatches each agent it starts holds waiting for a busy slot "
    "(default: 16 per --node-slots slot).",
)
@click.option(
    "--boot-delay",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0),
    help="local: simulated boot time of a node, seconds.",
)
@click.option(
    "--add-command",
    default=None,
    help="command: run to add a node; {node_id} and {accelerator} are replaced.",
)
@click.option(
    "--remove-command", default=None, help="command: run to remove a node; {node_id} is replaced."
)
@click.option(
    "--node-credentials",
    "node_credentials",
    default=None,
    type=click.Path(file_okay=False, path_type=Path),
    help="local: where each agent it starts finds its own seed (agents/<node_id>.nk, minted "
    "with jetrun keys DIR --agent node-1 ...).",
)
@health_options(8081)
def scheduler(
    nats_url: str,
    nats_seed: Path | None,
    nats_ca: Path | None,
    config_path: str | None,
    replicas: int,
    health_host: str,
    health_port: int,
    provider: str,
    node_pipelines: tuple[str, ...],
    node_slots: int,
    node_queue_depth: int | None,
    boot_delay: float,
    add_command: str | None,
    remove_command: str | None,
    node_credentials: Path | None,
) -> None:
    """Place, queue, dispatch, cancel and preempt runs; scale replicas and nodes
    (NATS role: scheduler)."""
    from runtime.control.providers import CommandProvider, LocalProvider, NodeProvider, seed_env
    from runtime.services import serve_scheduler

    chosen: NodeProvider | None = None
    if provider == "local":
        from runtime.infra.lifetime import child_env

        chosen = LocalProvider(  # its agents die with this process, even on SIGKILL
            nats_url,
            list(node_pipelines),
            cpu_slots=node_slots,
            cpu_queue=node_queue_depth,
            boot_delay_s=boot_delay,
            env=child_env(),
            node_env=seed_env(node_credentials, child_env()) if node_credentials else None,
            extra_args=[*_nats_args(None, nats_ca)],
        )
    elif provider == "command":
        if not add_command or not remove_command:
            raise click.BadParameter(
                "needs --add-command and --remove-command", param_hint="--provider"
            )
        chosen = CommandProvider(add_command, remove_command)
    settings = LogSettings(replicas=replicas)
    health = (health_host, health_port)
    credentials = credentials_for("scheduler", nats_seed, nats_ca)
    serve = partial(serve_scheduler, health=health, credentials=credentials)
    _run(partial(serve, nats_url, _config(config_path), settings, chosen))


@click.command()
@nats_option
@seed_option
@ca_option
@config_option
@replicas_option
def recorder(
    nats_url: str,
    nats_seed: Path | None,
    nats_ca: Path | None,
    config_path: str | None,
    replicas: int,
) -> None:
    """Store run views, the run history and the checkpoint for a scheduler that does not
    (what `jetrun up` runs beside its scheduler with dedicated gateways). (NATS role:
    scheduler.)"""
    from runtime.infra.lifetime import honour_parent
    from runtime.services import serve_recorder

    honour_parent()  # started by `jetrun up`: die with it
    credentials = credentials_for("scheduler", nats_seed, nats_ca)
    serve = partial(serve_recorder, credentials=credentials)
    _run(serve, nats_url, _config(config_path), LogSettings(replicas=replicas))


@click.command()
@nats_option
@seed_option
@ca_option
@replicas_option
@click.option(
    "--pipelines",
    "modules",
    multiple=True,
    default=[DEMO_MODULE],
    show_default=True,
    help="Pipeline module (dotted name or .py path); repeatable.",
)
@click.option("--slots", default=2, show_default=True, type=int, help="CPU slots.")
@click.option(
    "--queue-depth",
    default=None,
    type=click.IntRange(0),
    help="CPU dispatches the agent holds waiting for a busy slot, so the next run is "
    "there when a slot frees (used only for pipelines whose runs are short, within the "
    "scheduler's agent_queue_wait_s; default: 16 per slot; 0: none).",
)
@click.option(
    "--heartbeat", default=1.0, show_default=True, type=float, help="Seconds between heartbeats."
)
@click.option(
    "--id",
    "agent_id",
    default=None,
    help="Agent id (default: the one its seed was minted for, else host name + random).",
)
@click.option(
    "--log-max-bytes",
    default=1_048_576,
    show_default=True,
    type=click.IntRange(1024),
    help="What one attempt may print that is kept with its run (then it is truncated).",
)
@health_options(8082)
def agent(
    nats_url: str,
    nats_seed: Path | None,
    nats_ca: Path | None,
    replicas: int,
    modules: tuple[str, ...],
    slots: int,
    queue_depth: int | None,
    heartbeat: float,
    agent_id: str | None,
    log_max_bytes: int,
    health_host: str,
    health_port: int,
) -> None:
    """Run a node agent: load pipelines, run attempts. SIGTERM = preemption notice.
    (NATS role: agent.)"""
    from runtime.infra.lifetime import honour_parent
    from runtime.infra.nats_auth import agent_role
    from runtime.services import serve_agent

    honour_parent()  # started by `jetrun up`: die with it
    agent_id = agent_identity(agent_id, nats_seed)
    try:
        role = agent_role(agent_id)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--id") from None
    credentials = credentials_for(role, nats_seed, nats_ca)
    serve = partial(
        serve_agent,
        health=(health_host, health_port),
        log_max_bytes=log_max_bytes,
        credentials=credentials,
        queue_depth=queue_depth,
    )
    _run(serve, nats_url, list(modules), slots, heartbeat, agent_id, LogSettings(replicas=replicas))


def register(main: click.Group) -> None:
    for command in (up, gateway, scheduler, recorder, agent):
        main.add_command(command)
