"""The ``jetrun`` command group: global options, and where each subcommand comes from
(service processes: cli_services; operator steps: cli_admin; runs: cli_runs; scaling,
webhooks, tokens: their own modules)."""

from __future__ import annotations

import os

import click

from runtime.cli_admin import register as register_admin_commands
from runtime.cli_auth import ca_option, seed_option
from runtime.cli_options import _config, config_option, nats_option, replicas_option
from runtime.cli_scaling import register as register_scaling_commands
from runtime.cli_services import register as register_service_commands
from runtime.cli_tokens import register as register_token_commands
from runtime.cli_webhooks import register as register_webhook_commands
from runtime.infra import logsetup


class _Commands(click.Group):
    """The user commands (``run``, ``runs``, ``logs``, ``events``: an HTTP client and a terminal
    UI) are imported when one of them is asked for, so a service process started through this
    CLI does not spend its start-up importing them."""

    USER = {"run": "run_command", "runs": "runs_group", "logs": "logs_command"}
    USER |= {"events": "events_command"}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.USER})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.USER:
            from runtime import cli_runs

            command: click.Command = getattr(cli_runs, self.USER[cmd_name])
            return command
        return super().get_command(ctx, cmd_name)


@click.group(cls=_Commands)
@click.option("-v", "--verbose", is_flag=True, help="Log more.")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    envvar=logsetup.FORMAT_ENV,
    default="text",
    show_default=True,
    help="Service logs as readable lines or JSON lines ($JETRUN_LOG_FORMAT).",
)
def main(verbose: bool, log_format: str) -> None:
    """jetrun: run ML pipelines on GPU nodes for many teams, on NATS JetStream."""
    os.environ[logsetup.FORMAT_ENV] = log_format  # child processes log the same way
    logsetup.configure(verbose=verbose, fmt=log_format)


register_service_commands(main)
register_admin_commands(main)
register_scaling_commands(
    main, nats_option, replicas_option, lambda command: seed_option(ca_option(command))
)
register_webhook_commands(main, nats_option, config_option, _config)
register_token_commands(main)


if __name__ == "__main__":
    main()
