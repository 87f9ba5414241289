"""``jetrun hash-token``: the form of a bearer token the config may store instead of the token."""

from __future__ import annotations

import getpass
import sys

import click

from runtime.infra.config import token_digest


@click.command("hash-token")
def hash_token() -> None:
    """Print the sha256 form of a bearer token, read from standard input (prompted without
    echo on a terminal, so it never lands in the shell's history). Put the printed
    ``sha256:...`` in a team's ``tokens`` instead of the token itself."""
    if sys.stdin.isatty():
        token = getpass.getpass("token: ")
    else:
        token = sys.stdin.readline().rstrip("\r\n")
    if not token:
        raise click.UsageError("no token given on standard input")
    click.echo(token_digest(token))


def register(main: click.Group) -> None:
    main.add_command(hash_token)
