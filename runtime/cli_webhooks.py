"""``jetrun webhooks``: the deliverer service, and the dead letters for operators."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import anyio
import click
import msgspec
from nats.aio.client import Client

from runtime.cli_auth import ca_option, credentials_for, seed_option
from runtime.infra.config import Config
from runtime.infra.eventlog import LogSettings
from runtime.infra.gctune import tune_for_service
from runtime.infra.nats_auth import Credentials

T = TypeVar("T")


Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def register(
    main: click.Group,
    nats_option: Decorator,
    config_option: Decorator,
    load: Callable[[str | None], Config],
) -> None:
    """Add the ``webhooks`` group to ``main`` (``load(path)`` reads a config)."""

    @main.group("webhooks", invoke_without_command=True)
    @nats_option
    @seed_option
    @ca_option
    @config_option
    @click.option("--replicas", type=click.IntRange(1, 5), default=1, show_default=True)
    @click.pass_context
    def webhooks(
        ctx: click.Context,
        nats_url: str,
        nats_seed: Path | None,
        nats_ca: Path | None,
        config_path: str | None,
        replicas: int,
    ) -> None:
        """Deliver run callbacks (signed POSTs with retries); `dead` and `replay` for the
        deliveries that failed for good. (NATS role: webhooks.)"""
        ctx.obj = Target(nats_url, credentials_for("webhooks", nats_seed, nats_ca))
        if ctx.invoked_subcommand is None:
            _serve(ctx.obj, load(config_path), LogSettings(replicas=replicas))

    @webhooks.command("dead")
    @click.option("--json", "as_json", is_flag=True, help="One dead delivery per line.")
    @click.pass_obj
    def dead(nats_url: Target, as_json: bool) -> None:
        """Deliveries that failed for good: run, team, URL, attempts, last error."""
        from rich.console import Console  # here: services started through this CLI skip it
        from rich.table import Table

        from runtime.control.webhooks import dead_letters

        rows = _with_nc(nats_url, lambda nc: dead_letters(nc.jetstream(timeout=5.0)))
        if as_json:
            for seq, letter in rows:
                click.echo(msgspec.json.encode({"seq": seq, **msgspec.to_builtins(letter)}))
            return
        table = Table(box=None, padding=(0, 1), header_style="bold")
        for column in ("DELIVERY", "TEAM", "URL", "ATTEMPTS", "FAILED", "ERROR"):
            table.add_column(column, overflow="fold", no_wrap=column == "DELIVERY")
        for _, letter in rows:
            at = datetime.datetime.fromtimestamp(letter.at, datetime.UTC)
            d = letter.delivery
            row = (d.delivery_id, d.team, d.url, str(letter.attempts), f"{at:%F %T}", letter.error)
            table.add_row(*row)
        Console(highlight=False).print(table)

    @webhooks.command("replay")
    @click.argument("ids", nargs=-1)
    @click.option("--all", "everything", is_flag=True, help="Every dead delivery.")
    @click.pass_obj
    def replay(nats_url: Target, ids: tuple[str, ...], everything: bool) -> None:
        """Queue dead deliveries (delivery or run ids) for delivery again. One whose event the
        outbox could not handle is handled again from the event log as it is now."""
        from runtime.control.webhooks import replay as replay_dead
        from runtime.infra.eventlog import EventLog

        if not ids and not everything:
            raise click.UsageError("name delivery or run ids, or pass --all")

        async def go(nc: Client) -> tuple[list[str], list[str]]:
            return await replay_dead(nc.jetstream(timeout=5.0), set(ids), everything, EventLog(nc))

        queued, left = _with_nc(nats_url, go)
        for delivery_id in queued:
            click.echo(f"queued {delivery_id}")
        for line in left:
            click.echo(f"not queued {line}", err=True)
        if not queued and not left:
            raise click.ClickException("no such dead delivery")
        if left:
            raise SystemExit(1)


class Target(NamedTuple):
    """Where NATS is and who this command is there."""

    url: str
    credentials: Credentials | None


def _with_nc(target: Target, call: Callable[[Client], Awaitable[T]]) -> T:
    from runtime.infra.nats_conn import connect

    logging.getLogger("jetrun").setLevel(logging.WARNING)  # not the connection's comings, goings

    async def go() -> T:
        nc = await connect(target.url, "jetrun-webhooks-cli", target.credentials)
        try:
            return await call(nc)
        finally:
            await nc.close()

    try:
        return anyio.run(go)
    except Exception as err:
        message = f"cannot read the webhook streams at {target.url}: {err!r}"
        raise click.ClickException(message) from None


def _serve(target: Target, config: Config, settings: LogSettings) -> None:
    from runtime.control.webhooks import WebhookService
    from runtime.infra.lifetime import honour_parent
    from runtime.infra.nats_conn import connect
    from runtime.services import until_signalled

    async def go() -> None:
        nc = await connect(target.url, "jetrun-webhooks", target.credentials)
        service = WebhookService(nc, config, settings=settings)
        async with anyio.create_task_group() as tg:
            await tg.start(service.run)
            await until_signalled()
            tg.cancel_scope.cancel()
        await nc.close()

    honour_parent()  # started by `jetrun up`: die with it (nothing is lost: durable consumers)
    tune_for_service()
    anyio.run(go, backend="asyncio", backend_options={"use_uvloop": True})
