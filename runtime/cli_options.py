"""The options and the config loading that commands of several groups share (``--nats``,
``--config``, ``--replicas``)."""

from __future__ import annotations

import os

import click

from runtime.infra import config as config_module
from runtime.infra.config import Config, ConfigError


def _config(path: str | None) -> Config:
    if path is None:
        return config_module.demo_config()
    try:
        return config_module.load(path)
    except ConfigError as err:  # one line, exit 1: "Error: config <path>: <what is wrong>"
        raise click.ClickException(f"config {path}: {err}") from None


nats_option = click.option(
    "--nats",
    "nats_url",
    default=lambda: os.environ.get("JETRUN_NATS", "nats://127.0.0.1:4222"),
    show_default="$JETRUN_NATS or nats://127.0.0.1:4222",
    help="NATS URL(s), comma-separated.",
)
config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="TOML config (teams, tokens, tiers, timings); see examples/jetrun.toml.",
)


replicas_option = click.option(
    "--replicas",
    type=click.IntRange(1, 5),
    default=1,
    show_default=True,
    help="Stream replicas (3 on a 3-node JetStream cluster).",
)
