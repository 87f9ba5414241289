"""The ``--nats-seed`` and ``--nats-ca`` options every NATS-speaking command takes."""

from __future__ import annotations

import os
from pathlib import Path

import click

from runtime.infra.nats_auth import Credentials

seed_option = click.option(
    "--nats-seed",
    "nats_seed",
    type=click.Path(dir_okay=False, path_type=Path),
    default=lambda: os.environ.get("JETRUN_NATS_SEED"),
    show_default="$JETRUN_NATS_SEED",
    help="This role's nkey seed file (jetrun keys makes them); none: connect anonymously.",
)
ca_option = click.option(
    "--nats-ca",
    "nats_ca",
    type=click.Path(dir_okay=False, path_type=Path),
    default=lambda: os.environ.get("JETRUN_NATS_CA"),
    show_default="$JETRUN_NATS_CA",
    help="CA certificate of the NATS servers (TLS; jetrun certs makes it).",
)


def credentials_for(role: str, seed: Path | None, ca: Path | None) -> Credentials | None:
    """The credentials of a command acting as ``role``; None: anonymous, no TLS. Raises
    ``click.BadParameter`` for a missing or invalid file (never showing its content)."""
    if seed is None and ca is None:
        return None
    credentials = Credentials(role=role, seed_file=seed, ca_file=ca)
    try:
        credentials.check()
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--nats-seed/--nats-ca") from None
    return credentials


def agent_identity(agent_id: str | None, seed: Path | None) -> str:
    """The agent's id: ``--id``, else the one its seed was minted for (``agents/<id>.nk``,
    what ``jetrun keys DIR --agent ID`` writes), else a new one. Raises ``click.BadParameter``
    when ``--id`` names another agent than the seed."""
    from runtime.infra.nats_auth import AGENTS_DIR
    from runtime.node.agent import default_agent_id

    minted_for = seed.stem if seed is not None and seed.parent.name == AGENTS_DIR else None
    if agent_id is not None and minted_for is not None and agent_id != minted_for:
        raise click.BadParameter(
            f"the seed was minted for agent {minted_for!r}, not {agent_id!r}", param_hint="--id"
        )
    return agent_id or minted_for or default_agent_id()
