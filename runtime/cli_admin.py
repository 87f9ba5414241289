"""The operator's commands: ``jetrun setup / recall / keys / certs / state-diagram`` and
``jetrun admin`` (streams, NATS credentials and certificates, a node recall)."""

from __future__ import annotations

from pathlib import Path

import anyio
import click

from runtime.cli_auth import ca_option, credentials_for, seed_option
from runtime.cli_options import _config, config_option, nats_option, replicas_option
from runtime.infra.eventlog import LogSettings


@click.command()
@nats_option
@seed_option
@ca_option
@config_option
@replicas_option
def setup(
    nats_url: str,
    nats_seed: Path | None,
    nats_ca: Path | None,
    config_path: str | None,
    replicas: int,
) -> None:
    """Create or update every stream (NATS role: admin). Run before the services start."""
    from runtime.services import setup_streams

    credentials = credentials_for("admin", nats_seed, nats_ca)
    settings = LogSettings(replicas=replicas)
    names = anyio.run(setup_streams, nats_url, _config(config_path), settings, credentials)
    click.echo("streams ready: " + ", ".join(names))


@click.command()
@nats_option
@seed_option
@ca_option
@click.argument("agent_id")
@click.option("--timeout", default=5.0, show_default=True, type=float)
def recall(
    nats_url: str, nats_seed: Path | None, nats_ca: Path | None, agent_id: str, timeout: float
) -> None:
    """Recall a node now (a spot recall): its runs are preempted or requeued, it exits.
    (NATS role: admin.)"""
    from nats.errors import NoRespondersError, TimeoutError

    from runtime.services import recall_agent

    try:
        credentials = credentials_for("admin", nats_seed, nats_ca)
        answer = anyio.run(recall_agent, nats_url, agent_id, timeout, credentials)
    except (NoRespondersError, TimeoutError):
        raise click.ClickException(f"no agent {agent_id} answered") from None
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    click.echo(answer)


@click.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--agent",
    "agents",
    multiple=True,
    help="Also mint a seed of its own for this node agent id (agents/ID.nk); repeatable.",
)
def keys(directory: Path, agents: tuple[str, ...]) -> None:
    """Write one nkey seed per NATS role to DIRECTORY (owner-only files; existing seeds are
    kept), one per --agent in DIRECTORY/agents, and auth.conf, the nats-server authorization
    block with their public keys and permissions. Reload the servers after adding an agent
    (nats-server --signal reload)."""
    from runtime.infra.nats_auth import authorization_block, generate_keys, mint_agent, seed_path

    try:
        for agent_id in agents:
            mint_agent(directory, agent_id)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--agent") from None
    public = generate_keys(directory)
    (directory / "auth.conf").write_text(authorization_block(public))
    for role, found in public.items():
        click.echo(f"{role}: {seed_path(directory, role)} ({found[0]})")
    click.echo(
        f"nats-server: put {directory / 'auth.conf'} beside its config and add "
        '`include "auth.conf"` (includes are read relative to the config file); after '
        "adding an agent, reload it: nats-server --signal reload"
    )


@click.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--host",
    "hosts",
    multiple=True,
    required=True,
    help="A DNS name or IP address the NATS servers are reached by; repeatable.",
)
def certs(directory: Path, hosts: tuple[str, ...]) -> None:
    """Write a CA (kept if DIRECTORY has one) and a certificate for the NATS servers, valid
    for every --host, for TLS on client and route connections. Clients need ca.pem."""
    from runtime.infra.certs import create

    files = create(directory, list(hosts))
    click.echo(f"CA:          {files.ca_file} (clients: --nats-ca)")
    click.echo(f"certificate: {files.cert_file}, key {files.key_file} (owner-only)")


@click.command("state-diagram")
def state_diagram() -> None:
    """Print the run state diagram (Mermaid), generated from the transition table."""
    from contracts.machine import mermaid_diagram

    click.echo(mermaid_diagram(), nl=False)


@click.group()
def admin() -> None:
    """Operator steps on the streams."""


@admin.command("apply-retention")
@nats_option
@seed_option
@ca_option
@config_option
def apply_retention(
    nats_url: str, nats_seed: Path | None, nats_ca: Path | None, config_path: str | None
) -> None:
    """Set how long events, logs and run views are kept (the config's events_max_age_s and
    views_max_age_s); services never change it back."""
    from runtime.control.retention import RetentionRefused
    from runtime.services import apply_retention_at

    try:
        changed = anyio.run(
            apply_retention_at,
            nats_url,
            _config(config_path).settings,
            credentials_for("admin", nats_seed, nats_ca),
        )
    except RetentionRefused as err:
        raise click.ClickException(str(err)) from None
    for name, max_age in changed:
        click.echo(f"{name}: max_age {max_age:g} s" if max_age else f"{name}: kept for ever")
    if not changed:
        click.echo("retention already as configured")


def register(main: click.Group) -> None:
    for command in (setup, recall, keys, certs, state_diagram, admin):
        main.add_command(command)
